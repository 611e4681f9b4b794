"""Fusion modules against references built from the layers by hand: padding in either modality,
single stream vs. one Transformer over the concatenation, co-attention symmetry and cross-stream
dependence, and gated cross-attention that leaves a pretrained decoder unchanged at init."""

from __future__ import annotations

import pytest
import torch

from fusion import (
    CoAttentionEncoder,
    GatedCrossAttention,
    GatedDecoder,
    SingleStreamEncoder,
    cross_modal_encoder,
)
from multimodal.layers import Transformer, TransformerConfig

DIM = 32


def config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{"dim": DIM, "n_layers": 2, "n_heads": 4, **overrides})


def padded_batch(B: int, T: int, N: int, dim: int = DIM, image_dim: int = DIM):
    """text (B, T, dim), image (B, N, image_dim) and masks where row 1 is padded in both:
    3 real text tokens of T and 2 real image tokens of N (the padding is random garbage)."""
    text, image = torch.randn(B, T, dim), torch.randn(B, N, image_dim)
    text_mask = torch.ones(B, T, dtype=torch.bool)
    image_mask = torch.ones(B, N, dtype=torch.bool)
    text_mask[1, 3:] = False
    image_mask[1, 2:] = False
    return text, image, text_mask, image_mask


def perturbed(x: torch.Tensor) -> torch.Tensor:
    return x + torch.randn_like(x)


# cross-modal encoder


@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_cross_modal_encoder_padding_in_either_modality_leaves_real_tokens(norm_order):
    encoder = cross_modal_encoder(config(norm_order=norm_order), context_dim=24).eval()
    text, image, text_mask, image_mask = padded_batch(2, 6, 5, image_dim=24)
    with torch.no_grad():
        out = encoder(
            text, context=image, key_padding_mask=text_mask, context_padding_mask=image_mask
        ).hidden
        trimmed = encoder(text[1:, :3], context=image[1:, :2]).hidden  # row 1, real tokens only
    assert out.shape == (2, 6, DIM)
    torch.testing.assert_close(out[1, :3], trimmed[0], atol=1e-5, rtol=1e-5)


def test_cross_modal_encoder_both_directions_and_dependence_on_context():
    text_to_image = cross_modal_encoder(config(), context_dim=24).eval()
    image_to_text = cross_modal_encoder(config(dim=24, n_heads=4), context_dim=DIM).eval()
    text, image = torch.randn(2, 6, DIM), torch.randn(2, 5, 24)
    with torch.no_grad():
        t = text_to_image(text, context=image).hidden
        i = image_to_text(image, context=text).hidden
        t_other = text_to_image(text, context=perturbed(image)).hidden
    assert t.shape == (2, 6, DIM) and i.shape == (2, 5, 24)
    assert not torch.allclose(t, t_other)
    assert text_to_image.config.cross_attention and not text_to_image.config.causal


def test_cross_modal_encoder_refuses_a_causal_config():
    with pytest.raises(ValueError, match="causal"):
        cross_modal_encoder(config(causal=True))


# co-attention


def swapped_streams(encoder: CoAttentionEncoder) -> CoAttentionEncoder:
    """The same encoder with the text and image streams' weights exchanged."""
    names = [("text_blocks", "image_blocks"), ("text_context_norms", "image_context_norms")]
    names.append(("text_norm", "image_norm"))
    state = {}
    for key, value in encoder.state_dict().items():
        for a, b in names:
            if key.startswith(a + "."):
                key = b + key[len(a) :]
            elif key.startswith(b + "."):
                key = a + key[len(b) :]
            else:
                continue
            break
        state[key] = value
    other = CoAttentionEncoder(encoder.config).eval()
    other.load_state_dict(state)
    return other


@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_co_attention_equals_blocks_run_by_hand_on_the_layer_inputs(norm_order):
    encoder = CoAttentionEncoder(config(norm_order=norm_order), n_layers=3).eval()
    text, image, text_mask, image_mask = padded_batch(2, 6, 5)
    with torch.no_grad():
        out = encoder(text, image, text_padding_mask=text_mask, image_padding_mask=image_mask)
        t, i = text, image
        for k in range(3):
            t_context = encoder.text_context_norms[k](t)
            i_context = encoder.image_context_norms[k](i)
            t, i = (
                encoder.text_blocks[k](
                    t,
                    context=i_context,
                    key_padding_mask=text_mask,
                    context_padding_mask=image_mask,
                ).hidden,
                encoder.image_blocks[k](
                    i,
                    context=t_context,
                    key_padding_mask=image_mask,
                    context_padding_mask=text_mask,
                ).hidden,
            )
    assert out.text.shape == (2, 6, DIM) and out.image.shape == (2, 5, DIM)
    assert len(encoder.text_blocks) == 3
    torch.testing.assert_close(out.text, encoder.text_norm(t))
    torch.testing.assert_close(out.image, encoder.image_norm(i))


