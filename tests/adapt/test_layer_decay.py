"""Layer-wise learning-rate decay: depths per tower and the optimiser groups they make."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP as OpenClipCLIP
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from multimodal.adapt.layer_decay import layer_depths
from multimodal.layers import TransformerConfig
from multimodal.models.classifier import ImageClassificationModel
from multimodal.models.clip import CLIP
from multimodal.tasks.optim import (
    OptimConfig,
    build_optimizer,
    no_weight_decay_names,
    param_groups,
    warmup_cosine,
)
from text import EncoderDecoderLM, TextConfig, TextEncoder
from vision import ViT, ViTConfig

BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def tiny_vit(n_layers: int) -> ViT:
    return ViT(ViTConfig(image_size=16, patch_size=8, dim=16, n_layers=n_layers, n_heads=2))


def tiny_text(n_layers: int, out_dim: int | None = None) -> TextEncoder:
    transformer = TransformerConfig(
        dim=16, n_layers=n_layers, n_heads=2, causal=True, position="learned", max_positions=8
    )
    return TextEncoder(TextConfig(vocab_size=20, transformer=transformer), out_dim=out_dim)


def expand(table: dict[str, float]) -> dict[str, float]:
    """{"encoder.blocks.0": x} -> every weight and bias of that block; other keys as they are."""
    out = {}
    for name, value in table.items():
        if ".blocks." in name:
            for part in BLOCK:
                out |= {f"{name}.{part}.weight": value, f"{name}.{part}.bias": value}
        else:
            out[name] = value
    return out


def group_lr_by_name(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for group in groups:
        for p in group["params"]:
            assert names[id(p)] not in found, f"{names[id(p)]} in two groups"
            found[names[id(p)]] = group["lr"]
    return found


def test_vit_with_head_lrs_follow_the_hand_table():
    # lr 1, decay 1/2: 4 blocks, so embeddings 1/32, block 0 1/16 ... block 3 1/2, top 1
    model = ImageClassificationModel(tiny_vit(4), num_classes=3)
    expected = expand(
        {
            "encoder.cls_token": 1 / 32,
            "encoder.pos_embed": 1 / 32,
            "encoder.patch_embed.proj.weight": 1 / 32,
            "encoder.patch_embed.proj.bias": 1 / 32,
            "encoder.encoder.blocks.0": 1 / 16,
            "encoder.encoder.blocks.1": 1 / 8,
            "encoder.encoder.blocks.2": 1 / 4,
            "encoder.encoder.blocks.3": 1 / 2,
            "encoder.encoder.norm.weight": 1,
            "encoder.encoder.norm.bias": 1,
            "head.weight": 1,
            "head.bias": 1,
        }
    )
    groups = param_groups(model, 0.1, lr=1.0, layer_decay=0.5)
    assert group_lr_by_name(model, groups) == expected
    # one group per (depth, decayed): 6 depths with both kinds of parameter
    assert len(groups) == 12
    skip = no_weight_decay_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        decayed = {names[id(p)] not in skip for p in group["params"]}
        assert decayed == {group["weight_decay"] == 0.1}
        assert group["lr"] == 0.5 ** group["layer_depth"]


def test_clip_towers_decay_from_their_own_tops():
    # image tower 2 blocks, text tower 3: each counts from its own top
    model = CLIP(tiny_vit(2), tiny_text(3, out_dim=8), embed_dim=8)
    d = 0.5
    expected = expand(
        {
            "image_tower.cls_token": d**3,
            "image_tower.pos_embed": d**3,
            "image_tower.patch_embed.proj.weight": d**3,
            "image_tower.patch_embed.proj.bias": d**3,
            "image_tower.encoder.blocks.0": d**2,
            "image_tower.encoder.blocks.1": d**1,
            "image_tower.encoder.norm.weight": 1,
            "image_tower.encoder.norm.bias": 1,
            "text_tower.embed.token.weight": d**4,
            "text_tower.transformer.position_embedding.weight": d**4,
            "text_tower.transformer.blocks.0": d**3,
            "text_tower.transformer.blocks.1": d**2,
            "text_tower.transformer.blocks.2": d**1,
            "text_tower.transformer.norm.weight": 1,
            "text_tower.transformer.norm.bias": 1,
            "text_tower.projection.weight": 1,
            "image_projection.weight": 1,
            "text_projection.weight": 1,
            "logit_scale": 1,
        }
    )
    groups = param_groups(model, 0.05, lr=1.0, layer_decay=d)
    assert group_lr_by_name(model, groups) == expected


def test_timm_open_clip_and_encoder_decoder_layouts():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=3)
    depths = {n: d for n, (d, _) in layer_depths(vit).items()}
    assert {n: depths[n] for n in ["cls_token", "pos_embed", "patch_embed.proj.weight"]} == {
        "cls_token": 3,
        "pos_embed": 3,
        "patch_embed.proj.weight": 3,
    }
    assert depths["blocks.0.attn.qkv.weight"] == 2 and depths["blocks.1.mlp.fc2.bias"] == 1
    assert depths["norm.weight"] == depths["head.weight"] == 0

    # open_clip keeps the text tower at the root and registers its inputs after `transformer`
    vision = CLIPVisionCfg(layers=2, width=16, head_width=8, patch_size=8, image_size=16)
    text = CLIPTextCfg(context_length=8, vocab_size=20, width=16, heads=2, layers=1)
    depths = layer_depths(OpenClipCLIP(8, vision, text))
    assert depths["visual.class_embedding"] == depths["visual.conv1.weight"] == (3, 2)
    assert depths["visual.transformer.resblocks.0.attn.in_proj_weight"] == (2, 2)
    assert depths["visual.ln_post.weight"][0] == depths["visual.proj"][0] == 0
    assert depths["token_embedding.weight"] == depths["positional_embedding"] == (2, 1)
    assert depths["transformer.resblocks.0.attn.in_proj_weight"] == (1, 1)
    for name in ["ln_final.weight", "text_projection", "logit_scale"]:
        assert depths[name][0] == 0

    # the shared embedding comes before both stacks: the lowest rate of the first (encoder)
    encoder = TransformerConfig(dim=16, n_layers=2, n_heads=2, position="t5")
    model = EncoderDecoderLM(TextConfig(vocab_size=20, transformer=encoder), decoder_layers=1)
    depths = layer_depths(model)
    assert depths["embed.token.weight"] == (3, 2)
    assert depths["encoder.blocks.0.attn.qkv.weight"] == (2, 2)
    assert depths["decoder.blocks.0.cross_attn.q.weight"] == (1, 1)
    assert depths["encoder.norm.weight"][0] == depths["decoder.norm.weight"][0] == 0


def test_no_decay_keeps_todays_two_groups():
    model = ImageClassificationModel(tiny_vit(2), num_classes=3)
    optimizer = build_optimizer(model, OptimConfig(lr=0.01, layer_decay=1.0), 10)["optimizer"]
    reference = param_groups(model, 0.05)
    assert len(optimizer.param_groups) == len(reference) == 2
    for group, ref in zip(optimizer.param_groups, reference, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in ref["params"]]
        assert group["weight_decay"] == ref["weight_decay"] and group["lr"] == 0.01
        assert "layer_depth" not in group


def test_schedule_multiplies_every_group():
    model = ImageClassificationModel(tiny_vit(2), num_classes=3)
    config = OptimConfig(lr=0.2, layer_decay=0.75, warmup_steps=4)
    built = build_optimizer(model, config, total_steps=20)
    optimizer, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
    seen = {}
    for step in range(12):
        if step in (0, 2, 4, 11):
            seen[step] = [(g["layer_depth"], g["lr"]) for g in optimizer.param_groups]
        optimizer.step()
        schedule.step()
    for step, groups in seen.items():
        factor = warmup_cosine(step, 4, 20)
        for depth, lr in groups:
            assert lr == pytest.approx(factor * 0.2 * 0.75**depth, rel=1e-12)
    assert {depth for depth, _ in seen[0]} == {0, 1, 2, 3}


def test_adamw_first_step_moves_each_group_by_its_lr():
    # Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): the group's lr is the step
    torch.manual_seed(0)
    model = ImageClassificationModel(tiny_vit(2), num_classes=3)
    config = OptimConfig(lr=1e-2, layer_decay=0.5, weight_decay=0.0, eps=1e-12)
    optimizer = build_optimizer(model, config, total_steps=10)["optimizer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 3, 16, 16)).square().sum().backward()
    optimizer.step()
    depths = layer_depths(model)
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs().max().item()
        assert moved == pytest.approx(1e-2 * 0.5 ** depths[name][0], rel=1e-3), name


def test_layer_decay_needs_the_base_lr():
    with pytest.raises(ValueError, match="lr"):
        param_groups(nn.Linear(2, 2), 0.1, layer_decay=0.5)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_bad_layer_decay_names_the_field(value):
    with pytest.raises(ValueError, match="OptimConfig.layer_decay"):
        OptimConfig(layer_decay=value)
