"""`return_attention` through the towers, the captioner and the fusion blocks: every returned
row of weights is a distribution (sums to 1, zero on masked keys), and without the flag (or
with it False) the outputs are those of the plain call, bit for bit, with no weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fusion import CoAttentionEncoder, GatedDecoder, SingleStreamEncoder
from multimodal.layers import TowerOutput, Transformer, TransformerConfig
from multimodal.models import Captioner
from text import DecoderLM, EncoderDecoderLM, EncoderLM, TextConfig, TextEncoder
from vision.vit import ViT, ViTConfig

DIM, HEADS, LAYERS = 16, 2, 2
B, T, N = 2, 5, 4


def stack(**overrides: Any) -> TransformerConfig:
    return TransformerConfig(**{"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, **overrides})


def text_config(**overrides: Any) -> TextConfig:
    return TextConfig(
        vocab_size=20,
        bos_id=1,
        eos_id=2,
        transformer=stack(position="learned", max_positions=16, **overrides),
    )


def tiny_vit() -> ViT:
    return ViT(
        ViTConfig(
            image_size=8, patch_size=4, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_registers=1
        )
    )


IDS = torch.tensor([[1, 5, 7, 9, 3], [1, 4, 6, 0, 0]])
MASK = IDS != 0  # the second row is padded
IMAGES = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(1))
IMAGE_TOKENS = torch.randn(B, N, DIM, generator=torch.Generator().manual_seed(2))
IMAGE_MASK = torch.tensor([[True] * N, [True, True, True, False]])


def check_rows(weights, key_mask=None, causal=False) -> None:
    """Each (B, H, Tq, Tk) tensor: rows sum to 1, no weight on masked or future keys."""
    assert weights is not None and len(weights) > 0
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
        assert (w >= 0).all()
        if key_mask is not None:
            assert (w[~key_mask[:, None, None, :].expand_as(w)] == 0).all()
        if causal:
            assert (w.triu(diagonal=1) == 0).all()


def assert_same(a: Any, b: Any, exact: bool = True) -> None:
    """Equal outputs: tensors bit for bit (or close), None where None, field by field."""
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, exact)
    else:
        assert a == b


def outputs(model, *args, weight_fields: tuple[str, ...], **kwargs):
    """(plain call, return_attention=False, return_attention=True), after checking that the
    first two agree exactly and hold no weights, and the third computes the same values."""
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        plain = model(*args, **kwargs)
        off = model(*args, return_attention=False, **kwargs)
        on = model(*args, return_attention=True, **kwargs)
    assert_same(plain, off)
    for field in weight_fields:
        assert getattr(plain, field) is None
    values = [f for f in plain._fields if f not in weight_fields]
    for field in values:  # the explicit (weights) path computes the same outputs
        assert_same(getattr(plain, field), getattr(on, field), exact=False)
    return on


def test_vit():
    torch.manual_seed(0)
    on = outputs(tiny_vit(), IMAGES, weight_fields=("attentions",))
    assert on.attentions[0].shape == (B, HEADS, 2 + 4, 2 + 4)  # class, register, 2 x 2 patches
    check_rows(on.attentions)


def test_text_encoder_causal_with_padding():
    torch.manual_seed(0)
    model = TextEncoder(text_config(causal=True), out_dim=8)
    on = outputs(model, IDS, MASK, weight_fields=("attentions",))
    check_rows(on.attentions, MASK, causal=True)


def test_encoder_lm():
    torch.manual_seed(0)
    on = outputs(EncoderLM(text_config()), IDS, attention_mask=MASK, weight_fields=("attentions",))
    check_rows(on.attentions, MASK)


def test_decoder_with_causal_mask_and_cross_attention():
    torch.manual_seed(0)
    model = DecoderLM(text_config(causal=True, cross_attention=True))
    on = outputs(
        model,
        IDS,
        attention_mask=MASK,
        context=IMAGE_TOKENS,
        context_padding_mask=IMAGE_MASK,
        weight_fields=("attentions", "cross_attentions", "encoder_attentions"),
    )
    check_rows(on.attentions, MASK, causal=True)
    check_rows(on.cross_attentions, IMAGE_MASK)
    assert on.cross_attentions[0].shape == (B, HEADS, T, N)
    assert on.encoder_attentions is None


def test_encoder_decoder():
    torch.manual_seed(0)
    model = EncoderDecoderLM(text_config())
    decoder_ids = IDS[:, :3]
    on = outputs(
        model,
        IDS,
        decoder_ids,
        attention_mask=MASK,
        weight_fields=("attentions", "cross_attentions", "encoder_attentions"),
    )
    check_rows(on.encoder_attentions, MASK)
    check_rows(on.attentions, causal=True)
    check_rows(on.cross_attentions, MASK)


@pytest.mark.parametrize("contrastive", [False, True])
def test_captioner_cross_attention(contrastive):
    torch.manual_seed(0)
    extra = (
        {"text_tower": TextEncoder(text_config(causal=True)), "embed_dim": 8} if contrastive else {}
    )
    model = Captioner(
        tiny_vit(), DecoderLM(text_config(causal=True, cross_attention=True)), **extra
    )
    on = outputs(
        model,
        IMAGES,
        IDS,
        MASK,
        weight_fields=("image_attentions", "attentions", "cross_attentions"),
    )
    check_rows(on.image_attentions)
    check_rows(on.attentions, MASK, causal=True)
    check_rows(on.cross_attentions)
    assert on.cross_attentions[0].shape == (B, HEADS, T, 1 + 4)  # pooled token + 2 x 2 patches


def test_co_attention_encoder():
    torch.manual_seed(0)
    on = outputs(
        CoAttentionEncoder(stack()),
        TEXT,
        IMAGE_TOKENS,
        text_padding_mask=MASK,
        image_padding_mask=IMAGE_MASK,
        weight_fields=(
            "text_attentions",
            "text_cross_attentions",
            "image_attentions",
            "image_cross_attentions",
        ),
    )
    check_rows(on.text_attentions, MASK)
    check_rows(on.text_cross_attentions, IMAGE_MASK)
    check_rows(on.image_attentions, IMAGE_MASK)
    check_rows(on.image_cross_attentions, MASK)
    assert len(on.text_attentions) == LAYERS
    assert on.text_cross_attentions[0].shape == (B, HEADS, T, N)


def test_single_stream_encoder():
    torch.manual_seed(0)
    on = outputs(
        SingleStreamEncoder(stack()),
        TEXT,
        IMAGE_TOKENS,
        text_padding_mask=MASK,
        image_padding_mask=IMAGE_MASK,
        weight_fields=("attentions",),
    )
    check_rows(on.attentions, torch.cat([MASK, IMAGE_MASK], dim=1))


def test_gated_decoder():
    torch.manual_seed(0)
    model = GatedDecoder(Transformer(stack(causal=True, n_layers=3)), every=2)
    for gated in model.gated.values():  # open the gates: the weights then change the output
        torch.nn.init.constant_(gated.alpha_attn, 0.5)
    on = outputs(
        model,
        TEXT,
        IMAGE_TOKENS,
        context_padding_mask=IMAGE_MASK,
        weight_fields=("attentions", "cross_attentions"),
    )
    check_rows(on.attentions, causal=True)
    check_rows(on.cross_attentions, IMAGE_MASK)
    assert len(on.cross_attentions) == 2  # gated layers before blocks 0 and 2


class PatchTower(torch.nn.Module):
    """An image tower without attention weights (as a timm CNN): 4 x 4 patch features."""

    out_dim = DIM

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, DIM, 4, stride=4)

    def forward(self, images):
        tokens = self.proj(images).flatten(2).transpose(1, 2)  # (B, 4, DIM)
        return TowerOutput(tokens.mean(1), tokens)


def test_captioner_with_a_tower_that_returns_no_weights():
    torch.manual_seed(0)
    decoder = DecoderLM(text_config(causal=True, cross_attention=True))
    on = outputs(
        Captioner(PatchTower(), decoder),
        IMAGES,
        IDS,
        MASK,
        weight_fields=("image_attentions", "attentions", "cross_attentions"),
    )
    assert on.image_attentions is None
    check_rows(on.cross_attentions)
