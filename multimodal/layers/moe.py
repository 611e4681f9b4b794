"""Mixture-of-Experts feed-forward: a router sends each token to its top-k experts.

Written here because none of our dependencies has one. Experts have a fixed capacity
(capacity_factor * tokens * k / n_experts); assignments beyond it are dropped (the token keeps
its residual) and reported. Dispatch uses fixed shapes (n_experts, capacity, dim) so that the
experts run as one batched matmul and the module compiles.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.layers.mlp import ACTIVATIONS, check_activation


class MoEStats(NamedTuple):
    aux_loss: Tensor  # load-balancing loss (scalar): 1.0 for uniform routing, n_experts at worst
    dropped_fraction: Tensor  # share of token->expert assignments dropped over capacity
    tokens_per_expert: Tensor  # (n_experts,) assignments each expert processed


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of `n_experts` feed-forward networks.

    Args:
        dim: model width.
        hidden_dim: hidden width of every expert.
        n_experts: number of experts.
        top_k: experts per token; their gate probabilities are renormalised to sum to 1.
        capacity_factor: slack over a perfectly even load; n_experts / top_k never drops.
        activation: as in `FeedForward` ("gelu", "swiglu", ...).
        bias: biases in the experts.
        dropout: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts={n_experts} must be >= 1")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
        check_activation(activation)
        act, self.gated = ACTIVATIONS[activation]
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(dim, n_experts, bias=False)
        width = hidden_dim * (2 if self.gated else 1)
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, width))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.b1 = nn.Parameter(torch.zeros(n_experts, 1, width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(n_experts, 1, dim)) if bias else None
        self.act = act()
        self.dropout = nn.Dropout(dropout)
        # the same scale as nn.Linear's default initialisation, per expert
        nn.init.uniform_(self.w1, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        nn.init.uniform_(self.w2, -1 / math.sqrt(hidden_dim), 1 / math.sqrt(hidden_dim))

    def capacity(self, n_tokens: int) -> int:
        """Assignments one expert takes for a batch of n_tokens tokens."""
        even_share = n_tokens * self.top_k / self.n_experts
        return max(1, min(n_tokens, math.ceil(self.capacity_factor * even_share)))

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        N, E, k = x.shape[0], self.n_experts, self.top_k
        # routing in fp32, also under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)  # (N, E)
        gate, expert = probs.topk(k, dim=-1)  # (N, k)
        gate = gate / gate.sum(dim=-1, keepdim=True)

        # queue position of each assignment in its expert; first choices of every token come
        # before second choices, so overflow drops the least preferred assignments first
        expert = expert.t().reshape(-1)  # (k * N,) choice-major
        gate = gate.t().reshape(-1)
        token = torch.arange(N, device=x.device).repeat(k)
        one_hot = F.one_hot(expert, E)  # (k * N, E)
        queue = (one_hot.cumsum(dim=0) - 1).gather(1, expert[:, None]).squeeze(1)
        capacity = self.capacity(N)
        kept = queue < capacity
        overflow_slot = E * capacity  # dropped assignments land in a slot that is thrown away
        slot = torch.where(kept, expert * capacity + queue, overflow_slot)

        buffer = x.new_zeros(E * capacity + 1, shape[-1]).index_add(0, slot, x[token])
        h = buffer[:-1].view(E, capacity, shape[-1])
        h = torch.bmm(h, self.w1) if self.b1 is None else torch.baddbmm(self.b1, h, self.w1)
        if self.gated:
            g, up = h.chunk(2, dim=-1)
            h = self.act(g) * up
        else:
            h = self.act(h)
        h = torch.bmm(h, self.w2) if self.b2 is None else torch.baddbmm(self.b2, h, self.w2)
        h = torch.cat([h.reshape(E * capacity, -1), h.new_zeros(1, h.shape[-1])])
        weight = (gate * kept).to(h.dtype)
        out = (h[slot] * weight[:, None]).view(k, N, -1).sum(dim=0)

        # Switch-Transformer balance loss: E * sum_e (share of assignments to e) * (mean prob of e)
        share = one_hot.float().mean(dim=0)
        aux_loss = E * (share * probs.mean(dim=0)).sum()
        stats = MoEStats(
            aux_loss=aux_loss,
            dropped_fraction=1.0 - kept.float().mean(),
            tokens_per_expert=(one_hot * kept[:, None]).sum(dim=0),
        )
        return self.dropout(out).view(shape), stats
