"""ViT against timm's VisionTransformer with copied weights, and its own behaviour."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from vision import ViT, ViTConfig
from vision.pos_embed import resample_pos_embed, sincos_2d_pos_embed

TIMM_VARIANTS = {
    "class-token": {},
    "avg-no-class-token": {"global_pool": "avg", "class_token": False},
    "registers": {"reg_tokens": 4, "no_embed_class": True},
    "attention-pool": {"global_pool": "map"},
}


def timm_outputs(model, images):
    features = model.forward_features(images)
    return model.forward_head(features, pre_logits=True), features[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_from_timm_matches_pooled_output_and_patch_tokens(variant):
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, **TIMM_VARIANTS[variant]
    ).eval()
    ours = ViT.from_timm(reference).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled, tokens = timm_outputs(reference, images)
        out = ours(images)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=1e-5)
    assert out.tokens.shape == (2, 196, 192)


def test_from_timm_name_loads_a_local_weights_file(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    ours = ViT.from_timm("vit_tiny_patch16_224", pretrained_path=str(path)).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(images).pooled, timm_outputs(reference, images)[0], atol=1e-5, rtol=1e-5
        )


def test_other_image_sizes_resample_positions_as_timm_does():
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True
    ).eval()
    ours = ViT.from_timm(reference).eval()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        pooled, tokens = timm_outputs(reference, images)
        out = ours(images)
    assert out.tokens.shape == (2, 256, 192)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=1e-5)


def test_position_resampling_is_identity_at_the_original_size_and_matches_timm():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert resample_pos_embed(pos, (14, 14), (14, 14), n_prefix=1) is pos
    for new in [(16, 16), (10, 12)]:
        expected = resample_abs_pos_embed(pos, list(new), [14, 14], num_prefix_tokens=1)
        torch.testing.assert_close(resample_pos_embed(pos, new, (14, 14), n_prefix=1), expected)


def test_sincos_positions_match_the_formula_and_serve_any_size():
    grid, dim = (3, 5), 16
    table = sincos_2d_pos_embed(grid, dim)
    for index in [0, 7, 14]:
        row, col = divmod(index, grid[1])
        for i in range(dim // 4):
            omega = 10000 ** (-i / (dim // 4))
            expected = [
                math.sin(row * omega),
                math.cos(row * omega),
                math.sin(col * omega),
                math.cos(col * omega),
            ]
            got = [table[index, part * dim // 4 + i].item() for part in range(4)]
            assert got == pytest.approx(expected, abs=1e-6)
    vit = ViT(
        ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2, pos_embed="sincos")
    )
    assert vit(torch.randn(1, 3, 48, 32)).tokens.shape == (1, 24, 32)


def small_vit(**overrides) -> ViT:
    config = dict(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=2)
    return ViT(ViTConfig(**{**config, **overrides}))


def test_gradient_checkpointing_gives_equal_gradients():
    vit = small_vit(n_registers=2)
    images = torch.randn(4, 3, 32, 32)

    def grads():
        vit.zero_grad()
        vit(images).pooled.pow(2).sum().backward()
        return [p.grad.clone() for p in vit.parameters()]

    plain = grads()
    vit.set_grad_checkpointing(True)
    for a, b in zip(grads(), plain, strict=True):
        torch.testing.assert_close(a, b)


def test_wrong_channel_count_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, height, width\)"):
        small_vit()(torch.randn(2, 1, 32, 32))


def test_size_not_divisible_by_the_patch_size_is_rejected():
    with pytest.raises(ValueError, match="multiples of 8"):
        small_vit()(torch.randn(2, 3, 30, 32))


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"image_size": 30}, "ViTConfig.image_size"),
        ({"pool": "max"}, "ViTConfig.pool"),
        ({"pool": "token", "class_token": False}, "ViTConfig.pool"),
        ({"pos_embed": "rope"}, "ViTConfig.pos_embed"),
        ({"n_heads": 3}, "ViTConfig.n_heads"),
        ({"drop_path": 2.0}, "ViTConfig.drop_path"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    config = dict(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ViTConfig(**{**config, **overrides})


def test_unsupported_timm_features_are_refused_clearly():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=1e-5)
    with pytest.raises(ValueError, match="layer scale"):
        ViT.from_timm(model)
