"""Named architectures: every preset has its published parameter count (built on the meta
device, no memory), names and overrides are validated with suggestions, user presets register,
and a LightningCLI config names a preset as its model's `class_path`."""

from __future__ import annotations

import inspect
import textwrap

import open_clip
import pytest
import timm
import torch
from torch import nn

from multimodal.models import (
    CLIP,
    Captioner,
    ImageClassificationModel,
    create,
    list_models,
    register_model,
    registry,
)
from multimodal.tasks import CausalLM, ContrastivePretraining, load_task
from tests.helpers import cli_from_config, save_task
from text import DecoderLM, NextSentenceHead, TextConfig
from vision import ViT

# preset -> (published parameter count, parameters the published count has that the preset
# leaves to a head, where the number comes from). The timm and open_clip counts are rebuilt
# below; the Hugging Face ones are those of transformers' BertModel(BertConfig()),
# GPT2LMHeadModel(GPT2Config()) and T5ForConditionalGeneration(T5Config()) built on the meta
# device (transformers 5.24; not rebuilt here: building them takes ~13 s on 2 cores)
PUBLISHED: dict[str, tuple[int, int, str]] = {
    # timm vit_base_patch16_224 (the paper's "86M"): tower + 1000-class head (768 x 1000 + 1000)
    "vit_b16": (86_567_656, 768 * 1000 + 1000, "timm vit_base_patch16_224"),
    # open_clip ViT-B-32 / ViT-B-16: both towers, both projections and the logit scale
    "clip_vit_b32": (151_277_313, 0, "open_clip ViT-B-32"),
    "clip_vit_b16": (149_620_737, 0, "open_clip ViT-B-16"),
    # Hugging Face BertModel of bert-base-uncased (the paper's "110M" rounds the pretraining
    # model): embeddings, 12 blocks and the pooler (768 x 768 + 768, our NextSentenceHead's)
    "bert_base": (109_482_240, 768 * 768 + 768, "HF bert-base-uncased BertModel"),
    # Hugging Face gpt2: 50,257 ids, 1,024 positions, tied output projection
    "gpt2_124m": (124_439_808, 0, "HF gpt2"),
    # Hugging Face t5-small: shared tied embedding, 6 + 6 blocks, one relative bias per stack
    "t5_small": (60_506_624, 0, "HF t5-small"),
    # open_clip coca_ViT-B-32: image, text and multimodal-decoder towers
    "coca_vit_b32": (253_560_065, 0, "open_clip coca_ViT-B-32"),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_has_every_preset_and_filters():
    assert set(PUBLISHED) <= set(list_models())
    assert list_models() == sorted(list_models())
    assert list_models("clip_*") == ["clip_vit_b16", "clip_vit_b32"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_published_parameter_count(name):
    published, in_heads, source = PUBLISHED[name]
    with torch.device("meta"):
        model = create(name)
    assert isinstance(
        model, inspect.signature(registry._MODELS[name], eval_str=True).return_annotation
    )
    counted = n_params(model) + in_heads
    assert abs(counted - published) <= 0.01 * published, f"{name}: {counted} vs {source}"


def test_vision_and_clip_presets_equal_timm_and_open_clip_exactly():
    """The counts of the reference implementations, built here: the same tensors."""
    with torch.device("meta"):
        vit = ImageClassificationModel(create("vit_b16"), 1000)
        assert n_params(vit) == n_params(timm.create_model("vit_base_patch16_224"))
        for ours, theirs in [("clip_vit_b32", "ViT-B-32"), ("clip_vit_b16", "ViT-B-16")]:
            reference = open_clip.create_model(theirs, device="meta")
            assert n_params(create(ours)) == n_params(reference), ours
        coca = open_clip.create_model("coca_ViT-B-32", device="meta")
        assert abs(n_params(create("coca_vit_b32")) / n_params(coca) - 1) < 0.01


def test_bert_base_with_pooler_is_bert_model_exactly():
    with torch.device("meta"):
        encoder = create("bert_base")
        pooler = NextSentenceHead(encoder.config.dim).pooler
    assert n_params(encoder) + n_params(pooler) == PUBLISHED["bert_base"][0]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"unknown model 'clip_vit_b23'; did you mean 'clip_vit_b32'"
    ) as info:
        create("clip_vit_b23")
    assert "gpt2_124m" in str(info.value)  # and lists the registered names


def test_unknown_override_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"'vit_b16' has no override 'image_sise'; did you mean 'image_size'"
    ):
        create("vit_b16", image_sise=384)
    with pytest.raises(
        ValueError, match=r"ViTConfig\) has no field 'n_layer'; did you mean 'n_layers'"
    ):
        create("vit_b16", vision={"n_layer": 2})
    with pytest.raises(ValueError, match=r"'vocab'.*did you mean 'vocab_size'"):
        create("gpt2_124m", text={"vocab": 100})
    with pytest.raises(ValueError, match=r"'n_head'.*did you mean 'n_heads'"):
        create("coca_vit_b32", decoder={"n_head": 4})


