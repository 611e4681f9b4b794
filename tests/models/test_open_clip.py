"""OpenCLIP: strict local checkpoints reproduce the source model's embeddings exactly, our CLIP
tokenizer feeds it the ids of `open_clip.tokenize`, and it trains under ContrastivePretraining."""

from __future__ import annotations

import json
import math
import uuid

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from multimodal.models import OpenCLIP
from multimodal.models.clip import CLIPOutput
from multimodal.models.open_clip import OpenClipTokenizer
from multimodal.tasks import ContrastivePretraining, OptimConfig
from tests.helpers import quiet_trainer
from text import load_tokenizer

CONTEXT = 16
TINY = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}  # fmt: skip
TEXTS = ["a photo of a cat.", "A DOG!", "", "the quick brown fox jumps over the lazy dog " * 3]


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    """A tiny architecture registered in open_clip under a name unique to this run."""
    name = f"test-tiny-clip-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{name}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return name


@pytest.fixture(scope="module")
def source(tiny_name):
    """A randomly initialised open_clip model, with a non-default logit scale."""
    torch.manual_seed(1)
    model = open_clip.create_model(tiny_name).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    return model


@pytest.fixture(scope="module")
def checkpoint(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoints") / "tiny.pt"
    torch.save(source.state_dict(), path)
    return path


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def test_torch_and_safetensors_checkpoints_reproduce_the_source_embeddings(
    tiny_name, source, checkpoint, tmp_path
):
    nested = tmp_path / "nested.pth"  # open_clip's training format: DDP prefix under state_dict
    ddp_state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": ddp_state}, nested)
    safetensors = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(safetensors))
    x = images()
    ids = open_clip.tokenize(TEXTS, context_length=CONTEXT)
    with torch.no_grad():
        want_image = source.encode_image(x, normalize=True)
        want_text = source.encode_text(ids, normalize=True)
        for path in (checkpoint, nested, safetensors):
            model = OpenCLIP(tiny_name, checkpoint=path).eval()
            torch.testing.assert_close(model.encode_image(x), want_image, rtol=0, atol=1e-6)
            torch.testing.assert_close(model.encode_text(ids), want_text, rtol=0, atol=1e-6)
            unnormalised = model.encode_image(x, normalize=False)
            assert not torch.allclose(unnormalised.norm(dim=-1), torch.ones(3))
            torch.testing.assert_close(model.scale(), torch.tensor(20.0))
    assert model.embed_dim == 32 and model.context_length == CONTEXT


def test_our_clip_tokenizer_ids_give_open_clip_text_embeddings(tiny_name, source, checkpoint):
    model = OpenCLIP(tiny_name, checkpoint=checkpoint).eval()
    ours = load_tokenizer("clip").batch_encode(TEXTS, max_length=CONTEXT)  # padded to longest
    with torch.no_grad():
        got = model.encode_text(ours.input_ids, ours.attention_mask)
        want = source.encode_text(open_clip.tokenize(TEXTS, context_length=CONTEXT), True)
        shorter = load_tokenizer("clip").batch_encode(TEXTS[:2], max_length=CONTEXT)
        assert shorter.input_ids.shape[1] < CONTEXT  # padded here up to the context length
        want_shorter = source.encode_text(open_clip.tokenize(TEXTS[:2], CONTEXT), True)
        got_shorter = model.encode_text(shorter.input_ids)
    torch.testing.assert_close(got_shorter, want_shorter, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert type(model.tokenizer) is type(load_tokenizer("clip"))
    with pytest.raises(ValueError, match="context_length=16"):
        model.encode_text(torch.zeros(2, CONTEXT + 1, dtype=torch.long))


def test_adapter_over_an_open_clip_tokenizer_gives_its_ids():
    """The adapter used for Hugging Face / SigLIP tokenizers, checked on open_clip's BPE."""
    adapter = OpenClipTokenizer(
        open_clip.get_tokenizer("ViT-B-32"), context_length=CONTEXT, pad_id=0
    )
    batch = adapter.batch_encode(TEXTS, max_length=77)
    assert torch.equal(batch.input_ids, open_clip.tokenize(TEXTS, context_length=CONTEXT))
    assert torch.equal(batch.attention_mask, batch.input_ids != 0)
    assert adapter.batch_encode(TEXTS, max_length=8).input_ids.shape == (len(TEXTS), 8)


def test_missing_checkpoint_is_named(tiny_name, tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        OpenCLIP(tiny_name, checkpoint=path)


def test_missing_and_unexpected_keys_are_named(tiny_name, source, tmp_path):
    state = dict(source.state_dict())
    del state["ln_final.weight"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="broken.pt") as error:
        OpenCLIP(tiny_name, checkpoint=path)
    message = str(error.value)
    assert "missing keys (ln_final.weight)" in message
    assert "unexpected keys (visual.extra_head.weight)" in message


def test_shape_mismatch_is_named(tiny_name, source, tmp_path):
    state = dict(source.state_dict())
    state["text_projection"] = torch.zeros(64, 16)
    path = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    expected = r"narrow.safetensors.*text_projection: checkpoint \(64, 16\), model \(64, 32\)"
    with pytest.raises(ValueError, match=expected):
        OpenCLIP(tiny_name, checkpoint=path)


def test_bad_arguments_raise(tiny_name, checkpoint):
    with pytest.raises(ValueError, match="not both"):
        OpenCLIP(tiny_name, pretrained="openai", checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"open_clip.list_models\(\)"):
        OpenCLIP("no-such-architecture")


def test_scale_is_clamped_at_100_and_forward_returns_clip_output(tiny_name):
    model = OpenCLIP(tiny_name)
    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(500.0))
    torch.testing.assert_close(model.scale(), torch.tensor(100.0))
    assert model.scale().shape == ()
    ids = load_tokenizer("clip").batch_encode(TEXTS[:3], max_length=CONTEXT)
    out = model(images(), ids.input_ids, ids.attention_mask)
    assert isinstance(out, CLIPOutput) and out.logit_bias is None
    assert out.image_features.shape == out.text_features.shape == (3, 32)
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))
    assert model.no_weight_decay() == {"model.logit_scale"}
    with pytest.raises(ValueError, match="no token features"):
        model(images(), ids.input_ids, return_tokens=True)
    model.lock_image_tower()
    frozen = {n for n, p in model.model.visual.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.model.visual.named_parameters()} - {"proj"}
    assert model.model.token_embedding.weight.requires_grad


def test_siglip_bias_and_two_contrastive_training_steps(tiny_name):
    model = OpenCLIP(tiny_name, init_logit_bias=-10.0)
    assert isinstance(model.logit_bias, torch.nn.Parameter)
    assert model.no_weight_decay() == {"model.logit_scale", "model.logit_bias"}
    tokens = load_tokenizer("clip").batch_encode(TEXTS, max_length=CONTEXT)
    batches = [
        {
            "images": images(4),
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
        }
        for _ in range(2)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = ContrastivePretraining(model, loss="siglip", optim=OptimConfig(lr=1e-3))
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(task, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    for name in ("model.visual.proj", "model.text_projection", "model.logit_bias"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
