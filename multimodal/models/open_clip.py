"""Any open_clip architecture behind the interface of our `CLIP` (`ClipLike`): the same
encode methods, `CLIPOutput`, temperature and tower locking, plus open_clip's image transforms
and a tokenizer with our `batch_encode`. Weights come from an open_clip pretrained tag
(downloaded from the hub) or from a local checkpoint loaded strictly."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip import CustomTextCLIP
from open_clip.hf_model import HFTextEncoder
from open_clip.model import lock_text_tower
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from multimodal.models.clip import ClipLike, CLIPOutput
from text.tokenizer import BatchEncoding, load_tokenizer

SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that carry their own config
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SHOWN_KEYS = 8  # how many missing / unexpected keys an error lists


class OpenClipTokenizer:
    """Our `batch_encode` over an open_clip tokenizer that we have no equivalent of (Hugging
    Face or SigLIP ones): rows are open_clip's own ids, always padded to their full length.

    The mask is `ids != pad_id` (open_clip models ignore it); only right padding exists.
    """

    def __init__(self, tokenizer: Callable[..., Tensor], context_length: int, pad_id: int) -> None:
        self._tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = pad_id

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding: str = "max_length",
        pad_side: str = "right",
    ) -> BatchEncoding:
        """Texts -> (B, L) ids and mask, L = min(max_length, context_length); `padding` is
        accepted for interface compatibility, every row is padded to L."""
        if pad_side != "right":
            raise ValueError(f"pad_side={pad_side!r}: open_clip tokenizers pad on the right only")
        if isinstance(texts, str):
            raise TypeError("batch_encode takes a sequence of texts; got one str, wrap it in [ ]")
        length = self.context_length if max_length is None else min(max_length, self.context_length)
        input_ids = self._tokenizer(list(texts), context_length=length).long()  # (B, L)
        return BatchEncoding(input_ids, input_ids != self.pad_id)


class OpenCLIP(ClipLike):
    """An open_clip model (`CLIP` or `CustomTextCLIP`) with the interface of our `CLIP`.

    Args:
        model_name: an architecture of `open_clip.list_models()` (a config registered with
            `open_clip.add_model_config` included), or an "hf-hub:" / "local-dir:" name.
        pretrained: an open_clip pretrained tag (e.g. "laion2b_s34b_b79k"), downloaded.
        checkpoint: a local state dict (.pt/.pth/.bin through `torch.load(weights_only=True)`,
            or .safetensors), raw or under "state_dict", with or without DDP's "module."
            prefix; loaded strictly. At most one of `pretrained` and `checkpoint`.
        max_logit_scale: `scale()` is clamped at this multiplier (open_clip trains with 100).
        **open_clip_kwargs: passed to `open_clip.create_model_and_transforms` (e.g.
            `force_image_size`, `aug_cfg`).

    Attributes: `model` (the open_clip module), `preprocess_train` / `preprocess` (its
    torchvision transforms), `tokenizer` (with `batch_encode`), `context_length`, `embed_dim`.
    Text is padded to `context_length` with the tokenizer's pad id; the attention mask is
    ignored, as open_clip's text towers ignore padding (causal attention, EOT pooling).
    """

    # only initial weights: a model rebuilt to receive a trained checkpoint drops them
    weight_arguments = ("pretrained", "checkpoint")

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        *,
        max_logit_scale: float = 100.0,
        **open_clip_kwargs: Any,
    ) -> None:
        super().__init__()
        if pretrained is not None and checkpoint is not None:
            raise ValueError(
                f"pass pretrained={pretrained!r} or checkpoint={str(checkpoint)!r}, not both"
            )
        if max_logit_scale <= 0:
            raise ValueError(f"max_logit_scale={max_logit_scale} must be > 0")
        model_name, config = _model_config(model_name)
        if checkpoint is not None:
            # the checkpoint replaces every weight: do not fetch base weights for HF text towers
            open_clip_kwargs.setdefault("pretrained_text", False)
        self.model, self.preprocess_train, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, **open_clip_kwargs
        )
        if checkpoint is not None:
            load_checkpoint(self.model, checkpoint)
        self.model_name = model_name
        self.embed_dim: int = config["embed_dim"]
        self.context_length: int = self.model.context_length
        self.max_log_scale = math.log(max_logit_scale)
        self.tokenizer = _tokenizer(model_name, config, self.context_length)

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """SigLIP's learnable logit bias; None for CLIP models."""
        return self.model.logit_bias

    def no_weight_decay(self) -> set[str]:
        names = {"model.logit_scale"}
        return names | ({"model.logit_bias"} if self.logit_bias is not None else set())

    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower but its last `unlocked_layers` blocks, with open_clip's
        `lock`; the projection into the joint space still trains, as in our `CLIP`."""
        visual = self.model.visual
        _check_unlocked(unlocked_layers, visual)
        # open_clip's last lock group of its own towers is the projection (or the ResNet's
        # attention pool); a timm trunk's head, the projection, is outside what `lock` freezes
        projection_group = 0 if isinstance(visual, TimmModel) else 1
        visual.lock(unlocked_groups=unlocked_layers + projection_group)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower but its last `unlocked_layers` blocks, with open_clip's
        `lock`; the projection into the joint space still trains."""
        text = self.model.text if isinstance(self.model, CustomTextCLIP) else self.model
        _check_unlocked(unlocked_layers, text)
        if isinstance(text, HFTextEncoder):  # its projection is outside what `lock` freezes
            text.lock(unlocked_layers)
        else:  # open_clip's last text lock group is the projection
            lock_text_tower(text, unlocked_layers + 1)

    def encode_image(self, images: Tensor, *, normalize: bool = True) -> Tensor:
        """(B, C, H, W) -> (B, embed_dim)."""
        features = self.model.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        """(B, T) token ids, T <= context_length, right-padded -> (B, embed_dim).

        `attention_mask` is accepted for interface compatibility and ignored: the ids are
        padded with the tokenizer's pad id up to the context length, as open_clip tokenizes.
        """
        length = input_ids.shape[-1]
        if input_ids.dim() != 2 or length > self.context_length:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)}: expected (B, T) with "
                f"T <= context_length={self.context_length} (tokenize with "
                "max_length=model.context_length)"
            )
        input_ids = F.pad(input_ids, (0, self.context_length - length), value=self.tokenizer.pad_id)
        features = self.model.encode_text(input_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> Tensor:
        """The logit multiplier exp(logit_scale), clamped at max_logit_scale (0-d)."""
        return self.model.logit_scale.clamp(max=self.max_log_scale).exp().reshape(())

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_tokens: bool = False,
    ) -> CLIPOutput:
        """Normalised embeddings of both towers, the clamped scale and the bias. Token
        features (`return_tokens`, for an image-text matching head) are not exposed."""
        if return_tokens:
            raise ValueError(
                "OpenCLIP returns no token features (return_tokens=True); an image-text "
                "matching head needs our multimodal.models.CLIP"
            )
        return CLIPOutput(
            self.encode_image(images),
            self.encode_text(input_ids, attention_mask),
            self.scale(),
            self.logit_bias,
        )