def test_overrides_are_applied():
    with torch.device("meta"):
        vit = create("vit_b16", image_size=384, vision={"drop_path": 0.1})
        clip = create("clip_vit_b32", context_length=64, text={"n_layers": 6, "dropout": 0.1})
        gpt = create("gpt2_124m", vocab_size=50304, dropout=0.0)
        coca = create("coca_vit_b32", decoder={"n_layers": 6})
    assert (vit.config.image_size, vit.config.drop_path) == (384, 0.1)
    assert vit.pos_embed.shape == (1, 1 + (384 // 16) ** 2, 768)
    text = clip.text_tower.config.transformer
    assert (clip.text_tower.config.max_positions, text.n_layers, text.dropout) == (64, 6, 0.1)
    assert len(clip.image_tower.encoder.blocks) == 12  # the other tower is untouched
    # nanoGPT's padded vocabulary: 47 more embedding rows, the tied head follows
    assert n_params(gpt) == PUBLISHED["gpt2_124m"][0] + 47 * 768
    assert gpt.config.transformer.attn_dropout == 0.0
    assert gpt.config.eos_id == gpt.config.pad_id == 50256  # GPT-2's <|endoftext|> stays
    assert len(coca.decoder.transformer.blocks) == 6
    assert len(coca.text_tower.transformer.blocks) == 12


def test_register_model_adds_a_user_preset(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # undone after the test

    @register_model
    def tiny_gpt(*, n_layers: int = 2) -> DecoderLM:
        """A user's preset: a small GPT-2 through the built-in one."""
        return registry.gpt2_124m(
            vocab_size=64, max_positions=16, text={"dim": 32, "n_heads": 2, "n_layers": n_layers}
        )

    register_model(name="tiny_gpt_alias")(tiny_gpt)
    assert {"tiny_gpt", "tiny_gpt_alias"} <= set(list_models("tiny_*"))
    model = create("tiny_gpt", n_layers=3)
    assert isinstance(model, DecoderLM) and len(model.transformer.blocks) == 3
    assert model(torch.randint(0, 64, (2, 8))).logits.shape == (2, 8, 64)
    with pytest.raises(ValueError, match="'tiny_gpt' is already registered"):
        register_model(tiny_gpt)
    with pytest.raises(ValueError, match=r"'layers'.*did you mean 'n_layers'"):
        create("tiny_gpt", layers=3)


CONTRASTIVE_YAML = """
    model:
      class_path: multimodal.tasks.ContrastivePretraining
      init_args:
        model:
          class_path: multimodal.models.registry.clip_vit_b32
          init_args:
            image_size: 64
            context_length: 16
            embed_dim: 32
            vision: {dim: 32, n_layers: 1, n_heads: 2}
            text: {vocab_size: 100, dim: 32, n_layers: 2, n_heads: 2}
"""
CAUSAL_LM_YAML = """
    model:
      class_path: multimodal.tasks.CausalLM
      init_args:
        model:
          class_path: multimodal.models.registry.gpt2_124m
          init_args:
            vocab_size: 64
            max_positions: 16
            text: {dim: 32, n_layers: 1, n_heads: 2}
"""


@pytest.mark.parametrize(
    ("yaml", "task", "model"),
    [(CONTRASTIVE_YAML, ContrastivePretraining, CLIP), (CAUSAL_LM_YAML, CausalLM, DecoderLM)],
)
def test_a_config_names_a_preset_as_class_path(tmp_path, yaml, task, model):
    """jsonargparse takes a function returning the expected type as a `class_path`; its
    keyword parameters are the `init_args`, checked by the parser. A checkpoint of the task
    rebuilds from its hyper-parameters (`load_task`) through the same function."""
    path = tmp_path / "config.yaml"
    path.write_text("trainer:\n  max_steps: 1\n" + textwrap.dedent(yaml))
    cli = cli_from_config(str(path))
    assert type(cli.model) is task
    built = cli.model.model
    assert type(built) is model
    if isinstance(built, CLIP):
        assert built.image_tower.config.image_size == 64
        assert built.image_tower.config.patch_size == 32  # the preset's numbers, not ViTConfig's
        assert len(built.text_tower.transformer.blocks) == 2
        assert built.text_tower.config.vocab_size == 100
    else:
        assert isinstance(built.config, TextConfig) and built.config.vocab_size == 64
        assert built.config.transformer.dim == 32 and built.config.max_positions == 16
    loaded = load_task(save_task(cli.model, tmp_path / "task.ckpt"))
    assert type(loaded.model) is model
    for key, value in cli.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_every_preset_has_typed_keyword_overrides_and_a_docstring():
    """What the YAML route and `create`'s validation rely on."""
    for name in PUBLISHED:
        preset = registry._MODELS[name]
        signature = inspect.signature(preset, eval_str=True)
        assert isinstance(signature.return_annotation, type) and issubclass(
            signature.return_annotation, nn.Module
        ), name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in signature.parameters.values())
        assert preset.__doc__, name
    assert isinstance(create("vit_b16", image_size=32, vision={"dim": 16, "n_heads": 2}), ViT)
    assert inspect.signature(registry.coca_vit_b32, eval_str=True).return_annotation is Captioner
