"""Attention rollout and per-layer maps against hand computations from the weights a tiny
ViT returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal.inspect import (
    attention_rollout,
    cross_attention_maps,
    layer_map,
    rollout_map,
    vit_layout,
)
from vision.vit import ViT, ViTConfig

IMAGE = 16  # 4 x 4 patches of 4 px


def tiny_vit(**overrides) -> ViT:
    torch.manual_seed(0)
    config = dict(image_size=IMAGE, patch_size=4, dim=32, n_layers=2, n_heads=2)
    return ViT(ViTConfig(**{**config, **overrides})).eval()


def weights_of(vit: ViT, batch: int = 2) -> list[np.ndarray]:
    images = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return [w.numpy().astype(np.float64) for w in vit(images, return_attention=True).attentions]


def hand_rollout(weights: list[np.ndarray], fusion: str) -> np.ndarray:
    """Abnar & Zuidema with loops: per layer fuse heads, add I, row-normalise; R = A_2 A_1."""
    B, H, T, _ = weights[0].shape
    rollout = np.zeros((B, T, T))
    for b in range(B):
        current = np.eye(T)
        for w in weights:
            a = np.zeros((T, T))
            for i in range(T):
                for j in range(T):
                    heads = [w[b, h, i, j] for h in range(H)]
                    a[i, j] = sum(heads) / H if fusion == "mean" else max(heads)
                a[i, i] += 1.0
                a[i] /= a[i].sum()
            product = np.zeros((T, T))
            for i in range(T):
                for j in range(T):
                    product[i, j] = sum(a[i, k] * current[k, j] for k in range(T))
            current = product
        rollout[b] = current
    return rollout


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_equals_the_hand_computation_with_class_token_and_registers(fusion):
    vit = tiny_vit(n_registers=2)  # tokens: [class, 2 registers, 16 patches]
    weights = weights_of(vit)
    expected = hand_rollout(weights, fusion)
    rollout = attention_rollout([torch.from_numpy(w) for w in weights], fusion).numpy()
    np.testing.assert_allclose(rollout, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)
    layout = vit_layout(vit, (IMAGE, IMAGE))
    assert (layout.leading, layout.grid, layout.source) == (3, (4, 4), "cls")
    image_map = rollout_map([torch.from_numpy(w) for w in weights], layout, fusion).numpy()
    # the class token's row, over the patch columns (registers left out), on the 4 x 4 grid
    np.testing.assert_allclose(image_map, expected[:, 0, 3:].reshape(2, 4, 4), rtol=1e-10)


@pytest.mark.parametrize("class_token", [False, True])
def test_rollout_of_an_average_pooled_vit_reads_the_mean_of_the_patch_rows(class_token):
    vit = tiny_vit(class_token=class_token, pool="avg")
    weights = weights_of(vit)
    layout = vit_layout(vit, (IMAGE, IMAGE))
    first = int(class_token)  # the patches' first token
    assert (layout.leading, layout.source) == (first, "mean")
    expected = hand_rollout(weights, "mean")
    column_means = np.array(
        [
            [sum(expected[b, first + i, first + j] for i in range(16)) / 16 for j in range(16)]
            for b in range(2)
        ]
    )
    image_map = rollout_map([torch.from_numpy(w) for w in weights], layout).numpy()
    np.testing.assert_allclose(image_map, column_means.reshape(2, 4, 4), rtol=1e-10)


def test_visual_prompts_count_as_leading_tokens():
    vit = tiny_vit()
    vit.prompt = torch.nn.Parameter(torch.randn(1, 3, 32))
    weights = weights_of(vit)
    assert weights[0].shape[-1] == 1 + 3 + 16
    layout = vit_layout(vit, (IMAGE, IMAGE))
    assert layout.leading == 4
    image_map = layer_map([torch.from_numpy(w) for w in weights], layout, -1, 1).numpy()
    np.testing.assert_allclose(image_map, weights[1][:, 1, 0, 4:].reshape(2, 4, 4))


def test_layer_map_is_one_layer_and_head_over_the_patches():
    vit = tiny_vit(n_registers=1)
    weights = weights_of(vit)
    tensors = [torch.from_numpy(w) for w in weights]
    layout = vit_layout(vit, (IMAGE, IMAGE))
    head0 = layer_map(tensors, layout, 0, 0).numpy()
    np.testing.assert_allclose(head0, weights[0][:, 0, 0, 2:].reshape(2, 4, 4))
    mean = layer_map(tensors, layout, 1, "mean").numpy()
    np.testing.assert_allclose(mean, weights[1][:, :, 0, 2:].mean(1).reshape(2, 4, 4))
    with pytest.raises(ValueError, match="layer 2 must be in"):
        layer_map(tensors, layout, 2)
    with pytest.raises(ValueError, match="head 5"):
        layer_map(tensors, layout, 0, 5)


def test_cross_attention_maps_drop_the_pooled_key():
    weights = torch.rand(1, 2, 3, 1 + 6).softmax(-1)  # (B, H, words, pooled + 2 x 3 patches)
    maps = cross_attention_maps([weights], (2, 3), head="mean")
    torch.testing.assert_close(maps, weights[:, :, :, 1:].mean(1).reshape(1, 3, 2, 3))
    with pytest.raises(ValueError, match="7 keys"):
        cross_attention_maps([weights[..., :6]], (2, 3))


def test_layout_refuses_other_towers_and_sizes():
    with pytest.raises(ValueError, match="vision.ViT"):
        vit_layout(torch.nn.Linear(2, 2), (16, 16))
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        vit_layout(tiny_vit(), (18, 16))
