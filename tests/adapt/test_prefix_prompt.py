"""Prefix tuning and prompt tuning against hand-written references: naive attention over
[prefix; tokens], towers run on hand-concatenated embeddings, KV-cache generation against
recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multimodal.adapt.prefix import Prefix, PrefixConfig, add_prefixes
from multimodal.adapt.prompt import PromptConfig, add_prompts
from multimodal.layers import ALiBi, Attention, RotaryEmbedding, TransformerConfig
from multimodal.models.clip import CLIP
from tests.layers.reference import alibi_bias, brute_force_mask, naive_attention, naive_rope
from text import DecoderLM, EncoderDecoderLM, TextConfig
from text.encoder import EncoderLM
from text.generation import GenerationConfig, generate
from text.text_encoder import TextEncoder
from vision.timm_encoder import TimmEncoder
from vision.vit import ViT, ViTConfig

VOCAB = 50
P = 3
# name -> (causal, window, n_global, padded)
MASKS = {
    "none": (False, None, 0, False),
    "causal": (True, None, 0, False),
    "padding": (False, None, 0, True),
    "causal+padding": (True, None, 0, True),
    "causal-window": (True, 3, 0, False),
    "window+global+padding": (False, 3, 2, True),
}


def split_qkv(attn: Attention, x: torch.Tensor):
    B, T, _ = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split([H * D, H_kv * D, H_kv * D], -1)
    return (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))


def prefixed_attention(length: int = P, **kwargs) -> Attention:
    attn = Attention(32, 4, kwargs.pop("n_kv_heads", 2), **kwargs)
    attn.kv_prefix = Prefix(attn.n_kv_heads, attn.head_dim, length, init_std=1.0)
    return attn


def text_config(causal: bool = True, **overrides) -> TextConfig:
    stack = dict(dim=32, n_layers=2, n_heads=4, causal=causal, position="learned")
    stack["max_positions"] = 24
    return TextConfig(
        vocab_size=VOCAB,
        tie_embeddings=False,
        bos_id=1,
        eos_id=2,
        transformer=TransformerConfig(**stack | overrides),
    )


def lively(model: nn.Module) -> nn.Module:
    """Peaked, context-dependent next-token distributions (no near-ties), as in
    tests/text/test_generation.py."""
    with torch.no_grad():
        model.embed.token.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def tiny_vit(**overrides) -> ViT:
    config = dict(image_size=16, patch_size=4, dim=32, n_layers=2, n_heads=4) | overrides
    return ViT(ViTConfig(**config)).eval()


def right_padding(batch: int, length: int) -> torch.Tensor:
    lengths = torch.tensor([length - 2 * b for b in range(batch)])
    return torch.arange(length)[None, :] < lengths[:, None]


# ---------------------------------------------------------------- prefix: one attention layer


@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("gated", [False, True])
def test_prefix_attention_equals_naive_attention_over_prefix_and_tokens(mask_name, position, gated):
    causal, window, n_global, padded = MASKS[mask_name]
    B, T, H = 2, 7, 4
    attn = prefixed_attention(causal=causal, window=window, n_global_tokens=n_global)
    if gated:
        attn.kv_prefix.gate = nn.Parameter(torch.tensor(0.7))
    x = torch.randn(B, T, 32)
    padding = right_padding(B, T) if padded else None
    rope = RotaryEmbedding(8) if position == "rope" else None
    alibi = ALiBi(H) if position == "alibi" else None
    with torch.no_grad():
        ours = attn(
            x,
            key_padding_mask=padding,
            rope=None if rope is None else rope(torch.arange(T)),
            position_bias=alibi,
        ).output

        q, k, v = split_qkv(attn, x)
        if rope is not None:  # tokens rotated, the prefix not
            q, k = naive_rope(q, torch.arange(T)), naive_rope(k, torch.arange(T))
        pk = attn.kv_prefix.keys.expand(B, -1, -1, -1)
        pv = attn.kv_prefix.values.expand(B, -1, -1, -1)
        allowed = brute_force_mask(
            B, T, T, causal=causal, window=window, n_global=n_global, padding=padding
        )
        bias = None
        if alibi is not None:
            bias = alibi_bias([2 ** (-8 * (h + 1) / H) for h in range(H)], T, T)
        if gated:  # tokens as without a prefix + tanh(gate) * attention over the prefix alone
            tokens, _ = naive_attention(q, k, v, allowed, bias)
            prefix_only, _ = naive_attention(q, pk, pv, None, None)
            expected = tokens + torch.tanh(torch.tensor(0.7)) * prefix_only
        else:  # one softmax; the prefix always visible, with zero position bias
            allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool), allowed], dim=-1)
            if bias is not None:
                bias = torch.cat([torch.zeros(H, T, P), bias], dim=-1)
            expected, _ = naive_attention(
                q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), allowed, bias
            )
        expected = attn.proj(expected.transpose(1, 2).reshape(B, T, 32))
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_prefix_banded_window_gated_equals_dense_reference():
    """A long windowed sequence takes the banded kernel; the gated prefix adds on top."""
    B, T = 1, 150
    attn = prefixed_attention(causal=True, window=4)
    attn.kv_prefix.gate = nn.Parameter(torch.tensor(-0.4))
    x = torch.randn(B, T, 32)
    with torch.no_grad():
        ours = attn(x).output
        q, k, v = split_qkv(attn, x)
        tokens, _ = naive_attention(q, k, v, brute_force_mask(B, T, T, causal=True, window=4), None)
        prefix_only, _ = naive_attention(
            q, attn.kv_prefix.keys[None], attn.kv_prefix.values[None], None, None
        )
        expected = tokens + torch.tanh(torch.tensor(-0.4)) * prefix_only
        expected = attn.proj(expected.transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_returned_weights_cover_prefix_and_tokens():
    attn = prefixed_attention(causal=True)
    out = attn(torch.randn(2, 5, 32), return_attention=True)
    assert out.weights.shape == (2, 4, 5, P + 5)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 4, 5))
    assert (out.weights[..., :P] > 0).all()  # the prefix is visible to every query


def test_reparametrised_prefix_comes_from_the_mlp():
    prefix = Prefix(2, 8, P, reparam_hidden=16, dim=32)
    keys, values = prefix().keys, prefix().values
    kv = prefix.mlp(prefix.embedding)  # (P, 2 * H_kv * D): [keys | values], heads inside
    torch.testing.assert_close(keys, kv[:, :16].view(P, 2, 8).transpose(0, 1))
    torch.testing.assert_close(values, kv[:, 16:].view(P, 2, 8).transpose(0, 1))
    assert prefix.keys is None and prefix.values is None


# ----------------------------------------------------------- prefix: towers and generation


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_decoder_prefix_generation_with_kv_cache_equals_recomputation(position):
    torch.manual_seed(0)
    model = lively(DecoderLM(text_config(position=position, n_kv_heads=2)))
    ids = torch.randint(3, VOCAB, (2, 5))
    base_logits = model(ids).logits
    names = add_prefixes(model, PrefixConfig(length=4, reparam_hidden=8, init_std=1.0))
    assert len(names) == 2 * 5  # per block: embedding and the two Linear layers of the MLP
    full = model(ids).logits
    assert full.shape == base_logits.shape
    assert (full - base_logits).abs().max() > 1e-3  # the prefix is used
    cache = model.init_cache(capacity=4)  # grows while decoding
    steps = [model(ids[:, :3], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(3, 5)]
    assert cache[0].self_attn.length == 5  # tokens only: the prefix is never cached
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    outs = [
        generate(model, ids, config=GenerationConfig(max_new_tokens=6, use_cache=use_cache))
        for use_cache in (True, False)
    ]
    assert torch.equal(outs[0].sequences, outs[1].sequences)


def test_prefix_names_and_state_dict():
    model = DecoderLM(text_config())
    names = add_prefixes(model, PrefixConfig(length=2, layers=[1], gate=True))
    assert names == [
        "transformer.blocks.1.attn.kv_prefix.keys",
        "transformer.blocks.1.attn.kv_prefix.values",
        "transformer.blocks.1.attn.kv_prefix.gate",
    ]
    params = dict(model.named_parameters())
    assert set(names) <= set(params) and set(names) <= set(model.state_dict())
    assert model.transformer.blocks[0].attn.kv_prefix is None
    reloaded = DecoderLM(text_config())
    add_prefixes(reloaded, PrefixConfig(length=2, layers=[1], gate=True))
    reloaded.load_state_dict(model.state_dict())  # strict: the same keys


def test_encoder_decoder_prefix_reaches_both_self_attentions_not_cross():
    stack = TransformerConfig(dim=32, n_layers=2, n_heads=4, position="t5")
    model = EncoderDecoderLM(TextConfig(vocab_size=VOCAB, bos_id=1, transformer=stack))
    names = add_prefixes(model, PrefixConfig(length=2))
    assert {n.split(".blocks")[0] for n in names} == {"encoder", "decoder"}
    assert all(b.cross_attn.kv_prefix is None for b in model.decoder.blocks)
    model.eval()
    src = torch.randint(3, VOCAB, (2, 6))
    outs = [
        generate(model, src, config=GenerationConfig(max_new_tokens=4, use_cache=use_cache))
        for use_cache in (True, False)
    ]
    assert torch.equal(outs[0].sequences, outs[1].sequences)


def clip() -> CLIP:
    return CLIP(tiny_vit(), TextEncoder(text_config(), out_dim=16), embed_dim=16).eval()


def clip_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = right_padding(2, 6)
    return torch.randn(2, 3, 16, 16), ids, mask


def test_gated_prefix_leaves_outputs_unchanged_at_init_and_ungated_does_not():
    torch.manual_seed(0)
    images, ids, mask = clip_inputs()
    outputs = {}
    for gate in (None, True, False):
        torch.manual_seed(1)
        model = clip()
        if gate is not None:
            add_prefixes(model, PrefixConfig(length=4, gate=gate, init_std=1.0))
        out = model(images, ids, mask)
        outputs[gate] = torch.cat([out.image_features, out.text_features])
    assert (outputs[True] - outputs[None]).abs().max() <= 1e-6
    assert (outputs[False] - outputs[None]).abs().max() > 1e-3


def test_only_new_parameters_get_gradients_when_the_base_is_frozen():
    torch.manual_seed(0)
    model = clip()
    model.requires_grad_(False)
    base = dict(model.named_parameters())
    new = add_prefixes(model, PrefixConfig(length=2, gate=True))
    new += add_prompts(model, PromptConfig(length=2, depth="shallow"))
    images, ids, mask = clip_inputs()
    out = model(images, ids, mask)
    (out.image_features @ out.text_features.T).sum().backward()
    assert all(p.grad is None for p in base.values())
    params = dict(model.named_parameters())
    assert set(params) - set(base) == set(new)
    for name in new:  # prefixes behind a zero gate: only the gates move at first
        grad = params[name].grad
        assert grad is not None, name
        if name.endswith(("keys", "values")):
            assert torch.count_nonzero(grad) == 0, name
        else:
            assert torch.count_nonzero(grad) > 0, name


# ------------------------------------------------------------------ soft prompts (text)


@pytest.mark.parametrize("pool", ["eot", "cls", "mean"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_text_encoder_prompt_equals_hand_concatenated_embeddings(pool, with_mask):
    torch.manual_seed(0)
    model = TextEncoder(text_config(), pool=pool, out_dim=16).eval()
    ids = torch.randint(3, VOCAB, (3, 6))
    ids[1, 4:] = 0  # pad_id: trailing padding
    ids[2, 2:] = 0
    mask = ids != 0
    base = model(ids, mask if with_mask else None)
    add_prompts(model, PromptConfig(length=P, init="vocab"))
    out = model(ids, mask if with_mask else None)
    with torch.no_grad():
        x = torch.cat([model.prompt.expand(3, -1, -1), model.embed(ids)], dim=1)
        positions = torch.cat(
            [torch.zeros(3, P, dtype=torch.long), torch.arange(6).expand(3, 6)], 1
        )
        full_mask = torch.cat([torch.ones(3, P, dtype=torch.bool), mask], 1)
        hidden = model.transformer(
            x, key_padding_mask=full_mask if with_mask else None, positions=positions
        ).hidden
        last = torch.tensor([5, 3, 1])  # the last real token of each row
        rows = torch.arange(3)
        pooled = {
            "eot": hidden[rows, P + last],
            "cls": hidden[:, P],
            "mean": (hidden[:, P:] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
        }[pool]
    assert out.tokens.shape == base.tokens.shape == (3, 6, 32)
    torch.testing.assert_close(out.tokens, hidden[:, P:])
    torch.testing.assert_close(out.pooled, model.projection(pooled))


def test_vocab_init_copies_token_embeddings_and_skips_pad():
    torch.manual_seed(0)
    model = TextEncoder(text_config())
    add_prompts(model, PromptConfig(length=20, init="vocab"))
    table = model.embed.token.weight
    matches = (model.prompt[:, None] == table[None]).all(-1)  # (P, V)
    assert matches.sum(1).eq(1).all() and not matches[:, 0].any()


@pytest.mark.parametrize("position", ["learned", "rope", "t5"])
def test_decoder_prompt_logits_cover_original_positions_and_cache_agrees(position):
    torch.manual_seed(0)
    model = lively(DecoderLM(text_config(position=position)))
    ids = torch.randint(3, VOCAB, (2, 5))
    base = model(ids)
    add_prompts(model, PromptConfig(length=P))
    out = model(ids)
    assert out.logits.shape == base.logits.shape and out.hidden.shape == base.hidden.shape
    with torch.no_grad():
        x = torch.cat([model.prompt.expand(2, -1, -1), model.embed(ids)], dim=1)
        positions = torch.cat(
            [torch.zeros(2, P, dtype=torch.long), torch.arange(5).expand(2, 5)], 1
        )
        hidden = model.transformer(x, positions=positions).hidden[:, P:]
    torch.testing.assert_close(out.logits, model.lm_head(hidden))
    cache = model.init_cache()
    steps = [model(ids[:, :3], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(3, 5)]
    assert cache[0].self_attn.length == P + 5  # the prompt is cached once
    torch.testing.assert_close(torch.cat(steps, dim=1), out.logits, atol=1e-5, rtol=0)


def test_decoder_prompt_left_padded_generation_equals_each_prompt_alone():
    torch.manual_seed(0)
    model = lively(DecoderLM(text_config(position="rope")))
    add_prompts(model, PromptConfig(length=P))
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (3, 6)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, 6 - len(p) :], mask[row, 6 - len(p) :] = p, True
    config = GenerationConfig(max_new_tokens=5, eos_id=None)
    for use_cache in (True, False):
        config.use_cache = use_cache
        batched = generate(model, ids, attention_mask=mask, config=config)
        for row, p in enumerate(prompts):
            alone = generate(model, p[None], config=config)
            assert torch.equal(batched.sequences[row], alone.sequences[0])


def test_encoder_and_encoder_decoder_prompts_keep_output_lengths():
    torch.manual_seed(0)
    encoder = EncoderLM(text_config(causal=False)).eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = right_padding(2, 6)
    base = encoder(ids, attention_mask=mask).hidden
    add_prompts(encoder, PromptConfig(length=P))
    out = encoder(ids, attention_mask=mask).hidden
    assert out.shape == base.shape and (out - base).abs().max() > 1e-4

    stack = TransformerConfig(dim=32, n_layers=2, n_heads=4, position="t5")
    model = EncoderDecoderLM(TextConfig(vocab_size=VOCAB, bos_id=1, transformer=stack)).eval()
    add_prompts(model, PromptConfig(length=P))
    assert model.encode(ids, mask).shape == (2, 6, 32)
    decoder_ids = torch.randint(3, VOCAB, (2, 4))
    assert model(ids, decoder_ids, attention_mask=mask).logits.shape == (2, 4, VOCAB)
    outs = [
        generate(
            model,
            ids,
            attention_mask=mask,
            config=GenerationConfig(max_new_tokens=4, use_cache=use_cache),
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(outs[0].sequences, outs[1].sequences)


# --------------------------------------------------------------------------- VPT (ViT)


def vit_reference(vit: ViT, images: torch.Tensor, deep: bool) -> tuple[torch.Tensor, ...]:
    """ViT forward written out: prompts after the class/register tokens, replaced before every
    later block when deep, pooling over the patch tokens only."""
    n, prompt = vit.config.n_prefix, vit.prompt[0]
    x = vit._embed(images)
    B = x.shape[0]
    x = torch.cat([x[:, :n], prompt.expand(B, -1, -1), x[:, n:]], dim=1)
    for i, block in enumerate(vit.encoder.blocks):
        if deep and i:
            x = x.clone()
            x[:, n : n + P] = vit.encoder.deep_prompts[i - 1]
        x = block(x).hidden
    x = vit.encoder.norm(x)
    patches = x[:, n + P :]
    if vit.config.pool == "token":
        pooled = x[:, 0]
    elif vit.config.pool == "avg":
        pooled = patches.mean(dim=1)
    else:
        pooled = vit.attn_pool(patches)
    return vit.fc_norm(pooled), patches


@pytest.mark.parametrize("depth", ["shallow", "deep"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"pool": "avg", "class_token": False}, {"pool": "attn", "n_registers": 2}],
    ids=["token", "avg-no-class", "attn-registers"],
)
def test_vpt_equals_hand_written_forward(depth, overrides):
    torch.manual_seed(0)
    vit = tiny_vit(n_layers=3, **overrides)
    images = torch.randn(2, 3, 16, 16)
    base = vit(images)
    names = add_prompts(vit, PromptConfig(length=P, depth=depth))
    assert names == (["prompt", "encoder.deep_prompts"] if depth == "deep" else ["prompt"])
    out = vit(images)
    with torch.no_grad():
        pooled, patches = vit_reference(vit, images, deep=depth == "deep")
    assert out.tokens.shape == base.tokens.shape == (2, 16, 32)
    torch.testing.assert_close(out.pooled, pooled)
    torch.testing.assert_close(out.tokens, patches)
    assert (out.pooled - base.pooled).abs().max() > 1e-4  # random prompts change outputs


def test_deep_prompts_replace_the_previous_layers_prompt_tokens():
    """Deep: what block 0 wrote at the prompt positions never reaches block 1, so the output
    equals a forward where block 1 gets its fresh prompts whatever block 0 produced there."""
    torch.manual_seed(0)
    vit = tiny_vit(n_layers=2)
    add_prompts(vit, PromptConfig(length=P, depth="deep"))
    images = torch.randn(2, 3, 16, 16)
    seen = []
    hook = vit.encoder.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        vit(images)
    hook.remove()
    n = vit.config.n_prefix
    torch.testing.assert_close(seen[0][:, n : n + P], vit.encoder.deep_prompts[0].expand(2, -1, -1))
    with torch.no_grad():  # changing the deep set of block 1 changes the output
        before = vit(images).pooled
        vit.encoder.deep_prompts.add_(torch.randn_like(vit.encoder.deep_prompts))
        assert (vit(images).pooled - before).abs().max() > 1e-4


# ------------------------------------------------------------------------------- errors


def test_adding_twice_is_a_clear_error():
    model = clip()
    add_prefixes(model, PrefixConfig())
    with pytest.raises(ValueError, match="called twice"):
        add_prefixes(model, PrefixConfig())
    add_prompts(model, PromptConfig())
    with pytest.raises(ValueError, match="called twice"):
        add_prompts(model, PromptConfig(towers=["text_tower"]))


def test_unreachable_towers_and_bad_selections_are_clear_errors():
    timm_clip = CLIP(TimmEncoder("resnet10t"), TextEncoder(text_config()), embed_dim=16)
    for add, config in ((add_prefixes, PrefixConfig()), (add_prompts, PromptConfig())):
        with pytest.raises(ValueError, match="image_tower.*TimmEncoder"):
            add(timm_clip, config)
    assert add_prefixes(timm_clip, PrefixConfig(towers=["text_tower"]))  # named: reachable
    with pytest.raises(ValueError, match="cannot reach 'image_tower'"):
        add_prompts(timm_clip, PromptConfig(towers=["image_tower"]))
    with pytest.raises(ValueError, match="no submodule 'vision'"):
        add_prefixes(clip(), PrefixConfig(towers=["vision"]))
    with pytest.raises(ValueError, match="layers has block 5"):
        add_prefixes(clip(), PrefixConfig(layers=[5]))
    with pytest.raises(ValueError, match="depth='deep' is supported for the ViT only"):
        add_prompts(clip(), PromptConfig(depth="deep"))
    with pytest.raises(ValueError, match="no tower"):
        add_prompts(nn.Linear(2, 2), PromptConfig())


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: PrefixConfig(length=0), "PrefixConfig.length"),
        (lambda: PrefixConfig(reparam_hidden=0), "PrefixConfig.reparam_hidden"),
        (lambda: PrefixConfig(layers=[]), "PrefixConfig.layers"),
        (lambda: PrefixConfig(towers="image"), "PrefixConfig.towers"),
        (lambda: PrefixConfig(init_std=0), "PrefixConfig.init_std"),
        (lambda: PromptConfig(length=0), "PromptConfig.length"),
        (lambda: PromptConfig(depth="middle"), "PromptConfig.depth"),
        (lambda: PromptConfig(init="zeros"), "PromptConfig.init"),
        (lambda: PromptConfig(towers=[1]), "PromptConfig.towers"),
    ],
)
def test_configs_name_the_bad_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
