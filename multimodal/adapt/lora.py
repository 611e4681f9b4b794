"""LoRA (Hu et al. 2021): a frozen nn.Linear plus a trainable low-rank update,
y = x W^T + b + dropout(x) A^T B^T * (alpha / rank), with B zero at the start so the adapted
model equals the base one.

`LoRALinear` takes over the base layer's `weight` and `bias` Parameters (the same objects under
the same state-dict names), so a base checkpoint still loads into the adapted model and the
adapted state dict only adds `lora_a` / `lora_b` keys.

Targets are name patterns (`name_matches`):
- a pattern without a dot matches the last component of a module name (fnmatch): "qkv" matches
  `image_tower.encoder.blocks.0.attn.qkv`, "fc*" matches `...mlp.fc1` and `...mlp.fc2`;
- a dotted pattern is fnmatched against the full dotted name or any tail of it that starts at a
  component: "image_tower.*.qkv" matches `image_tower.encoder.blocks.0.attn.qkv` and also
  `model.image_tower.encoder.blocks.0.attn.qkv` (the same model inside a task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")  # our towers' and timm ViTs' Linear layers
SHOWN = 8  # Linear names listed when no target matched


def name_matches(name: str, pattern: str) -> bool:
    """Whether a dotted module/parameter `name` matches `pattern` (see the module docstring)."""
    parts = name.split(".")
    if "." not in pattern:
        return fnmatchcase(parts[-1], pattern)
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


@dataclass
class LoRAConfig:
    """Low-rank adaptation of the nn.Linear layers whose names match `targets`.

    Args:
        rank: r, the rank of the update B A (A: r x in, B: out x r).
        alpha: the update is scaled by alpha / rank (so changing the rank keeps its size).
        dropout: dropout on the LoRA branch's input (the base path sees x unchanged).
        targets: module name patterns (`name_matches`): the last name component ("qkv") or a
            dotted fnmatch pattern ("image_tower.*.qkv").
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(
                f"LoRAConfig.targets={self.targets!r} must be a non-empty list of name patterns"
            )
        self.targets = list(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update; owns the base layer's `weight` and `bias`.

    Args:
        base: the layer adapted; its Parameters are shared, not copied.
        rank, alpha, dropout: as in `LoRAConfig`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank = rank
        self.scale = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as Microsoft's LoRA and PEFT
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # the update is folded into `weight` (for export)

    def delta_weight(self) -> Tensor:
        """The update B A * alpha / rank, shaped like `weight` (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # (..., in) -> (..., r) -> (..., out)
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight`: the layer then computes as one plain Linear. The
        state dict then holds the folded weight next to A and B: export it without them
        (`merged_state_dict`), never load it into an unmerged layer."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of `weight` again (equal to before `merge` up to rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def _unreachable(model: nn.Module) -> set[str]:
    """Linear layers whose forward is never called: nn.MultiheadAttention passes its
    `out_proj.weight` straight to the functional kernel, so a LoRA there would do nothing."""
    return {
        f"{name}.{child}".lstrip(".")
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, sub in module.named_children()
        if isinstance(sub, nn.Linear)
    }


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every nn.Linear of `model` whose name matches `config.targets` by a
    `LoRALinear`; return the replaced module names.

    Reachable: every nn.Linear whose forward is called: our towers' `qkv` / `q` / `kv` /
    `proj` / `fc1` / `fc2`, the projections into the joint space, timm ViTs' `attn.qkv`,
    `attn.proj`, `mlp.fc1`, `mlp.fc2`, open_clip's `mlp.c_fc` / `mlp.c_proj`. Not reachable:
    open_clip's default attention is nn.MultiheadAttention, whose packed `in_proj_weight` is
    a Parameter, not a Linear, and whose `out_proj` Linear is never called (its weight goes
    straight to the kernel), so both are skipped; convolutions and Parameter projections
    (open_clip's `text_projection`) are not Linear layers. ValueError naming the patterns when
    nothing matched.
    """
    skipped = _unreachable(model)
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
    ]
    chosen = [
        (name, module)
        for name, module in linears
        if name not in skipped and any(name_matches(name, p) for p in config.targets)
    ]
    if not chosen:
        names = [name for name, _ in linears if name not in skipped]
        more = f", ... {len(names) - SHOWN} more" if len(names) > SHOWN else ""
        raise ValueError(
            f"LoRAConfig.targets={config.targets} match no nn.Linear of the model "
            f"(nn.MultiheadAttention's projections are not reachable); its Linear layers: "
            f"{', '.join(names[:SHOWN]) or 'none'}{more}"
        )
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, config.rank, config.alpha, config.dropout))
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """The LoRA layers of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (export, faster inference); returns the
    number of layers merged."""
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo `merge_lora` (training can continue); returns the number of layers unmerged."""
    layers = lora_layers(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of `model` with every LoRA update folded into its base weight and the
    `lora_a` / `lora_b` keys dropped: the base model's keys, loadable without `multimodal.adapt`
    (other additions, such as adapters, stay). The model itself is left unmerged."""
    layers = [m for m in lora_layers(model) if not m.merged]
    for layer in layers:
        layer.merge()
    try:
        return {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")
        }
    finally:
        for layer in layers:
            layer.unmerge()
