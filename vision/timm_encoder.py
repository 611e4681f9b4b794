"""Any timm model as an image tower, with weights from a local file or the hub."""

from __future__ import annotations

import os

import timm
from torch import Tensor, nn

from multimodal.layers import TowerOutput


def create_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_path: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """`timm.create_model` with weights from a local file (`pretrained_path`: a state dict
    in .pth/.bin/.safetensors, loaded with weights_only) or from the hub (`pretrained=True`).
    timm adapts the file to the model (classifier dropped when num_classes differs, input
    channels adapted)."""
    if not timm.is_model(name):
        raise ValueError(f"timm has no model called {name!r}; see timm.list_models()")
    if pretrained_path is not None:
        if not os.path.isfile(pretrained_path):
            raise FileNotFoundError(f"pretrained_path={str(pretrained_path)!r} is not a file")
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": os.fspath(pretrained_path)},
            **kwargs,
        )
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class TimmEncoder(nn.Module):
    """A timm backbone (ViT, ConvNeXt, ResNet, ...) as an image tower.

    `pooled` is timm's pre-logits feature (`forward_head(..., pre_logits=True)`); `tokens`
    are the transformer's patch tokens (class and register tokens removed) or a CNN's last
    feature map flattened to (B, H * W, C).

    Args:
        model_name: any name of `timm.list_models()`.
        pretrained: load timm's pretrained weights from the hub.
        pretrained_path: load weights from this local file instead.
        image_size: input size, for models that need one (ViTs); default: the model's own.
        drop_path: stochastic depth rate, for models that have it.
    """

    # only initial weights: a model rebuilt to receive a trained checkpoint drops them
    weight_arguments = ("pretrained", "pretrained_path")

    def __init__(
        self,
        model_name: str,
        *,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        image_size: int | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict = {"num_classes": 0}
        if image_size is not None:
            kwargs["img_size"] = image_size
        if drop_path is not None:
            kwargs["drop_path_rate"] = drop_path
        self.model = create_timm_model(
            model_name, pretrained=pretrained, pretrained_path=pretrained_path, **kwargs
        )
        self.out_dim: int = self.model.head_hidden_size
        self.n_prefix: int = getattr(self.model, "num_prefix_tokens", 0)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> TowerOutput:
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        if features.dim() == 4:  # CNN feature map (B, C, H, W)
            tokens = features.flatten(2).transpose(1, 2)
        else:  # transformer tokens (B, prefix + N, C)
            tokens = features[:, self.n_prefix :]
        return TowerOutput(pooled, tokens)
