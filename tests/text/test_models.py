"""Text models: open_clip parity, length limits, padding, tied weights, heads and pooling."""

from __future__ import annotations

import open_clip
import pytest
import torch

from multimodal.layers import TransformerConfig
from text import (
    DecoderLM,
    EncoderDecoderLM,
    EncoderLM,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TextConfig,
    TextEncoder,
    TextFeatures,
    best_spans,
    pool_tokens,
)


def text_config(**transformer) -> TextConfig:
    base = dict(dim=32, n_layers=2, n_heads=4, max_positions=16)
    return TextConfig(vocab_size=50, transformer=TransformerConfig(**{**base, **transformer}))


def small_open_clip(quick_gelu: bool) -> open_clip.CLIP:
    return open_clip.CLIP(
        embed_dim=24,
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 500, "width": 64, "heads": 4, "layers": 2},
        quick_gelu=quick_gelu,
    ).eval()


def clip_like_ids() -> torch.Tensor:
    """start, words, end-of-text (the largest id), zero padding, as open_clip's tokenizer."""
    ids = torch.randint(1, 498, (3, 16))
    ids[:, 0] = 498
    for row, length in enumerate([16, 9, 5]):
        ids[row, length - 1] = 499
        ids[row, length:] = 0
    return ids


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_from_open_clip_matches_encode_text(quick_gelu):
    reference = small_open_clip(quick_gelu)
    ours = TextEncoder.from_open_clip(reference).eval()
    ids = clip_like_ids()
    with torch.no_grad():
        expected = reference.encode_text(ids)
        out = ours(ids)
        masked = ours(ids, attention_mask=ids.ne(0) | (torch.arange(16) == 0))
    assert ours.out_dim == 24
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.pooled, expected, atol=1e-5, rtol=1e-5)


def test_open_clip_tokenizer_output_through_our_tower():
    reference = small_open_clip(False)
    ours = TextEncoder.from_open_clip(reference).eval()
    ids = open_clip.tokenize(["a photo of a seven", "two"], context_length=16) % 500
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids).pooled, reference.encode_text(ids), atol=1e-5, rtol=1e-5
        )


def test_too_long_input_raises_or_truncates():
    model = DecoderLM(text_config(causal=True, position="rope"))
    ids = torch.randint(0, 50, (2, 20))
    with pytest.raises(ValueError, match="maximum of 16 positions"):
        model(ids)
    model.config.truncate = True
    torch.testing.assert_close(model(ids).logits, model(ids[:, :16]).logits)


def test_decoder_ties_embeddings_and_is_causal():
    model = DecoderLM(text_config(causal=True, position="learned")).eval()
    assert model.lm_head.weight is model.embed.token.weight
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])  # earlier positions cannot see the change
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_left_padding_with_positions_leaves_real_tokens_unchanged():
    model = DecoderLM(text_config(causal=True, position="learned")).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = padded != 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids).logits
        out = model(padded, attention_mask=mask, positions=positions).logits[:, 3:]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_encoder_padding_does_not_change_real_tokens():
    config = text_config(position="learned", norm_order="post", input_norm=True)
    config.n_segments = 2
    model = EncoderLM(config).eval()
    ids = torch.randint(1, 50, (1, 7))
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_segments = torch.cat([segments, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        expected = model(ids, segment_ids=segments).hidden
        out = model(padded, attention_mask=padded != 0, segment_ids=padded_segments).hidden[:, :7]
        other_segments = model(ids).hidden
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other_segments, expected)  # segment embeddings matter


def test_encoder_decoder_teacher_forcing_equals_encode_then_decode():
    config = text_config(position="t5", norm="rmsnorm", activation="relu", bias=False)
    model = EncoderDecoderLM(config, decoder_layers=3).eval()
    assert len(model.decoder.blocks) == 3
    source, target = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        full = model(source, target, attention_mask=mask).logits
        context = model.encode(source, mask)
        stepwise = model.decode(target, context=context, context_padding_mask=mask).logits
        expected = model.lm_head(
            model.decoder(model.embed(target), context=context, context_padding_mask=mask).hidden
            * 32**-0.5
        )
    torch.testing.assert_close(full, stepwise)
    torch.testing.assert_close(full, expected)


def test_wrong_stack_kinds_are_refused():
    with pytest.raises(ValueError, match="causal=True"):
        DecoderLM(text_config())
    with pytest.raises(ValueError, match="causal=False"):
        EncoderLM(text_config(causal=True))
    with pytest.raises(ValueError, match="vocab_size"):
        TextConfig(vocab_size=0)
    with pytest.raises(ValueError, match="pad_id"):
        TextConfig(vocab_size=10, pad_id=10)


def test_pooling_matches_hand_computation():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    torch.testing.assert_close(pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(
        pool_tokens(hidden, mask, "eot"), torch.stack([hidden[0, 2], hidden[1, 1]])
    )
    torch.testing.assert_close(
        pool_tokens(hidden, mask, "mean"),
        torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]),
    )
    with pytest.raises(ValueError, match="pooling"):
        pool_tokens(hidden, mask, "max")
    head = SequenceClassificationHead(3, 2, pooling="mean", dropout=0.0)
    torch.testing.assert_close(
        head(hidden, mask), head.classifier(pool_tokens(hidden, mask, "mean"))
    )


def test_best_spans_equal_brute_force():
    torch.manual_seed(1)
    head = QuestionAnsweringHead(8)
    hidden, mask = torch.randn(3, 12, 8), torch.ones(3, 12, dtype=torch.bool)
    mask[2, 9:] = False
    logits = head(hidden, mask)
    spans = best_spans(logits, max_answer_length=4)
    for b in range(3):
        best, best_score = None, float("-inf")
        for s in range(12):
            for e in range(s, min(12, s + 4)):
                score = (logits.start[b, s] + logits.end[b, e]).item()
                if score > best_score:
                    best, best_score = (s, e), score
        assert tuple(spans[b].tolist()) == best
        assert spans[b, 1] < mask[b].sum()


def test_text_features_are_frozen_and_deterministic():
    encoder = EncoderLM(text_config(position="learned", dropout=0.5))
    features = TextFeatures(encoder, pooling="mean", normalize=True).train()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    a, b = features(ids, mask), features(ids, mask)
    torch.testing.assert_close(a, b)  # the encoder stays in eval mode: no dropout
    assert not a.requires_grad and not any(p.requires_grad for p in encoder.parameters())
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