def test_co_attention_swapping_streams_and_weights_swaps_outputs():
    encoder = CoAttentionEncoder(config()).eval()
    swapped = swapped_streams(encoder)
    text, image, text_mask, image_mask = padded_batch(2, 6, 5)
    with torch.no_grad():
        out = encoder(text, image, text_padding_mask=text_mask, image_padding_mask=image_mask)
        other = swapped(image, text, text_padding_mask=image_mask, image_padding_mask=text_mask)
    torch.testing.assert_close(other.text, out.image)
    torch.testing.assert_close(other.image, out.text)


def test_co_attention_each_stream_depends_on_the_other():
    encoder = CoAttentionEncoder(config()).eval()
    text, image = torch.randn(2, 6, DIM), torch.randn(2, 5, DIM)
    with torch.no_grad():
        out = encoder(text, image)
        image_changed = encoder(text, perturbed(image))
        text_changed = encoder(perturbed(text), image)
    assert not torch.allclose(out.text, image_changed.text)
    assert not torch.allclose(out.image, text_changed.image)


def test_co_attention_padding_in_either_stream_leaves_real_tokens():
    encoder = CoAttentionEncoder(config()).eval()
    text, image, text_mask, image_mask = padded_batch(2, 6, 5)
    with torch.no_grad():
        out = encoder(text, image, text_padding_mask=text_mask, image_padding_mask=image_mask)
        trimmed = encoder(text[1:, :3], image[1:, :2])
    torch.testing.assert_close(out.text[1, :3], trimmed.text[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image[1, :2], trimmed.image[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"position": "rope"}, "position"), ({"causal": True}, "causal"), ({"n_experts": 2}, "n_")],
)
def test_co_attention_and_single_stream_refuse_unsupported_configs(overrides, field):
    for build in (CoAttentionEncoder, SingleStreamEncoder):
        with pytest.raises(ValueError, match=field):
            build(config(**overrides))


# single stream


def test_single_stream_equals_one_transformer_over_the_concatenation():
    encoder = SingleStreamEncoder(config()).eval()
    text, image, text_mask, image_mask = padded_batch(2, 6, 5)
    with torch.no_grad():
        out = encoder(text, image, text_padding_mask=text_mask, image_padding_mask=image_mask)
        types = encoder.modality_embedding.weight  # row 0 text, row 1 image
        joint = torch.cat([text + types[0], image + types[1]], dim=1)
        mask = torch.cat([text_mask, image_mask], dim=1)
        expected = encoder.transformer(joint, key_padding_mask=mask).hidden
    torch.testing.assert_close(out.text, expected[:, :6])
    torch.testing.assert_close(out.image, expected[:, 6:])
    torch.testing.assert_close(out.pooled, expected[:, 0])


