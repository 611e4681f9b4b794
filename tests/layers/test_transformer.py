"""Blocks and the stack: torch's own transformer layers with copied weights, KV-cache decoding,
gradient checkpointing, position embeddings and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multimodal.layers import (
    FeedForward,
    SinusoidalPositionEmbedding,
    Transformer,
    TransformerBlock,
    TransformerConfig,
    create_norm,
)


def torch_layer_and_block(
    layer_class, norm_order: str, **config
) -> tuple[nn.Module, TransformerBlock]:
    """A torch encoder/decoder layer and our block with its weights copied in."""
    dim, H, hidden = 32, 4, 64
    layer = layer_class(
        dim,
        H,
        hidden,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=norm_order == "pre",
    ).eval()
    block = TransformerBlock(
        TransformerConfig(
            dim=dim, n_layers=1, n_heads=H, mlp_hidden_dim=hidden, norm_order=norm_order, **config
        )
    ).eval()
    copy_torch_layer(block, layer)
    return layer, block


def copy_torch_layer(block: TransformerBlock, layer: nn.Module) -> None:
    """Load a torch TransformerEncoderLayer / TransformerDecoderLayer into our block."""
    with torch.no_grad():
        block.attn.qkv.weight.copy_(layer.self_attn.in_proj_weight)
        block.attn.qkv.bias.copy_(layer.self_attn.in_proj_bias)
        block.attn.proj.load_state_dict(layer.self_attn.out_proj.state_dict())
        block.mlp.fc1.load_state_dict(layer.linear1.state_dict())
        block.mlp.fc2.load_state_dict(layer.linear2.state_dict())
        block.norm1.load_state_dict(layer.norm1.state_dict())
        if block.cross_attn is not None:
            dim = block.cross_attn.q.weight.shape[0]
            block.cross_attn.q.weight.copy_(layer.multihead_attn.in_proj_weight[:dim])
            block.cross_attn.q.bias.copy_(layer.multihead_attn.in_proj_bias[:dim])
            block.cross_attn.kv.weight.copy_(layer.multihead_attn.in_proj_weight[dim:])
            block.cross_attn.kv.bias.copy_(layer.multihead_attn.in_proj_bias[dim:])
            block.cross_attn.proj.load_state_dict(layer.multihead_attn.out_proj.state_dict())
            block.cross_norm.load_state_dict(layer.norm2.state_dict())
            block.norm2.load_state_dict(layer.norm3.state_dict())
        else:
            block.norm2.load_state_dict(layer.norm2.state_dict())


@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_block_matches_torch_encoder_layer(norm_order):
    layer, block = torch_layer_and_block(nn.TransformerEncoderLayer, norm_order)
    dim = 32
    x = torch.randn(2, 9, dim)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=~padding)
        ours = block(x, key_padding_mask=padding).hidden
    # torch's fast path zeroes padded positions; compare the real tokens
    torch.testing.assert_close(ours[padding], expected[padding], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_cross_attention_block_matches_torch_decoder_layer(norm_order):
    layer, block = torch_layer_and_block(
        nn.TransformerDecoderLayer, norm_order, causal=True, cross_attention=True
    )
    dim, T, S = 32, 7, 11
    x, memory = torch.randn(2, T, dim), torch.randn(2, S, dim)
    memory_padding = torch.ones(2, S, dtype=torch.bool)
    memory_padding[0, 8:] = False
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    with torch.no_grad():
        expected = layer(
            x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=~memory_padding
        )
        ours = block(x, context=memory, context_padding_mask=memory_padding).hidden
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def decoder_config(**overrides) -> TransformerConfig:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, causal=True, position="rope")
    return TransformerConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA + RoPE
        {"n_kv_heads": 1, "position": "alibi"},
        {"position": "t5"},
        {"position": "learned", "max_positions": 32},
        {"window": 4},
        {"cross_attention": True, "context_dim": 24},
        {"n_experts": 4, "moe_top_k": 2, "moe_capacity_factor": 2.0},
    ],
    ids=["gqa-rope", "mqa-alibi", "t5", "learned", "window", "cross", "moe"],
)
def test_kv_cache_decoding_equals_full_causal_forward(overrides):
    model = Transformer(decoder_config(**overrides)).eval()
    B, T = 2, 12
    x = torch.randn(B, T, 32)
    context = torch.randn(B, 5, 24) if model.config.cross_attention else None
    with torch.no_grad():
        full = model(x, context=context).hidden
        cache = model.init_cache(capacity=4)  # small, so the cache also has to grow
        prefix = model(x[:, :3], context=context, cache=cache).hidden  # prefill 3 tokens at once
        steps = [model(x[:, t : t + 1], context=context, cache=cache).hidden for t in range(3, T)]
    incremental = torch.cat([prefix, *steps], dim=1)
    if model.config.n_experts:
        # expert capacity depends on how many tokens a call routes; compare where none dropped
        assert model(x).moe[0].dropped_fraction == 0
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)
    assert cache[0].self_attn.length == T


def test_kv_cache_with_left_padding_matches_the_unpadded_sequence():
    model = Transformer(decoder_config(position="alibi")).eval()
    x = torch.randn(1, 6, 32)
    padded = torch.cat([torch.zeros(1, 2, 32), x], dim=1)
    padding = torch.tensor([[False, False] + [True] * 6])
    with torch.no_grad():
        expected = model(x).hidden
        cache = model.init_cache()
        out = [model(padded[:, :3], key_padding_mask=padding[:, :3], cache=cache).hidden]
        for t in range(3, 8):
            out.append(
                model(
                    padded[:, t : t + 1], key_padding_mask=padding[:, : t + 1], cache=cache
                ).hidden
            )
    # ALiBi sees relative distances only, so left padding leaves the real tokens unchanged
    torch.testing.assert_close(torch.cat(out, dim=1)[:, 2:], expected, atol=1e-5, rtol=1e-5)


def test_cache_reorder_selects_batch_rows():
    model = Transformer(decoder_config()).eval()
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        cache = model.init_cache()
        model(x, cache=cache)
        for layer in cache:
            layer.self_attn.reorder(torch.tensor([2, 2, 0]))
        step = torch.randn(3, 1, 32)
        out = model(step, cache=cache).hidden
        expected = model(torch.cat([x[[2, 2, 0]], step], dim=1)).hidden[:, -1:]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_equal_loss_and_gradients():
    config = TransformerConfig(dim=32, n_layers=3, n_heads=4, position="learned", max_positions=16)
    model = Transformer(config).train()
    x = torch.randn(2, 10, 32)

    def loss_and_grads():
        model.zero_grad()
        loss = model(x).hidden.pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_drop_path_rates_rise_linearly_and_are_identity_in_eval():
    config = TransformerConfig(dim=16, n_layers=5, n_heads=2, drop_path=0.4)
    model = Transformer(config)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    x = torch.randn(8, 5, 16)
    model.eval()
    torch.testing.assert_close(model(x).hidden, model(x).hidden)
    model.train()
    with torch.no_grad():
        # in training the last block drops branches for some samples: two calls differ
        assert not torch.allclose(model(x).hidden, model(x).hidden)


def test_learned_positions_too_long_raise():
    model = Transformer(
        TransformerConfig(dim=16, n_layers=1, n_heads=2, position="learned", max_positions=8)
    )
    with pytest.raises(ValueError, match="max_positions=8"):
        model(torch.randn(1, 9, 16))


def test_input_of_wrong_width_is_a_clear_error():
    model = Transformer(TransformerConfig(dim=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 16\)"):
        model(torch.randn(1, 4, 12))


def test_sinusoidal_embedding_matches_the_formula():
    dim, T = 8, 5
    emb = SinusoidalPositionEmbedding(dim)(torch.arange(T))
    for pos in range(T):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert emb[pos, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert emb[pos, dim // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rmsnorm_and_layernorm_match_their_formulas():
    x = torch.randn(3, 5, 16)
    rms = create_norm("rmsnorm", 16, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    torch.testing.assert_close(rms(x), expected, atol=1e-6, rtol=1e-5)
    ln = create_norm("layernorm", 16)
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln(x), expected, atol=1e-5, rtol=1e-5)


def tanh_gelu(a: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, written out."""
    return 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))


