"""Bottleneck adapters against a hand-written block forward, identity at initialisation,
AdaptConfig (freezing, train_also, the report) and adapter-only state dicts."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from multimodal.adapt import (
    AdaptConfig,
    Adapter,
    AdapterConfig,
    LoRAConfig,
    adapter_state_dict,
    add_adapters,
    apply_adaptation,
    load_adapter,
    save_adapter,
)
from multimodal.layers import TransformerConfig
from tests.adapt.test_lora import IMAGES, MODELS, randomize_lora, tiny_open_clip, tiny_vit
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in (m for m in model.modules() if isinstance(m, Adapter)):
            for p in adapter.up.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_adapter_equals_the_naive_formula():
    torch.manual_seed(0)
    adapter = Adapter(8, 3, "relu")
    h = torch.randn(2, 5, 8)
    torch.testing.assert_close(adapter(h), h, rtol=0, atol=0)  # up = 0
    nn.init.normal_(adapter.up.weight)
    nn.init.normal_(adapter.up.bias)
    down, up = adapter.down, adapter.up
    expected = h + torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(adapter(h), expected)


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_adapters_at_initialisation_leave_outputs_unchanged(name, kind):
    build, outputs = MODELS[name]
    base, adapted = build().eval(), build().eval()
    added = add_adapters(adapted, AdapterConfig(kind=kind, bottleneck=4))
    assert len(added) == 2 * (2 if kind == "houlsby" else 1)  # 2 blocks
    with torch.no_grad():
        torch.testing.assert_close(outputs(adapted), outputs(base), rtol=0, atol=1e-6)
    assert set(base.state_dict()) <= set(adapted.state_dict())  # base names kept
    randomize_adapters(adapted)
    with torch.no_grad():
        assert not torch.allclose(outputs(adapted), outputs(base), atol=1e-4)


def test_open_clip_blocks_get_adapters_on_multihead_attention_output():
    base, adapted = tiny_open_clip().eval(), tiny_open_clip().eval()
    added = add_adapters(adapted, AdapterConfig(kind="houlsby", reduction=4))
    assert len(added) == 2 * 2 * 2  # 2 towers x 2 blocks x (attn, mlp)
    assert adapted.visual.transformer.resblocks[0].attn.adapter.down.out_features == 32 // 4
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            adapted.encode_text(ids), base.encode_text(ids), atol=1e-6, rtol=0
        )
        randomize_adapters(adapted)
        assert not torch.allclose(adapted.encode_text(ids), base.encode_text(ids), atol=1e-4)


def test_houlsby_adapters_sit_on_the_branch_outputs_before_the_residual_add():
    vit = tiny_vit().eval()
    plain = copy.deepcopy(vit)
    add_adapters(vit, AdapterConfig(kind="houlsby", bottleneck=4))
    randomize_adapters(vit)
    x = torch.randn(2, 17, 32)
    for block, ref in zip(vit.encoder.blocks, plain.encoder.blocks, strict=True):
        a1, a2 = block.attn.adapter, block.mlp.adapter
        with torch.no_grad():
            h = x + a1(ref.attn(ref.norm1(x)).output)  # pre-norm blocks
            expected = h + a2(ref.mlp(ref.norm2(h)))
            torch.testing.assert_close(block(x).hidden, expected)


def test_timm_block_adapters_match_a_hand_written_forward():
    build, _ = MODELS["timm"]
    model = build().eval()
    plain = copy.deepcopy(model)
    add_adapters(model, AdapterConfig(kind="pfeiffer", bottleneck=4))
    randomize_adapters(model)
    x = torch.randn(2, 5, 32)
    block, ref = model.blocks[0], plain.blocks[0]
    with torch.no_grad():
        h = x + ref.ls1(ref.attn(ref.norm1(x)))
        expected = h + ref.ls2(block.mlp.adapter(ref.mlp(ref.norm2(h))))
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_only_adapter_parameters_get_gradients(name):
    build, outputs = MODELS[name]
    model = build()
    report = apply_adaptation(model, AdaptConfig(adapter=AdapterConfig(bottleneck=4)))
    randomize_adapters(model)
    outputs(model).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == set(report.new_parameters)
    assert all(".adapter." in n for n in trained) and len(trained) == 2 * 2 * 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained


def test_bad_adapter_configs_and_models_without_blocks_name_the_field():
    with pytest.raises(ValueError, match=r"AdapterConfig\.kind='lora'"):
        AdapterConfig(kind="lora")
    with pytest.raises(ValueError, match=r"AdapterConfig\.bottleneck=0"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(ValueError, match=r"AdapterConfig\.reduction=0"):
        AdapterConfig(reduction=0)
    with pytest.raises(ValueError, match=r"AdapterConfig\.activation='swish'"):
        AdapterConfig(activation="swish")
    with pytest.raises(ValueError, match="no supported transformer block"):
        add_adapters(nn.Sequential(nn.Linear(4, 4)), AdapterConfig())
    model = tiny_vit()
    add_adapters(model, AdapterConfig())
    with pytest.raises(ValueError, match="has an adapter already"):
        add_adapters(model, AdapterConfig())


def test_adapt_config_freezes_all_but_new_and_train_also_parameters_and_reports():
    model = tiny_vit()
    config = AdaptConfig(
        lora=LoRAConfig(rank=2, targets=["qkv"]),
        adapter=AdapterConfig(kind="pfeiffer", bottleneck=4),
        train_also=["encoder.norm"],
    )
    report = apply_adaptation(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(report.new_parameters) | {"encoder.norm.weight", "encoder.norm.bias"}
    lora = [n for n in trainable if "lora_" in n]
    adapters = [n for n in trainable if ".adapter." in n]
    assert len(lora) == 2 * 2 and len(adapters) == 2 * 4  # LoRA not put on the adapters
    total = sum(p.numel() for p in model.parameters())
    assert report.total == total
    share = 100 * report.trainable / total
    assert report.summary() == (
        "adapt: LoRA r=2 on 2 Linear layers, Pfeiffer adapters on 2 sublayers, training also "
        f"encoder.norm; {share:.2g}% of {total / 1e3:.1f}K parameters trainable"
    )


def test_a_linear_probe_trains_only_the_head_and_bad_adapt_configs_are_named():
    model = nn.Sequential()
    model.add_module("body", tiny_vit())
    model.add_module("head", nn.Linear(32, 3))
    report = apply_adaptation(model, AdaptConfig(train_also=["head"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.weight",
        "head.bias",
    }
    assert report.new_parameters == [] and report.trainable == 32 * 3 + 3
    with pytest.raises(ValueError, match=r"AdaptConfig\.train_also pattern 'hed'"):
        apply_adaptation(tiny_vit(), AdaptConfig(train_also=["hed"]))
    with pytest.raises(ValueError, match=r"AdaptConfig\.train_also=\['head'\] needs freeze_base"):
        AdaptConfig(train_also=["head"], freeze_base=False)
    with pytest.raises(ValueError, match=r"AdaptConfig\.lora must be a LoRAConfig"):
        AdaptConfig(lora=4)
    assert AdaptConfig(lora={"rank": 4}).lora == LoRAConfig(rank=4)


def test_adapter_state_dict_round_trips_into_a_fresh_base_model(tmp_path):
    config = AdaptConfig(
        lora=LoRAConfig(rank=2, targets=["qkv", "fc2"]),
        adapter=AdapterConfig(bottleneck=4),
        train_also=["encoder.norm"],
    )
    model = tiny_vit(seed=0).eval()
    apply_adaptation(model, config)
    randomize_lora(model)
    randomize_adapters(model)
    with torch.no_grad():
        model.encoder.norm.weight.mul_(1.5)  # as train_also training would
    path = save_adapter(model, tmp_path / "adapter.pt", config)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]  # no temporary file left

    fresh = tiny_vit(seed=0).eval()  # the same base weights
    with torch.no_grad():
        assert not torch.allclose(fresh(IMAGES).pooled, model(IMAGES).pooled, atol=1e-4)
    assert load_adapter(fresh, path) == config
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES).pooled, model(IMAGES).pooled, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(
        adapter_state_dict(model)
    )
    load_adapter(fresh, path)  # an adapted model is not adapted again

    def size(state: dict) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell()

    assert path.stat().st_size * 3 < size(model.state_dict())


def test_load_adapter_names_mismatched_keys_and_foreign_files(tmp_path):
    config = AdaptConfig(lora=LoRAConfig(rank=2))
    model = tiny_vit()
    apply_adaptation(model, config)
    path = save_adapter(model, tmp_path / "adapter.pt", config)
    wider = TextEncoder(TextConfig(vocab_size=30, transformer=TransformerConfig(dim=48, n_heads=2)))
    with pytest.raises(ValueError, match="does not fit the model.*not in the model"):
        load_adapter(wider, path)
    wide_vit = ViT(ViTConfig(image_size=32, patch_size=8, dim=48, n_layers=2, n_heads=2))
    with pytest.raises(ValueError, match="of another shape"):
        load_adapter(wide_vit, path)
    other = tmp_path / "weights.pt"
    torch.save(model.state_dict(), other)
    with pytest.raises(ValueError, match="not an adapter file"):
        load_adapter(tiny_vit(), other)