def test_single_stream_padding_in_either_modality_leaves_real_tokens():
    encoder = SingleStreamEncoder(config(), pool="mean").eval()
    text, image, text_mask, image_mask = padded_batch(2, 6, 5)
    with torch.no_grad():
        out = encoder(text, image, text_padding_mask=text_mask, image_padding_mask=image_mask)
        trimmed = encoder(text[1:, :3], image[1:, :2])
    torch.testing.assert_close(out.text[1, :3], trimmed.text[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image[1, :2], trimmed.image[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled[1], trimmed.pooled[0], atol=1e-5, rtol=1e-5)
    expected = torch.cat([out.text[1, :3], out.image[1, :2]]).mean(dim=0)
    torch.testing.assert_close(out.pooled[1], expected)


def test_single_stream_modality_ids_select_the_embedding_rows():
    encoder = SingleStreamEncoder(config(), n_modalities=3).eval()
    text, image = torch.randn(1, 4, DIM), torch.randn(1, 3, DIM)
    segments = torch.tensor([[0, 0, 2, 2]])  # sentence A / sentence B
    with torch.no_grad():
        out = encoder(text, image, text_modality=segments)
        types = encoder.modality_embedding.weight
        joint = torch.cat([text + types[segments], image + types[1]], dim=1)
        expected = encoder.transformer(joint).hidden
    torch.testing.assert_close(out.text, expected[:, :4])


# gated cross-attention


def test_gated_cross_attention_is_the_identity_at_init_and_its_gates_get_gradients():
    layer = GatedCrossAttention(DIM, 24, n_heads=4)
    x, context = torch.randn(2, 6, DIM), torch.randn(2, 5, 24)
    out = layer(x, context)
    assert torch.equal(out, x)
    (out * torch.randn_like(out)).sum().backward()
    assert layer.alpha_attn.grad.abs() > 0 and layer.alpha_ff.grad.abs() > 0


def test_gated_cross_attention_with_open_gates_follows_the_formula_and_masks():
    layer = GatedCrossAttention(DIM, 24, n_heads=4).eval()
    with torch.no_grad():
        layer.alpha_attn.fill_(0.7)
        layer.alpha_ff.fill_(-0.3)
    x, context = torch.randn(2, 6, DIM), torch.randn(2, 5, 24)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        out = layer(x, context, context_padding_mask=mask)
        trimmed = layer(x[1:], context[1:, :2])
        attn = layer.attn(layer.attn_norm(x[:1]), context[:1]).output
        h = x[:1] + torch.tanh(torch.tensor(0.7)) * attn
        expected = h + torch.tanh(torch.tensor(-0.3)) * layer.ff(layer.ff_norm(h))
    torch.testing.assert_close(out[1:], trimmed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], expected)
    assert not torch.allclose(out, x)


def decoder(**overrides) -> Transformer:
    return Transformer(config(n_layers=3, causal=True, **overrides)).eval()


def test_gated_decoder_gives_the_decoders_outputs_at_init_and_not_with_open_gates():
    base = decoder(position="rope")
    model = GatedDecoder(base, context_dim=24, every=2).eval()
    assert sorted(model.gated) == ["0", "2"]
    x, context = torch.randn(2, 7, DIM), torch.randn(2, 5, 24)
    with torch.no_grad():
        original = base(x).hidden
        assert torch.equal(model(x, context).hidden, original)
        model.gated["2"].alpha_attn.fill_(0.5)
        opened = model(x, context).hidden
        alone = base(x).hidden  # the decoder called on its own stays unchanged
    assert not torch.allclose(opened, original)
    assert torch.equal(alone, original)


def test_gated_decoder_equals_gated_layers_and_blocks_run_by_hand():
    base = decoder()
    model = GatedDecoder(base, context_dim=24, every=2).eval()
    for layer in model.gated.values():
        with torch.no_grad():
            layer.alpha_attn.fill_(0.5)
            layer.alpha_ff.fill_(0.5)
    x, context = torch.randn(2, 7, DIM), torch.randn(2, 5, 24)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        out = model(x, context, context_padding_mask=mask).hidden
        h = x
        for i, block in enumerate(base.blocks):
            if i % 2 == 0:
                h = model.gated[str(i)](h, context, context_padding_mask=mask)
            h = block(h).hidden
        expected = base.norm(h)
    torch.testing.assert_close(out, expected)


def test_gated_decoder_kv_cache_decoding_equals_full_forward():
    model = GatedDecoder(decoder(position="rope"), context_dim=24).eval()
    for layer in model.gated.values():
        with torch.no_grad():
            layer.alpha_attn.fill_(0.5)
    x, context = torch.randn(2, 6, DIM), torch.randn(2, 5, 24)
    with torch.no_grad():
        full = model(x, context).hidden
        cache = model.decoder.init_cache()
        steps = [model(x[:, :2], context, cache=cache).hidden]
        steps += [model(x[:, t : t + 1], context, cache=cache).hidden for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_gated_decoder_frozen_trains_only_the_gated_layers():
    model = GatedDecoder(decoder(), context_dim=24, freeze_decoder=True)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.gated.parameters())
    x, context = torch.randn(2, 7, DIM), torch.randn(2, 5, 24)
    model(x, context).hidden.pow(2).sum().backward()
    assert all(layer.alpha_attn.grad.abs() > 0 for layer in model.gated.values())
    model.decoder.set_grad_checkpointing()
    with pytest.raises(ValueError, match="checkpointing"):
        model(x, context)
