"""LoRA: `LoRALinear` against the naive formula, identity at initialisation on our towers and
timm's / open_clip's, gradients only where asked, merge/unmerge, and config validation."""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.model import CLIP as OpenClipCLIP
from torch import nn

from multimodal.adapt import (
    AdaptConfig,
    LoRAConfig,
    LoRALinear,
    add_lora,
    apply_adaptation,
    lora_layers,
    merge_lora,
    merged_state_dict,
    name_matches,
    unmerge_lora,
)
from multimodal.layers import TransformerConfig
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[1, 5, 7, 9, 3, 2, 0, 0], [1, 4, 4, 6, 8, 10, 11, 2]])  # (2, 8)
MASK = IDS != 0


def tiny_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=2))


def tiny_text(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(
        TextConfig(
            vocab_size=30,
            transformer=TransformerConfig(dim=32, n_layers=2, n_heads=2, max_positions=8),
        )
    )


def tiny_timm(seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
    )


def tiny_open_clip(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return OpenClipCLIP(
        embed_dim=16,
        vision_cfg=dict(width=32, layers=2, image_size=32, patch_size=8, head_width=16),
        text_cfg=dict(width=32, layers=2, heads=2, context_length=8, vocab_size=50),
    )


# name -> (builder, outputs)
MODELS = {
    "vit": (tiny_vit, lambda m: m(IMAGES).pooled),
    "text": (tiny_text, lambda m: m(IDS, attention_mask=MASK).tokens),
    "timm": (tiny_timm, lambda m: m(IMAGES)),
}


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (as after training), so the update shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator) * 0.1)


def test_lora_linear_equals_the_naive_formula_and_shares_the_base_parameters():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    names = set(base.state_dict())
    layer = LoRALinear(base, rank=3, alpha=7.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(layer.state_dict()) == names | {"lora_a", "lora_b"}
    nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 2, 6)
    a, b = layer.lora_a, layer.lora_b
    expected = x @ base.weight.T + base.bias + (x @ a.T @ b.T) * (7.0 / 3)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_dropout_acts_on_the_update_only():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=2.0, dropout=0.5).train()
    x = torch.randn(8, 6)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: dropout changes nothing
    nn.init.normal_(layer.lora_b)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + dropped @ layer.lora_a.T @ layer.lora_b.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_at_initialisation_leaves_outputs_unchanged(name):
    build, outputs = MODELS[name]
    base, adapted = build().eval(), build().eval()
    replaced = add_lora(adapted, LoRAConfig(rank=4))
    assert len(replaced) == 2 * 4  # qkv, proj, fc1, fc2 of each of 2 blocks
    with torch.no_grad():
        torch.testing.assert_close(outputs(adapted), outputs(base), rtol=0, atol=1e-6)
    base_keys = set(base.state_dict())
    adapted_keys = set(adapted.state_dict())
    assert base_keys <= adapted_keys
    assert {k.rsplit(".", 1)[-1] for k in adapted_keys - base_keys} == {"lora_a", "lora_b"}
    adapted.load_state_dict(base.state_dict(), strict=False)  # a base checkpoint still loads


@pytest.mark.parametrize("name", list(MODELS))
def test_only_lora_and_train_also_parameters_get_gradients(name):
    build, outputs = MODELS[name]
    model = build()
    report = apply_adaptation(
        model, AdaptConfig(lora=LoRAConfig(rank=2, targets=["qkv"]), train_also=["norm"])
    )
    randomize_lora(model)  # with B = 0, A gets no gradient
    outputs(model).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n in report.new_parameters} | {
        n for n, _ in model.named_parameters() if "norm" in n.split(".")[:-1]
    }  # the final norm (`norm1` / `norm2` of the blocks are other names)
    assert {n.rsplit(".", 1)[-1] for n in report.new_parameters} == {"lora_a", "lora_b"}
    assert trained == expected and len(expected) > len(report.new_parameters)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expected), n
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert report.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_lora_equals_unmerged_and_unmerge_restores_the_weights(name):
    build, outputs = MODELS[name]
    model = build().eval()
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = outputs(model)
        assert merge_lora(model) == 8
        merged = outputs(model)
        merge_lora(model)  # merging twice adds nothing more
        again = outputs(model)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, merged, rtol=0, atol=0)
    layer = lora_layers(model)[0]
    base_weight = before[next(n for n, p in model.named_parameters() if p is layer.weight)]
    torch.testing.assert_close(layer.weight, base_weight + layer.delta_weight())
    assert unmerge_lora(model) == 8
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_state_dict_loads_into_the_plain_base_model(name):
    build, outputs = MODELS[name]
    plain, model = build().eval(), build().eval()
    add_lora(model, LoRAConfig(rank=4))
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain.load_state_dict(merged_state_dict(model))  # strict: the base keys exactly
    with torch.no_grad():
        torch.testing.assert_close(outputs(plain), outputs(model), rtol=0, atol=1e-5)
    for key, value in model.state_dict().items():  # the model is left as it was
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_open_clip_reaches_the_mlp_linears_but_not_multihead_attention():
    model = tiny_open_clip().eval()
    reference = copy.deepcopy(model)
    replaced = add_lora(model, LoRAConfig(targets=["c_fc", "c_proj", "out_proj"]))
    assert len(replaced) == 2 * 2 * 2  # 2 towers x 2 blocks x (c_fc, c_proj)
    assert not any("out_proj" in n for n in replaced)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(IMAGES), reference.encode_image(IMAGES), rtol=0, atol=1e-6
        )
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        add_lora(tiny_open_clip(), LoRAConfig(targets=["out_proj"]))


def test_targets_match_the_last_component_or_a_dotted_pattern():
    name = "image_tower.encoder.blocks.0.attn.qkv"
    assert name_matches(name, "qkv")
    assert name_matches(name, "q*")
    assert not name_matches(name, "attn")  # dotless: the last component only
    assert not name_matches(name, "kv")
    assert name_matches(name, "image_tower.*.qkv")
    assert name_matches("model." + name, "image_tower.*.qkv")  # a tail at a component
    assert not name_matches("model.xyimage_tower.encoder.blocks.0.attn.qkv", "image_tower.*")
    assert name_matches(name, "*.attn.qkv")
    assert not name_matches(name, "text_tower.*.qkv")
    model = tiny_vit()
    replaced = add_lora(model, LoRAConfig(targets=["encoder.blocks.1.*.fc*"]))
    assert replaced == ["encoder.blocks.1.mlp.fc1", "encoder.blocks.1.mlp.fc2"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "LoRAConfig.rank=0"),
        ({"alpha": 0.0}, "LoRAConfig.alpha=0.0"),
        ({"alpha": -1.0}, "LoRAConfig.alpha=-1.0"),
        ({"dropout": 1.0}, "LoRAConfig.dropout=1.0"),
        ({"dropout": -0.1}, "LoRAConfig.dropout=-0.1"),
        ({"targets": []}, "LoRAConfig.targets"),
        ({"targets": "qkv"}, "LoRAConfig.targets"),
    ],
)
def test_bad_lora_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        LoRAConfig(**kwargs)


def test_targets_matching_nothing_name_the_patterns_and_list_linears():
    with pytest.raises(ValueError, match=r"LoRAConfig\.targets=\['wq', 'wv'\].*blocks\.0\.attn"):
        add_lora(tiny_vit(), LoRAConfig(targets=["wq", "wv"]))
