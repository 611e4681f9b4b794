"""Attention against a naive softmax(QK^T/sqrt(d) + bias)V reference and torch's own modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multimodal.layers import (
    ALiBi,
    Attention,
    RelativePositionBias,
    RotaryEmbedding,
    attend,
    banded_attend,
    position_mask,
)
from multimodal.layers.position import alibi_slopes
from tests.layers.reference import (
    alibi_bias,
    brute_force_mask,
    naive_attention,
    naive_rope,
    t5_bucket_scalar,
)

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads for 4 query heads
# name -> (causal, window, n_global, padded)
MASKS = {
    "none": (False, None, 0, False),
    "causal": (True, None, 0, False),
    "padding": (False, None, 0, True),
    "causal+padding": (True, None, 0, True),
    "window": (False, 3, 0, False),
    "causal-window": (True, 3, 0, False),
    "window+global": (False, 3, 2, False),
    "causal-window+global+padding": (True, 3, 2, True),
}
POSITIONS = ("none", "rope", "alibi", "t5")


def split_qkv(attn: Attention, x: torch.Tensor):
    B, T, _ = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, H_kv, D).transpose(1, 2)
    v = v.view(B, T, H_kv, D).transpose(1, 2)
    return q, k, v


def right_padding(batch: int, length: int) -> torch.Tensor:
    """Row b keeps its first length - 2b tokens (every query still sees key 0)."""
    lengths = torch.tensor([length - 2 * b for b in range(batch)])
    return torch.arange(length)[None, :] < lengths[:, None]


def reference_bias(position: str, module, n_heads: int, T: int) -> torch.Tensor | None:
    if position == "alibi":
        return alibi_bias([2 ** (-8 * (h + 1) / n_heads) for h in range(n_heads)], T, T)
    if position == "t5":
        buckets = torch.tensor(
            [
                [
                    t5_bucket_scalar(
                        j - i, module.bidirectional, module.num_buckets, module.max_distance
                    )
                    for j in range(T)
                ]
                for i in range(T)
            ]
        )
        return module.embedding.weight[buckets].permute(2, 0, 1)
    return None


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize(
    "mask_name,T",
    # 150 tokens take windowed attention through the banded (block by block) path
    [(name, 7) for name in MASKS] + [(name, 150) for name in MASKS if MASKS[name][1]],
)
def test_self_attention_equals_naive_reference(mask_name, T, heads, position):
    causal, window, n_global, padded = MASKS[mask_name]
    B, dim, H = 2, 32, 4
    attn = Attention(dim, H, HEADS[heads], causal=causal, window=window, n_global_tokens=n_global)
    x = torch.randn(B, T, dim)
    padding = right_padding(B, T) if padded else None
    rope = RotaryEmbedding(dim // H) if position == "rope" else None
    bias_module = {"alibi": ALiBi(H), "t5": RelativePositionBias(H, bidirectional=not causal)}.get(
        position
    )
    with torch.no_grad():
        if bias_module is not None and position == "t5":
            bias_module.embedding.weight.normal_()
        ours = attn(
            x,
            key_padding_mask=padding,
            rope=None if rope is None else rope(torch.arange(T)),
            position_bias=bias_module,
        ).output

        q, k, v = split_qkv(attn, x)
        if rope is not None:
            q, k = naive_rope(q, torch.arange(T)), naive_rope(k, torch.arange(T))
        allowed = brute_force_mask(
            B, T, T, causal=causal, window=window, n_global=n_global, padding=padding
        )
        expected, _ = naive_attention(q, k, v, allowed, reference_bias(position, bias_module, H, T))
        expected = attn.proj(expected.transpose(1, 2).reshape(B, T, dim))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", HEADS)
def test_cross_attention_equals_naive_reference(heads):
    B, T, S, dim, ctx_dim, H = 2, 5, 9, 32, 24, 4
    attn = Attention(dim, H, HEADS[heads], cross=True, context_dim=ctx_dim)
    x, context = torch.randn(B, T, dim), torch.randn(B, S, ctx_dim)
    padding = right_padding(B, S)
    with torch.no_grad():
        ours = attn(x, context, key_padding_mask=padding).output
        D, H_kv = dim // H, HEADS[heads]
        q = attn.q(x).view(B, T, H, D).transpose(1, 2)
        k, v = attn.kv(context).view(B, S, 2, H_kv, D).unbind(2)
        allowed = padding[:, None, :].expand(B, T, S)
        expected, _ = naive_attention(q, k.transpose(1, 2), v.transpose(1, 2), allowed, None)
        expected = attn.proj(expected.transpose(1, 2).reshape(B, T, dim))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_returned_weights_equal_naive_weights_and_output(causal):
    B, T, dim, H = 2, 6, 16, 2
    attn = Attention(dim, H, causal=causal).eval()
    x = torch.randn(B, T, dim)
    padding = right_padding(B, T)
    with torch.no_grad():
        fast = attn(x, key_padding_mask=padding)
        explicit = attn(x, key_padding_mask=padding, return_attention=True)
        q, k, v = split_qkv(attn, x)
        _, weights = naive_attention(
            q, k, v, brute_force_mask(B, T, T, causal=causal, padding=padding), None
        )
    assert fast.weights is None
    torch.testing.assert_close(explicit.weights, weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(explicit.output, fast.output, atol=1e-5, rtol=1e-5)


def test_matches_torch_multihead_attention_with_copied_weights():
    B, T, dim, H = 3, 8, 32, 4
    torch_mha = nn.MultiheadAttention(dim, H, batch_first=True).eval()
    ours = Attention(dim, H, causal=True).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(torch_mha.in_proj_weight)
        ours.qkv.bias.copy_(torch_mha.in_proj_bias)
        ours.proj.weight.copy_(torch_mha.out_proj.weight)
        ours.proj.bias.copy_(torch_mha.out_proj.bias)
        x = torch.randn(B, T, dim)
        padding = right_padding(B, T)
        causal_mask = torch.ones(T, T, dtype=torch.bool).triu(1)  # torch: True = masked
        expected, expected_weights = torch_mha(
            x, x, x, key_padding_mask=~padding, attn_mask=causal_mask, average_attn_weights=False
        )
        out = ours(x, key_padding_mask=padding, return_attention=True)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_gqa_equals_mha_with_key_value_heads_repeated():
    B, T, dim, H, H_kv = 2, 9, 32, 4, 2
    D = dim // H
    gqa = Attention(dim, H, H_kv, causal=True)
    mha = Attention(dim, H, causal=True)
    with torch.no_grad():
        q_w, k_w, v_w = gqa.qkv.weight.split([dim, H_kv * D, H_kv * D])
        q_b, k_b, v_b = gqa.qkv.bias.split([dim, H_kv * D, H_kv * D])

        def repeat(w):  # kv head h serves query heads h*group .. (h+1)*group-1
            return (
                w.view(H_kv, D, *w.shape[1:])
                .repeat_interleave(H // H_kv, dim=0)
                .reshape(dim, *w.shape[1:])
            )

        mha.qkv.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        mha.qkv.bias.copy_(torch.cat([q_b, repeat(k_b), repeat(v_b)]))
        mha.proj.load_state_dict(gqa.proj.state_dict())
        x = torch.randn(B, T, dim)
        torch.testing.assert_close(gqa(x).output, mha(x).output, atol=1e-5, rtol=1e-5)


def test_n_kv_heads_equal_to_n_heads_is_mha():
    a = Attention(32, 4, 4, causal=True)
    b = Attention(32, 4, causal=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(a(x).output, b(x).output)


@pytest.mark.parametrize("T", [10, 200])
def test_window_at_least_sequence_length_equals_full_causal(T):
    full = Attention(32, 4, 2, causal=True)
    windowed = Attention(32, 4, 2, causal=True, window=T)
    windowed.load_state_dict(full.state_dict())
    x = torch.randn(2, T, 32)
    torch.testing.assert_close(windowed(x).output, full(x).output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_global", [0, 3])
@pytest.mark.parametrize("n_kv", [4, 1])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("T,window,block", [(37, 4, 8), (64, 9, 16), (50, 1, 7), (20, 30, 8)])
def test_banded_equals_dense_masked_attention(causal, n_global, n_kv, with_bias, T, window, block):
    B, H, D = 2, 4, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, n_kv, T, D), torch.randn(B, n_kv, T, D)
    padding = right_padding(B, T)
    bias = ALiBi(H) if with_bias else None
    positions = torch.arange(T)
    mask = position_mask(
        positions, positions, causal=causal, window=window, n_global_tokens=n_global
    )
    dense_bias = None if bias is None else bias(positions - positions[:, None])
    expected, _ = attend(q, k, v, mask=mask & padding[:, None, None, :], bias=dense_bias)
    ours = banded_attend(
        q,
        k,
        v,
        window=window,
        causal=causal,
        n_global_tokens=n_global,
        key_padding_mask=padding,
        position_bias=bias,
        block=block,
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_query_with_no_visible_key_gives_zeros_on_both_paths():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    fast, _ = attend(q, k, v, mask=mask)
    explicit, weights = attend(q, k, v, mask=mask, return_weights=True)
    assert torch.all(fast[:, :, 1] == 0) and torch.all(explicit[:, :, 1] == 0)
    assert torch.all(weights[:, :, 1] == 0)


def test_rope_scores_depend_only_on_position_differences():
    D, T, shift = 16, 6, 11
    rope = RotaryEmbedding(D)
    q, k = torch.randn(1, 1, T, D), torch.randn(1, 1, T, D)

    def scores(offset: int) -> torch.Tensor:
        cos, sin = rope(torch.arange(T) + offset)
        from multimodal.layers import apply_rotary

        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(shift), atol=1e-5, rtol=1e-5)
    # and the rotation is the naive complex one
    cos, sin = rope(torch.arange(T))
    from multimodal.layers import apply_rotary

    torch.testing.assert_close(
        apply_rotary(q, cos, sin), naive_rope(q, torch.arange(T)), atol=1e-6, rtol=1e-5
    )


def test_rope_linear_scaling_divides_positions():
    D = 8
    scaled, plain = RotaryEmbedding(D, scaling=4.0), RotaryEmbedding(D)
    positions = torch.arange(0, 32, 4)
    for a, b in zip(scaled(positions), plain(positions // 4), strict=True):
        torch.testing.assert_close(a, b)
    x = torch.randn(1, 1, len(positions), D)
    from multimodal.layers import apply_rotary

    torch.testing.assert_close(
        apply_rotary(x, *scaled(positions)),
        naive_rope(x, positions, scaling=4.0),
        atol=1e-6,
        rtol=1e-5,
    )


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2.0**-i for i in range(1, 9)])
    # 6 heads: the 4-head sequence, then every other slope of the 8-head sequence
    assert alibi_slopes(6).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_equal_the_definition(bidirectional):
    module = RelativePositionBias(2, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    relative = torch.arange(-300, 301)
    from multimodal.layers.position import t5_bucket

    ours = t5_bucket(relative, bidirectional, 32, 128).tolist()
    expected = [t5_bucket_scalar(r, bidirectional, 32, 128) for r in relative.tolist()]
    assert ours == expected
    assert module(relative).shape == (2, len(relative))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"dim": 30, "n_heads": 4}, "n_heads"),
        ({"dim": 32, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 32, "n_heads": 4, "window": 0}, "window"),
        ({"dim": 32, "n_heads": 4, "n_global_tokens": 2}, "n_global_tokens"),
        ({"dim": 32, "n_heads": 4, "cross": True, "causal": True}, "cross"),
    ],
)
def test_bad_attention_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Attention(**kwargs)


def test_cross_attention_without_context_is_a_clear_error():
    with pytest.raises(ValueError, match="context"):
        Attention(16, 2, cross=True)(torch.randn(1, 3, 16))
