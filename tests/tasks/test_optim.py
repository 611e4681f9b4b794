"""Weight-decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multimodal.tasks.optim import (
    OptimConfig,
    build_optimizer,
    can_fuse,
    param_groups,
    warmup_cosine,
)
from vision import ViT, ViTConfig


def test_no_decay_on_norms_biases_and_embeddings():
    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2, n_registers=1))
    model = nn.ModuleDict({"vit": vit, "tokens": nn.Embedding(10, 16)})
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {
        "vit.patch_embed.proj.weight",
        "vit.encoder.blocks.0.attn.qkv.weight",
        "vit.encoder.blocks.0.attn.proj.weight",
        "vit.encoder.blocks.0.mlp.fc1.weight",
        "vit.encoder.blocks.0.mlp.fc2.weight",
    }
    skipped = {names[id(p)] for p in no_decay["params"]}
    for name in [
        "vit.cls_token",
        "vit.registers",
        "vit.pos_embed",
        "tokens.weight",
        "vit.encoder.norm.weight",
    ]:
        assert name in skipped
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_warmup_then_cosine():
    warmup, total, floor = 10, 110, 0.1
    assert warmup_cosine(0, warmup, total, floor) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup, total, floor) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup, total, floor) == pytest.approx(1.0)
    middle = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert warmup_cosine(60, warmup, total, floor) == pytest.approx(middle)
    assert warmup_cosine(110, warmup, total, floor) == pytest.approx(floor)
    assert warmup_cosine(500, warmup, total, floor) == pytest.approx(floor)


def test_scheduler_steps_the_learning_rate():
    model = nn.Linear(4, 4)
    built = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=2), total_steps=10)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert lrs[3] < 0.1
    assert built["lr_scheduler"]["interval"] == "step"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lr": 0}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_lr_ratio": 2}, "min_lr_ratio"),
        ({"layer_decay": 0}, "layer_decay"),
        ({"layer_decay": 1.5}, "layer_decay"),
    ],
)
def test_bad_optim_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"OptimConfig.{field}"):
        OptimConfig(**kwargs)


def test_adamw_parameters_are_all_optimised():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = build_optimizer(model, OptimConfig(), total_steps=5)["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


def test_unknown_run_length_asks_for_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(), total_steps=float("inf"))
    built = build_optimizer(nn.Linear(2, 2), OptimConfig(total_steps=10), total_steps=float("inf"))
    assert built["optimizer"] is not None


def test_adamw_is_fused_where_torch_supports_it_and_steps_like_the_loop():
    """The fused kernel by default on plain CPU parameters; given the same gradients, its
    steps equal torch's per-parameter AdamW (the same groups, schedule and weight decay)."""
    generator = torch.Generator().manual_seed(1)
    grads = [
        [torch.randn(p.shape, generator=generator) for p in ViT(VIT).parameters()] for _ in range(3)
    ]

    def run(fused: bool | None) -> tuple[torch.optim.Optimizer, nn.Module]:
        torch.manual_seed(0)
        model = ViT(VIT)
        config = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1, fused=fused)
        built = build_optimizer(model, config, total_steps=3)
        for step in grads:
            for p, g in zip(model.parameters(), step, strict=True):
                p.grad = g.clone()
            built["optimizer"].step()
            built["lr_scheduler"]["scheduler"].step()
        return built["optimizer"], model

    auto, fused_model = run(None)
    loop, loop_model = run(False)
    assert auto.defaults["fused"] is True and not loop.defaults["fused"]
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not can_fuse(nn.Linear(2, 2, device="meta").parameters())
    assert not can_fuse([torch.zeros(2, dtype=torch.long)]) and not can_fuse([])


VIT = ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2)
