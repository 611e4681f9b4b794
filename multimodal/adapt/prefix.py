"""Prefix tuning (Li & Liang 2021): P learned key and value vectors per KV head in front of the
keys and values of chosen self-attention layers of our towers.

Every query sees the prefix: causal, sliding-window and padding masks never hide it. Prefix
keys are not rotated by RoPE and get zero ALiBi / T5 bias (they have no position: they are
learned directly in key space, where the rotation of a fixed position would be absorbed by
training); absolute position embeddings are added to the tokens before the stack and never
reach the prefix. The prefix is not stored in a KV cache: every call prepends it once to the
cached and new keys, so generation with a cache equals the full forward.

At initialisation a prefix changes the outputs (the softmax shares mass with the new keys):
with `gate=True` each layer instead gets a scalar gate, initialised at 0, that scales the
prefix's own softmax output added to the unchanged token attention (LLaMA-Adapter's zero-init
attention, tanh(gate) as there), so the adapted model equals the base model until the gates
move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimodal.layers import Attention, Transformer
from multimodal.layers.attention import KVPrefix
from text.decoder import DecoderLM
from text.encoder import EncoderLM
from text.encoder_decoder import EncoderDecoderLM
from text.text_encoder import TextEncoder
from vision.timm_encoder import TimmEncoder
from vision.vit import ViT

TOWERS = (ViT, TextEncoder, EncoderLM, DecoderLM, EncoderDecoderLM)


@dataclass
class PrefixConfig:
    """Prefix tuning of the self-attention layers of our towers.

    Args:
        length: P, prefix keys/values per layer and KV head.
        reparam_hidden: None: the keys and values are Parameters. A width: they are computed by
            a per-layer MLP (Linear, tanh, Linear of this hidden width) from a learned (P, dim)
            embedding, the paper's reparametrisation for stable training.
        layers: "all" or block indices (0 = first block), in every adapted stack.
        towers: "all" (every ViT / TextEncoder / EncoderLM / DecoderLM / EncoderDecoderLM in
            the model, or the model itself) or submodule names (["image_tower"]).
        gate: a zero-initialised gate per layer: outputs equal the base model's at init.
        init_std: standard deviation of the initial keys and values (or embedding).
    """

    length: int = 10
    reparam_hidden: int | None = None
    layers: str | list[int] = "all"
    towers: str | list[str] = "all"
    gate: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        p = "PrefixConfig."
        if self.length < 1:
            raise ValueError(f"{p}length={self.length} must be >= 1")
        if self.reparam_hidden is not None and self.reparam_hidden < 1:
            raise ValueError(f"{p}reparam_hidden={self.reparam_hidden} must be >= 1 or None")
        self.layers = check_selection(self.layers, f"{p}layers", int)
        self.towers = check_selection(self.towers, f"{p}towers", str)
        if self.init_std <= 0:
            raise ValueError(f"{p}init_std={self.init_std} must be > 0")


def check_selection(value: object, name: str, kind: type) -> str | list:
    """ "all" or a non-empty list of `kind` values; ValueError naming the field otherwise."""
    if value == "all":
        return "all"
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise ValueError(f'{name}={value!r} must be "all" or a non-empty list of {kind.__name__}')


def find_towers(
    model: nn.Module, towers: str | list[str], what: str, supported: tuple[type, ...] = TOWERS
) -> list[tuple[str, nn.Module]]:
    """(name, tower) pairs of `model` that `what` ("prefix tuning") adapts.

    "all": the model itself when it is a supported tower, else every outermost supported
    tower inside it; ValueError when the model holds a timm or open_clip tower (their
    attention is not ours) or no supported tower. A list: those submodules, each supported.
    """
    names = [t.__name__ for t in supported]
    if towers == "all":
        if isinstance(model, supported):
            return [("", model)]
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if any(name.startswith(f"{outer}.") for outer, _ in found):
                continue
            if isinstance(module, TimmEncoder) or type(module).__module__.startswith("open_clip"):
                raise ValueError(
                    f"{what} cannot reach {name or 'the model'!r} ({type(module).__name__}): "
                    f"timm and open_clip towers do not use our attention; name the towers to "
                    f"adapt in `towers` (supported: {names})"
                )
            if isinstance(module, supported):
                found.append((name, module))
        if not found:
            raise ValueError(f"{what}: no tower of {names} in {type(model).__name__}")
        return found
    found = []
    for name in towers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{what}: the model has no submodule {name!r}") from None
        if not isinstance(module, supported):
            raise ValueError(
                f"{what} cannot reach {name!r} ({type(module).__name__}): supported towers "
                f"are {names}"
            )
        found.append((name, module))
    return found


def tower_stacks(tower: nn.Module) -> dict[str, Transformer]:
    """The self-attention stacks of one of our towers, by attribute name."""
    if isinstance(tower, ViT):
        return {"encoder": tower.encoder}
    if isinstance(tower, EncoderDecoderLM):
        return {"encoder": tower.encoder, "decoder": tower.decoder}
    return {"transformer": tower.transformer}


class Prefix(nn.Module):
    """The learned prefix of one attention layer; called, it returns a `KVPrefix`.

    Args:
        n_kv_heads, head_dim: the layer's key/value heads and head size.
        length: P.
        reparam_hidden: None (keys/values are Parameters) or the MLP's hidden width.
        gate: a scalar gate initialised at 0 (tanh(gate) scales the prefix's output).
        init_std: standard deviation of the initial values.
        dim: width of the reparametrisation embedding (default n_kv_heads * head_dim).
    """

    def __init__(
        self,
        n_kv_heads: int,
        head_dim: int,
        length: int,
        *,
        reparam_hidden: int | None = None,
        gate: bool = False,
        init_std: float = 0.02,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        self.shape = (n_kv_heads, length, head_dim)
        self.keys: nn.Parameter | None = None
        self.values: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if reparam_hidden is None:
            self.keys = nn.Parameter(torch.randn(self.shape) * init_std)
            self.values = nn.Parameter(torch.randn(self.shape) * init_std)
        else:
            width = dim or n_kv_heads * head_dim
            self.embedding = nn.Parameter(torch.randn(length, width) * init_std)
            self.mlp = nn.Sequential(
                nn.Linear(width, reparam_hidden),
                nn.Tanh(),
                nn.Linear(reparam_hidden, 2 * n_kv_heads * head_dim),
            )
        self.gate = nn.Parameter(torch.zeros(())) if gate else None

    def key_values(self) -> tuple[Tensor, Tensor]:
        """Keys and values (H_kv, P, D) each."""
        if self.mlp is not None and self.embedding is not None:
            H_kv, P, D = self.shape
            kv = self.mlp(self.embedding).view(P, 2, H_kv, D).permute(1, 2, 0, 3)
            return kv[0], kv[1]
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def forward(self) -> KVPrefix:
        keys, values = self.key_values()
        return KVPrefix(keys, values, None if self.gate is None else self.gate.tanh())


def add_prefixes(model: nn.Module, config: PrefixConfig) -> list[str]:
    """Give the chosen self-attention layers of the chosen towers a `Prefix`; return the new
    parameter names. ValueError for towers it cannot reach, block indices out of range and a
    model that already has prefixes (add_prefixes called twice)."""
    targets: list[tuple[str, Attention]] = []
    for tower_name, tower in find_towers(model, config.towers, "prefix tuning"):
        for stack_name, stack in tower_stacks(tower).items():
            n = len(stack.blocks)
            layers = range(n) if config.layers == "all" else config.layers
            for i in layers:
                if not 0 <= i < n:
                    raise ValueError(
                        f"PrefixConfig.layers has block {i}, but {tower_name or 'the model'}."
                        f"{stack_name} has {n} blocks"
                    )
                name = ".".join(filter(None, (tower_name, stack_name, f"blocks.{i}.attn")))
                targets.append((name, stack.blocks[i].attn))
    for name, attn in targets:
        if attn.kv_prefix is not None:
            raise ValueError(f"{name} already has a prefix: add_prefixes was called twice")
    added: list[str] = []
    for name, attn in targets:
        weight = attn.proj.weight
        prefix = Prefix(
            attn.n_kv_heads,
            attn.head_dim,
            config.length,
            reparam_hidden=config.reparam_hidden,
            gate=config.gate,
            init_std=config.init_std,
            dim=attn.n_heads * attn.head_dim,
        ).to(device=weight.device, dtype=weight.dtype)
        attn.kv_prefix = prefix
        added += [f"{name}.kv_prefix.{p}" for p, _ in prefix.named_parameters()]
    return added