def _check_unlocked(unlocked_layers: int, tower: nn.Module) -> None:
    """ValueError unless 0 <= unlocked_layers <= the blocks of an open_clip tower (counted
    where open_clip keeps them: `transformer.resblocks`, a timm trunk's `blocks`)."""
    if unlocked_layers < 0:
        raise ValueError(f"unlocked_layers={unlocked_layers} must be >= 0")
    if unlocked_layers == 0:
        return
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        blocks = getattr(getattr(tower, "trunk", None), "blocks", None)
    if blocks is not None and unlocked_layers > len(blocks):
        raise ValueError(
            f"unlocked_layers={unlocked_layers} exceeds the {len(blocks)} blocks of the tower"
        )


def _model_config(model_name: str) -> tuple[str, dict]:
    """open_clip's name and config dict of `model_name`; ValueError for an unknown name."""
    if not model_name.startswith(SCHEMAS):
        cleaned = model_name.replace("/", "-")  # open_clip accepts "ViT-B/32" for "ViT-B-32"
        if cleaned not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; see open_clip.list_models() for the "
                "available architectures, or register a config JSON with "
                "open_clip.add_model_config(path)"
            )
        model_name = cleaned
    return model_name, open_clip.get_model_config(model_name)


def _tokenizer(model_name: str, config: dict, context_length: int) -> Any:
    """Our `ClipTokenizer` for open_clip's standard CLIP BPE (the ids of `open_clip.tokenize`),
    else an `OpenClipTokenizer` around the model's own open_clip tokenizer."""
    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
    custom = config.get("text_cfg", {}).get("tokenizer_kwargs")  # e.g. another text cleaning
    if type(tokenizer) is SimpleTokenizer and not custom:
        return load_tokenizer("clip")
    # Hugging Face based open_clip tokenizers keep the backend, with its pad id, in `.tokenizer`
    backend = getattr(tokenizer, "tokenizer", None)
    pad_id = getattr(backend, "pad_token_id", None)
    return OpenClipTokenizer(tokenizer, context_length, 0 if pad_id is None else pad_id)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a local file (never unpickling arbitrary objects): raw or under
    "state_dict", DDP's "module." prefix stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif path.suffix in TORCH_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"checkpoint {str(path)!r}: expected a .safetensors or one of {list(TORCH_SUFFIXES)} "
            "file"
        )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load `path` into `model` strictly: every key present, none extra, every shape equal;
    otherwise ValueError naming the file and the offending keys."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    )
    problems = [
        f"{len(keys)} {what} ({_listing(keys)})"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f", ... {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")
