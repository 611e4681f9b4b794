"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): h + up(act(down(h))) on
the output of a transformer block's residual branches, before the residual add, with `up`
zero-initialised so the adapted model equals the base one at step 0.

- "houlsby": an adapter after the self-attention branch and after the MLP branch of each block;
- "pfeiffer": after the MLP branch only.

Supported blocks: our `multimodal.layers.TransformerBlock` (every tower, decoder and fusion
stack; a decoder's cross-attention branch gets none), timm's ViT `Block` / `ResPostBlock` and
open_clip's `ResidualAttentionBlock` / `CustomResidualAttentionBlock`.

How: the adapter becomes a child `adapter` of the branch module (`blocks.0.attn.adapter.down.
weight`) and a forward hook of that module applies it to the module's output (the first element
when the module returns a tuple, as nn.MultiheadAttention, our `Attention` and MoE feed-forward
do). Like `multimodal.train.blocks`, this keeps the module tree and every base parameter name:
a base checkpoint still loads, and the adapted state dict only adds the adapters' keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from timm.models.vision_transformer import Block, ResPostBlock
from torch import Tensor, nn

from multimodal.layers import TransformerBlock

KINDS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    TransformerBlock,
    Block,  # timm ViT / DeiT
    ResPostBlock,
    ResidualAttentionBlock,  # open_clip towers
    CustomResidualAttentionBlock,
)
BRANCHES = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclass
class AdapterConfig:
    """Bottleneck adapters on every supported transformer block.

    Args:
        kind: "houlsby" (after attention and MLP) or "pfeiffer" (after the MLP only).
        bottleneck: the adapter's hidden width.
        reduction: when set, the hidden width is the block width // reduction instead.
        activation: one of `ACTIVATIONS`.
    """

    kind: str = "houlsby"
    bottleneck: int = 16
    reduction: int | None = None
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AdapterConfig.kind={self.kind!r} must be one of {list(KINDS)}")
        if self.bottleneck < 1:
            raise ValueError(f"AdapterConfig.bottleneck={self.bottleneck} must be >= 1")
        if self.reduction is not None and self.reduction < 1:
            raise ValueError(f"AdapterConfig.reduction={self.reduction} must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"AdapterConfig.activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}"
            )

    def width(self, dim: int) -> int:
        """The hidden width of an adapter on a block `dim` wide."""
        return self.bottleneck if self.reduction is None else max(1, dim // self.reduction)


class Adapter(nn.Module):
    """h + up(act(down(h))), the identity at initialisation (`up` is zero).

    Args:
        dim: width of h.
        bottleneck: hidden width.
        activation: one of `ACTIVATIONS`.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))  # (..., dim)


def _apply_adapter(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of an adapted branch: its output through `module.adapter`."""
    if not isinstance(output, tuple):
        return module.adapter(output)
    adapted = module.adapter(output[0])
    if hasattr(output, "_make"):  # a NamedTuple (AttentionOutput)
        return output._make((adapted, *output[1:]))
    return (adapted, *output[1:])


def _width(block: nn.Module) -> int:
    """The residual width of a block: the output features of its attention's last Linear
    (our/timm `proj`, nn.MultiheadAttention's and open_clip's `out_proj`)."""
    linears = [m for m in block.attn.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(block).__name__}.attn has no nn.Linear to read its width from")
    return linears[-1].out_features


def add_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Add a bottleneck adapter after the branches `config.kind` names in every supported
    block of `model`; return the adapted branch names (e.g. `...blocks.0.attn`). ValueError
    when the model has no supported block or is adapted already."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, BLOCK_TYPES)]
    if not blocks:
        supported = ", ".join(t.__name__ for t in BLOCK_TYPES)
        raise ValueError(
            f"AdapterConfig(kind={config.kind!r}): the model ({type(model).__name__}) has no "
            f"supported transformer block ({supported})"
        )
    added = []
    for name, block in blocks:
        dim = _width(block)
        ref = next(block.parameters())
        for branch_name in BRANCHES[config.kind]:
            branch = getattr(block, branch_name)
            full = f"{name}.{branch_name}".lstrip(".")
            if isinstance(getattr(branch, "adapter", None), Adapter):
                raise ValueError(f"{full} has an adapter already: add_adapters runs once")
            adapter = Adapter(dim, config.width(dim), config.activation)
            branch.adapter = adapter.to(device=ref.device, dtype=ref.dtype)
            branch.register_forward_hook(_apply_adapter)
            added.append(full)
    return added
