"""Mixture of experts against a per-token loop over the chosen experts."""

from __future__ import annotations

import pytest
import torch

from multimodal.layers import MoEFeedForward, Transformer, TransformerConfig


def expert_mlp(moe: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ moe.w1[e] + moe.b1[e, 0]
    if moe.gated:
        g, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * up
    else:
        h = torch.nn.functional.gelu(h)
    return h @ moe.w2[e] + moe.b2[e, 0]


def loop_reference(moe: MoEFeedForward, x: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each token, each of its top-k experts in order of preference; an expert takes the first
    `capacity` assignments, first choices of all tokens before second choices."""
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    gates, experts = probs.topk(moe.top_k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    load = [0] * moe.n_experts
    out = torch.zeros_like(x)
    for choice in range(moe.top_k):
        for t in range(x.shape[0]):
            e = experts[t, choice].item()
            if load[e] < capacity:
                load[e] += 1
                out[t] += gates[t, choice] * expert_mlp(moe, e, x[t])
    return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_each_token_goes_to_its_top_k_experts(activation, top_k):
    moe = MoEFeedForward(
        8, 16, n_experts=4, top_k=top_k, capacity_factor=4 / top_k, activation=activation
    )
    with torch.no_grad():
        moe.b1.normal_()
        moe.b2.normal_()
    x = torch.randn(20, 8)
    out, stats = moe(x)
    torch.testing.assert_close(out, loop_reference(moe, x, capacity=20), atol=1e-5, rtol=1e-5)
    assert stats.dropped_fraction == 0
    assert stats.tokens_per_expert.sum() == 20 * top_k


def test_capacity_overflow_is_dropped_in_order_and_reported():
    moe = MoEFeedForward(8, 16, n_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(16, 8)
    x[:, 0] = x[:, 0].abs() + 1.0
    out, stats = moe(x)
    capacity = moe.capacity(16)
    assert capacity == 4
    assert stats.tokens_per_expert.tolist() == [4, 0, 0, 0]
    assert stats.dropped_fraction.item() == pytest.approx(12 / 16)
    torch.testing.assert_close(out, loop_reference(moe, x, capacity), atol=1e-5, rtol=1e-5)
    assert torch.all(out[4:] == 0)  # dropped tokens keep only their residual in a block


def test_aux_loss_is_minimal_for_uniform_routing():
    moe = MoEFeedForward(8, 16, n_experts=4, top_k=2)
    x = torch.randn(64, 8)
    with torch.no_grad():
        moe.router.weight.zero_()  # every expert equally likely
        uniform = moe(x)[1].aux_loss.item()
        moe.router.weight.normal_()
        random_routing = moe(x)[1].aux_loss.item()
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 100.0
        x[:, 0] = x[:, 0].abs() + 1.0
        collapsed = moe(x)[1].aux_loss.item()  # everything to expert 0
    assert uniform == pytest.approx(1.0)
    assert random_routing > uniform
    # all first choices on one expert with probability ~1: E * (1/2 * 1) = 2 for top-2 of 4
    assert collapsed == pytest.approx(2.0, abs=1e-3)


def test_gradients_reach_the_router_through_gates_and_aux_loss():
    moe = MoEFeedForward(8, 16, n_experts=4, top_k=2)
    x = torch.randn(10, 8)
    out, _ = moe(x)
    out.pow(2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    moe.zero_grad()
    moe(x)[1].aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_stack_sums_aux_losses_of_its_moe_blocks():
    config = TransformerConfig(dim=16, n_layers=3, n_heads=2, n_experts=4, moe_top_k=1)
    out = Transformer(config)(torch.randn(2, 5, 16))
    assert len(out.moe) == 3
    torch.testing.assert_close(out.aux_loss, sum(m.aux_loss for m in out.moe))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_experts": 0}, "n_experts"),
        ({"top_k": 5}, "top_k"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
    ],
)
def test_bad_moe_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEFeedForward(**{"dim": 8, "hidden_dim": 16, "n_experts": 4, **kwargs})
