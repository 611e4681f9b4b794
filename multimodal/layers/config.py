"""The one configuration of a transformer stack, shared by every tower."""

from __future__ import annotations

from dataclasses import dataclass

from multimodal.layers.attention import check_attention_args
from multimodal.layers.mlp import check_activation
from multimodal.layers.norm import NORMS
from multimodal.layers.position import POSITIONS

NORM_ORDERS = ("pre", "post")


@dataclass
class TransformerConfig:
    """Numbers and names that define a `Transformer`; validated on creation.

    Attention: `n_kv_heads` None (= n_heads) is MHA, 1 is MQA, a divisor of n_heads is GQA.
    `causal` for decoders; `window` for sliding-window attention, with `n_global_tokens`
    leading tokens visible to all (Longformer). `cross_attention` adds a cross-attention
    sub-layer to every block, over a context of width `context_dim` (default: dim).

    Positions: "none" (the caller adds its own, as a ViT does), "sinusoidal" or "learned"
    (added to the input, at most `max_positions`), "rope" (rotary, `rope_base`,
    `rope_scaling` = linear position interpolation), "alibi" or "t5" (relative biases;
    T5 buckets: `relative_buckets`, `relative_max_distance`).

    Feed-forward: `activation` "relu", "gelu", "gelu_tanh", "quick_gelu", "swiglu", "geglu",
    "geglu_tanh" (the _tanh ones: GELU's tanh approximation); hidden width `mlp_hidden_dim` or
    mlp_ratio * dim. `n_experts` > 0 makes it a mixture of experts with
    `moe_top_k` routing and `moe_capacity_factor`.

    Norms: `norm` "layernorm" or "rmsnorm", `norm_order` "pre" (a final norm closes the stack
    unless `final_norm=False`, for models that normalise after pooling) or "post" (the
    original Transformer and BERT); `input_norm` normalises the input after the position
    embeddings (BERT's embedding LayerNorm). Dropout: `dropout` on every residual branch,
    `attn_dropout` on attention weights, `input_dropout` on the input embeddings.
    `drop_path` is the stochastic depth rate of the last block, rising linearly from 0.
    """

    dim: int = 512
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    causal: bool = False
    window: int | None = None
    n_global_tokens: int = 0
    cross_attention: bool = False
    context_dim: int | None = None
    position: str = "none"
    max_positions: int = 2048
    rope_base: float = 10000.0
    rope_scaling: float = 1.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    activation: str = "gelu"
    mlp_ratio: float = 4.0
    mlp_hidden_dim: int | None = None
    n_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_order: str = "pre"
    final_norm: bool = True
    input_norm: bool = False
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    input_dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        prefix = "TransformerConfig."
        if self.dim <= 0:
            raise ValueError(f"{prefix}dim={self.dim} must be > 0")
        if self.n_layers < 0:
            raise ValueError(f"{prefix}n_layers={self.n_layers} must be >= 0")
        check_attention_args(
            self.dim,
            self.n_heads,
            self.n_kv_heads,
            self.window,
            self.n_global_tokens,
            causal=self.causal,
            prefix=prefix,
        )
        if self.position not in POSITIONS:
            raise ValueError(
                f"{prefix}position={self.position!r} is not a known position type; "
                f"choose one of {list(POSITIONS)}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"{prefix}position='rope' needs an even head size, got {self.head_dim}"
            )
        if self.position == "sinusoidal" and self.dim % 2:
            raise ValueError(f"{prefix}position='sinusoidal' needs an even dim, got {self.dim}")
        if self.max_positions <= 0:
            raise ValueError(f"{prefix}max_positions={self.max_positions} must be > 0")
        if self.rope_base <= 1:
            raise ValueError(f"{prefix}rope_base={self.rope_base} must be > 1")
        if self.rope_scaling <= 0:
            raise ValueError(f"{prefix}rope_scaling={self.rope_scaling} must be > 0")
        if self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 4:
            raise ValueError(
                f"{prefix}relative_buckets={self.relative_buckets} must be >= 4 and "
                f"relative_max_distance={self.relative_max_distance} larger than a quarter of it"
            )
        check_activation(self.activation, f"{prefix}activation")
        if self.mlp_hidden_dim is not None and self.mlp_hidden_dim <= 0:
            raise ValueError(f"{prefix}mlp_hidden_dim={self.mlp_hidden_dim} must be > 0")
        if self.mlp_ratio <= 0:
            raise ValueError(f"{prefix}mlp_ratio={self.mlp_ratio} must be > 0")
        if self.n_experts < 0:
            raise ValueError(f"{prefix}n_experts={self.n_experts} must be >= 0 (0 = dense)")
        if self.n_experts and not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(
                f"{prefix}moe_top_k={self.moe_top_k} must be between 1 and "
                f"n_experts={self.n_experts}"
            )
        if self.moe_capacity_factor <= 0:
            raise ValueError(f"{prefix}moe_capacity_factor={self.moe_capacity_factor} must be > 0")
        if self.norm not in NORMS:
            raise ValueError(
                f"{prefix}norm={self.norm!r} is not a known norm; choose one of {sorted(NORMS)}"
            )
        if self.norm_order not in NORM_ORDERS:
            raise ValueError(
                f"{prefix}norm_order={self.norm_order!r} must be one of {list(NORM_ORDERS)}"
            )
        for name in ("dropout", "attn_dropout", "input_dropout", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{prefix}{name}={value} must be in [0, 1)")
        if self.context_dim is not None and self.context_dim <= 0:
            raise ValueError(f"{prefix}context_dim={self.context_dim} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden_dim or int(self.mlp_ratio * self.dim)
