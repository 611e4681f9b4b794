"""Captioner, VQAModel and the image-text matching head: shapes, interfaces and errors, and
generation equal to a step-by-step greedy reference."""

from __future__ import annotations

import pytest
import torch

from multimodal.layers import TransformerConfig
from multimodal.models import Captioner, ITMHead, VQAModel, itm_pairs
from text import DecoderLM, TextConfig, TextEncoder
from vision import ViT, ViTConfig

DIM = 32


def image_tower() -> ViT:
    return ViT(ViTConfig(image_size=16, patch_size=4, dim=DIM, n_layers=1, n_heads=2))


def decoder(context_dim: int = DIM, **changes) -> DecoderLM:
    transformer = TransformerConfig(
        dim=DIM, n_layers=2, n_heads=2, causal=True, cross_attention=True,
        context_dim=context_dim, position="learned", max_positions=12,
    )  # fmt: skip
    ids = {"bos_id": 1, "eos_id": 2, **changes}
    return DecoderLM(TextConfig(vocab_size=20, transformer=transformer, **ids))


def text_tower(causal: bool = False) -> TextEncoder:
    transformer = TransformerConfig(
        dim=DIM, n_layers=1, n_heads=2, causal=causal, position="learned", max_positions=12
    )
    return TextEncoder(TextConfig(vocab_size=20, transformer=transformer), pool="cls")


def test_captioner_logits_and_coca_features():
    model = Captioner(image_tower(), decoder(), text_tower=text_tower(), embed_dim=16)
    images, ids = torch.randn(3, 3, 16, 16), torch.randint(3, 20, (3, 7))
    out = model(images, ids, torch.ones(3, 7, dtype=torch.bool))
    assert out.logits.shape == (3, 7, 20)
    assert out.image_features.shape == out.text_features.shape == (3, 16)
    torch.testing.assert_close(out.image_features, model.encode_image(images))
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_captioner_logits_depend_on_the_image_only_through_cross_attention():
    model = Captioner(image_tower(), decoder()).eval()
    ids = torch.randint(3, 20, (2, 5))
    a = model(torch.randn(2, 3, 16, 16), ids).logits
    b = model(torch.randn(2, 3, 16, 16), ids).logits
    assert not torch.allclose(a, b)
    assert model(torch.randn(2, 3, 16, 16), ids).image_features is None


def test_captioner_greedy_generation_equals_a_step_by_step_argmax():
    model = Captioner(image_tower(), decoder()).eval()
    images = torch.randn(2, 3, 16, 16)
    generated = model.generate(images).sequences
    for row in range(2):  # reference: full forward each step, no cache, argmax
        ids = torch.tensor([[1]])
        for _ in range(11):
            next_id = model(images[row : row + 1], ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id == 2:
                break
        expected = ids[0, 1:]
        assert generated[row, : len(expected)].tolist() == expected.tolist()


def test_captioner_errors():
    with pytest.raises(ValueError, match="cross_attention"):
        Captioner(image_tower(), DecoderLM(TextConfig(vocab_size=20, bos_id=1, eos_id=2,
                  transformer=TransformerConfig(dim=DIM, n_heads=2, causal=True))))  # fmt: skip
    with pytest.raises(ValueError, match="context_dim"):
        Captioner(image_tower(), decoder(context_dim=DIM * 2))
    with pytest.raises(ValueError, match="bos_id"):
        Captioner(image_tower(), decoder(bos_id=None))
    with pytest.raises(ValueError, match="text_tower and embed_dim"):
        Captioner(image_tower(), decoder(), embed_dim=16)
    with pytest.raises(ValueError, match="encode_text needs"):
        Captioner(image_tower(), decoder()).encode_text(torch.randint(0, 20, (1, 4)))


def vqa_model(**kwargs) -> VQAModel:
    fusion = TransformerConfig(dim=DIM, n_layers=1, n_heads=2, position="none")
    return VQAModel(image_tower(), text_tower(), fusion, num_answers=5, **kwargs)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vqa_model_answers_and_padding(pool):
    model = vqa_model(pool=pool).eval()
    images, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 20, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(images, ids, mask)
    assert out.logits.shape == (2, 5) and out.answer_logits is None
    assert out.fused.shape == (2, 6 + 1 + 16, DIM) and out.fused_mask.shape == (2, 23)
    # padded question tokens change nothing: row 0 again with other ids under the padding
    other = ids.clone()
    other[0, 4:] = 7
    torch.testing.assert_close(model(images, other, mask).logits[0], out.logits[0])


def test_vqa_answer_decoder():
    model = vqa_model(answer_decoder=decoder()).eval()
    images, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 20, (2, 6))
    out = model(images, ids, answer_ids=torch.randint(3, 20, (2, 4)))
    assert out.answer_logits.shape == (2, 4, 20)
    assert model.generate_answers(images, ids).sequences.shape[0] == 2
    with pytest.raises(ValueError, match="answer_decoder"):
        vqa_model()(images, ids, answer_ids=torch.randint(3, 20, (2, 4)))
    with pytest.raises(ValueError, match="context_dim"):
        vqa_model(answer_decoder=decoder(context_dim=DIM * 2))
    with pytest.raises(ValueError, match="num_answers"):
        VQAModel(image_tower(), text_tower(), TransformerConfig(dim=DIM, position="none"), 0)


def test_itm_pairs_are_matches_and_hard_negatives():
    similarity = torch.randn(6, 6)
    pairs = itm_pairs(similarity, generator=torch.Generator().manual_seed(0))
    assert pairs.labels.tolist() == [1] * 6 + [0] * 12
    matched = pairs.image_index[:6] == pairs.text_index[:6]
    negatives = pairs.image_index[6:] != pairs.text_index[6:]
    assert matched.all() and negatives.all()
    assert pairs.image_index[6:12].tolist() == list(range(6))  # each image: a negative text
    assert pairs.text_index[12:].tolist() == list(range(6))  # each text: a negative image


def test_itm_pairs_pick_the_hardest_negative_when_it_dominates():
    similarity = torch.zeros(4, 4)
    similarity[0, 3] = similarity[3, 0] = 50.0  # image 0 and text 3 look alike
    pairs = itm_pairs(similarity)
    # rows: 4 matches, then (image i, its negative text), then (its negative image, text j)
    assert pairs.text_index[4 + 0] == 3  # image 0 -> text 3
    assert pairs.image_index[8 + 3] == 0  # text 3 -> image 0


def test_itm_head_scores_pairs_and_ignores_padding():
    head = ITMHead(image_dim=DIM, text_dim=24, config=TransformerConfig(dim=16, n_heads=2))
    image, text = torch.randn(3, 10, DIM), torch.randn(3, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    logits = head(image, text, mask)
    assert logits.shape == (3, 2)
    changed = text.clone()
    changed[:, 3:] = 9.0
    torch.testing.assert_close(head(image, changed, mask), logits)
    torch.testing.assert_close(head.match_score(image, text, mask), logits.log_softmax(-1)[:, 1])
