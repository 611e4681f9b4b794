"""An `OpenCLIP` with local weights fine-tunes under `multimodal fit` from a YAML config, LiT
style (`lock_image_tower: true`): only the text tower, the projections and the temperature
change. The run's checkpoint then loads alone (`load_from_checkpoint`, the evaluation loader)
without the initial weights file."""

from __future__ import annotations

import json
import uuid

import open_clip
import pytest
import torch
import yaml

from multimodal.cli import main
from multimodal.eval.loading import load_model
from multimodal.tasks import ContrastivePretraining
from multimodal.train.checkpoint_file import read_weights

CONTEXT = 16
TINY = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    """A tiny architecture registered in open_clip under a name unique to this run."""
    name = f"test-tiny-lit-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{name}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return name


def fit_config(name: str, weights, shards, root) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
        },
        "model": {
            "class_path": "multimodal.tasks.ContrastivePretraining",
            "init_args": {
                "lock_image_tower": True,
                "model": {
                    "class_path": "multimodal.models.OpenCLIP",
                    "init_args": {"model_name": name, "checkpoint": str(weights)},
                },
                "optim": {"lr": 0.001, "warmup_steps": 1},
            },
        },
        "data": {
            "class_path": "multimodal.data.ImageTextDataModule",
            "init_args": {
                "train_urls": str(shards / "train"),
                "val_urls": str(shards / "val"),
                "tokenizer": "clip",
                "context_length": CONTEXT,
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 16,
                "transform": {"image_size": 32, "normalization": "openai_clip"},
            },
        },
    }


def test_open_clip_lit_fine_tuning_from_yaml_and_loading_its_checkpoint(
    tiny_name, demo_shards, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    weights = tmp_path / "init" / "tiny.pt"
    weights.parent.mkdir()
    torch.save(open_clip.create_model(tiny_name).state_dict(), weights)
    config = tmp_path / "lit.yaml"
    config.write_text(yaml.safe_dump(fit_config(tiny_name, weights, demo_shards, tmp_path / "run")))
    monkeypatch.setattr("sys.argv", ["multimodal"])
    try:
        main(["fit", "--config", str(config)])
    except SystemExit as exit:  # the CLI may end with an explicit status
        assert exit.code in (0, None)
    (checkpoint,) = sorted((tmp_path / "run").rglob("*.ckpt"))[-1:]

    before = read_weights(weights)
    after = {k.removeprefix("model.model."): v for k, v in read_weights(checkpoint).items()}
    assert after.keys() == before.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    trainable_image = {"visual.proj"}
    assert {key for key in changed if key.startswith("visual.")} == trainable_image
    assert {"text_projection", "logit_scale", "token_embedding.weight"} <= changed
    assert any(key.startswith("transformer.resblocks.1.") for key in changed)

    weights.unlink()  # a trained run needs only its checkpoint, not the initial weights
    task = ContrastivePretraining.load_from_checkpoint(checkpoint).eval()
    loaded = load_model(checkpoint)  # the zero-shot / retrieval commands' loader
    images = torch.randn(2, 3, 32, 32)
    ids = open_clip.tokenize(["a photo of a seven", "a one"], context_length=CONTEXT)
    with torch.no_grad():
        for key, value in task.model.model.state_dict().items():
            assert torch.equal(value, after[key]), key
        torch.testing.assert_close(
            loaded.model.encode_image(images), task.model.encode_image(images)
        )
        torch.testing.assert_close(loaded.model.encode_text(ids), task.model.encode_text(ids))