@pytest.mark.parametrize(
    "activation,reference",
    [
        ("relu", lambda a, b: torch.relu(a)),
        ("gelu", lambda a, b: 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))),
        ("swiglu", lambda a, b: a * torch.sigmoid(a) * b),
        ("gelu_tanh", lambda a, b: tanh_gelu(a)),
        ("geglu_tanh", lambda a, b: tanh_gelu(a) * b),
    ],
)
def test_feed_forward_matches_its_formula(activation, reference):
    ff = FeedForward(8, 12, activation)
    x = torch.randn(4, 8)
    h = x @ ff.fc1.weight.T + ff.fc1.bias
    a, b = h.chunk(2, dim=-1) if ff.gated else (h, None)
    expected = reference(a, b) @ ff.fc2.weight.T + ff.fc2.bias
    torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"dim": 30, "n_heads": 4}, "TransformerConfig.n_heads"),
        ({"n_heads": 8, "n_kv_heads": 3}, "TransformerConfig.n_kv_heads"),
        ({"window": 0}, "TransformerConfig.window"),
        ({"window": -4}, "TransformerConfig.window"),
        ({"position": "spiral"}, "TransformerConfig.position"),
        ({"norm": "batchnorm"}, "TransformerConfig.norm"),
        ({"norm_order": "sandwich"}, "TransformerConfig.norm_order"),
        ({"activation": "tanh"}, "TransformerConfig.activation"),
        ({"n_experts": 4, "moe_top_k": 5}, "TransformerConfig.moe_top_k"),
        ({"dropout": 1.5}, "TransformerConfig.dropout"),
        ({"drop_path": -0.1}, "TransformerConfig.drop_path"),
        ({"n_global_tokens": 1}, "TransformerConfig.n_global_tokens"),
        ({"max_positions": 0}, "TransformerConfig.max_positions"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TransformerConfig(**kwargs)


def test_unknown_norm_lists_the_choices():
    with pytest.raises(ValueError, match="layernorm"):
        create_norm("groupnorm", 8)


def test_cross_attention_keys_and_values_are_computed_once_per_sequence():
    model = Transformer(decoder_config(cross_attention=True, context_dim=24)).eval()
    calls = []
    model.blocks[0].cross_attn.kv.register_forward_hook(lambda *_: calls.append(1))
    context = torch.randn(2, 5, 24)
    with torch.no_grad():
        cache = model.init_cache()
        for _ in range(4):
            model(torch.randn(2, 1, 32), context=context, cache=cache)
    assert len(calls) == 1
    assert cache[0].cross_attn.length == 5


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"position": "alibi", "window": 8},
        {"position": "t5", "causal": False},
        {"n_experts": 4, "activation": "swiglu", "norm": "rmsnorm"},
        {"cross_attention": True},
    ],
    ids=["rope", "alibi-window", "t5", "moe-swiglu-rmsnorm", "cross"],
)
def test_bf16_autocast_stays_close_to_fp32(overrides):
    model = Transformer(decoder_config(**overrides))
    x = torch.randn(2, 160, 32)  # long enough for the banded sliding-window path
    context = torch.randn(2, 7, 32) if model.config.cross_attention else None
    expected = model(x, context=context).hidden
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, context=context)
        out.hidden.float().pow(2).mean().backward()
    assert out.hidden.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(out.hidden).all()
    # bf16 keeps ~3 significant digits; errors stay well below the activations' unit scale
    assert (out.hidden.float() - expected).abs().mean() < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
