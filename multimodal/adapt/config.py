"""The adaptation of a pretrained model, as one config: which parameter-efficient methods to
add (LoRA, bottleneck adapters, prefix tuning, prompt tuning) and what stays trainable;
`apply_adaptation` does it.

Each method is a `Method` in `METHODS`: the `AdaptConfig` field holding its sub-config, the
sub-config class and `add(model, cfg) -> list[str]`. The new parameters are found by comparing
the model's parameters before and after, whatever `add` returns, so freezing and
`adapter_state_dict` need nothing per method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from multimodal.adapt.adapters import AdapterConfig, add_adapters
from multimodal.adapt.lora import LoRAConfig, add_lora, name_matches
from multimodal.adapt.prefix import PrefixConfig, add_prefixes
from multimodal.adapt.prompt import PromptConfig, add_prompts


@dataclass(frozen=True)
class Method:
    """One adaptation method: the AdaptConfig field of its config, that config's class, the
    function adding it to a model (returns what it added, by name) and a phrase for the
    report."""

    field: str
    config_class: type
    add: Callable[[nn.Module, Any], list[str]]
    describe: Callable[[Any, list[str]], str]


METHODS: tuple[Method, ...] = (  # applied in this order: LoRA before the adapters' own Linears
    Method("lora", LoRAConfig, add_lora, lambda c, n: f"LoRA r={c.rank} on {len(n)} Linear layers"),
    Method(
        "adapter",
        AdapterConfig,
        add_adapters,
        lambda c, n: f"{c.kind.capitalize()} adapters on {len(n)} sublayers",
    ),
    Method(
        "prefix",
        PrefixConfig,
        add_prefixes,
        lambda c, n: f"prefixes of {c.length} keys/values in {_layers(n)} attention layers",
    ),
    Method(
        "prompt",
        PromptConfig,
        add_prompts,
        lambda c, n: f"{c.depth} prompts of {c.length} tokens ({len(n)} parameter tensors)",
    ),
)


def _layers(names: list[str]) -> int:
    """Layers holding the named prefix parameters (one module per layer)."""
    return len({name.rsplit(".", 1)[0] for name in names})


@dataclass
class AdaptConfig:
    """Parameter-efficient fine-tuning of a model.

    Args:
        lora: low-rank updates of matched nn.Linear layers (`LoRAConfig`), or None.
        adapter: bottleneck adapters in every transformer block (`AdapterConfig`), or None.
        prefix: learned key/value prefixes in self-attention layers of our towers
            (`multimodal.adapt.prefix.PrefixConfig`), or None.
        prompt: learned input tokens: soft prompts of text towers, visual prompt tokens of
            the ViT (`multimodal.adapt.prompt.PromptConfig`), or None.
        freeze_base: freeze every parameter except the added ones and `train_also`'s.
        train_also: parameter name patterns that stay trainable (e.g. ["head", "logit_scale",
            "*.proj"]); a pattern without a dot matches any component of a parameter's name
            ("head" matches `head.weight`), a dotted one is fnmatched against the name or a
            tail of it at a component boundary (see `multimodal.adapt.lora.name_matches`). A
            linear probe is `AdaptConfig(train_also=["head"])`.
    """

    lora: LoRAConfig | None = None
    adapter: AdapterConfig | None = None
    prefix: PrefixConfig | None = None
    prompt: PromptConfig | None = None
    freeze_base: bool = True
    train_also: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for method in METHODS:  # plain dicts (a saved adapter's record) become configs
            value = getattr(self, method.field)
            if isinstance(value, dict):
                setattr(self, method.field, method.config_class(**value))
            elif value is not None and not isinstance(value, method.config_class):
                raise ValueError(
                    f"AdaptConfig.{method.field} must be a {method.config_class.__name__} or "
                    f"None, not {type(value).__name__}"
                )
        if isinstance(self.train_also, str):
            raise ValueError(f"AdaptConfig.train_also={self.train_also!r} must be a list")
        self.train_also = list(self.train_also)
        if self.train_also and not self.freeze_base:
            raise ValueError(
                f"AdaptConfig.train_also={self.train_also} needs freeze_base=true (without "
                "freezing, every parameter trains)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (saved with adapter weights, read back weights-only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdaptConfig:
        return cls(**values)


@dataclass
class AdaptReport:
    """What `apply_adaptation` did: the methods added, the new parameter names, and the
    trainable / total parameter counts after freezing."""

    methods: list[str]
    new_parameters: list[str]
    train_also: list[str]
    trainable: int
    total: int

    def summary(self) -> str:
        """One line, e.g. "adapt: LoRA r=8 on 24 Linear layers; 0.9% of 5.1M parameters
        trainable"."""
        parts = list(self.methods)
        if self.train_also:
            parts.append(f"training also {', '.join(self.train_also)}")
        share = 100 * self.trainable / max(self.total, 1)
        return (
            f"adapt: {', '.join(parts) or 'nothing added'}; {share:.2g}% of "
            f"{_count(self.total)} parameters trainable"
        )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def trainable_names(model: nn.Module, patterns: list[str]) -> set[str]:
    """Names of the parameters matching any of `patterns` by themselves or through one of
    their modules; ValueError naming a pattern that matches nothing."""
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        matched = {
            name
            for name in names
            if any(
                name_matches(".".join(name.split(".")[: i + 1]), pattern)
                for i in range(name.count(".") + 1)
            )
        }
        if not matched:
            raise ValueError(
                f"AdaptConfig.train_also pattern {pattern!r} matches no parameter of the "
                f"model (e.g. {', '.join(names[:3])})"
            )
        chosen |= matched
    return chosen


def apply_adaptation(model: nn.Module, config: AdaptConfig) -> AdaptReport:
    """Add the configured methods to `model` (in place), then with `freeze_base` freeze every
    parameter but the new ones and `train_also`'s; return what was done."""
    before = {id(p) for p in model.parameters()}  # LoRA keeps the base Parameter objects
    methods = []
    for method in METHODS:
        sub = getattr(config, method.field)
        if sub is not None:
            methods.append(method.describe(sub, method.add(model, sub)))
    new = [name for name, p in model.named_parameters() if id(p) not in before]
    if config.freeze_base:
        keep = set(new) | trainable_names(model, config.train_also)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
    params = list(model.parameters())
    return AdaptReport(
        methods=methods,
        new_parameters=new,
        train_also=list(config.train_also),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )
