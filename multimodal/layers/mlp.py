"""Position-wise feed-forward network: ReLU/GELU MLP or a gated (SwiGLU) MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TanhGELU(nn.GELU):
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): what GPT-2
    and T5 v1.1 ("gelu_new") were trained with."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


# name -> (activation factory, gated). A gated MLP computes act(x W_gate) * (x W_up).
ACTIVATIONS: dict[str, tuple[type[nn.Module], bool]] = {
    "relu": (nn.ReLU, False),
    "gelu": (nn.GELU, False),
    "gelu_tanh": (TanhGELU, False),
    "quick_gelu": (QuickGELU, False),
    "swiglu": (nn.SiLU, True),
    "geglu": (nn.GELU, True),
    "geglu_tanh": (TanhGELU, True),
}


def check_activation(name: str, field: str = "activation") -> None:
    """Raise ValueError naming `field` when `name` is not a known activation."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{field}={name!r} is not a known activation; choose one of {sorted(ACTIVATIONS)}"
        )


class FeedForward(nn.Module):
    """Two-layer MLP applied to every token: dim -> hidden_dim -> dim.

    Args:
        dim: model width.
        hidden_dim: width of the hidden layer (for gated activations, of each of its two halves).
        activation: one of `ACTIVATIONS` ("relu", "gelu", "gelu_tanh", "quick_gelu", "swiglu",
            "geglu", "geglu_tanh").
        bias: whether the linear layers have biases.
        dropout: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        *,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_activation(activation)
        act, self.gated = ACTIVATIONS[activation]
        # the gate and up projections of a gated MLP are fused into one matmul
        self.fc1 = nn.Linear(dim, hidden_dim * (2 if self.gated else 1), bias=bias)
        self.act = act()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.fc2(h))
