"""ZeroShotRetrievalCallback: in a 2-step fit it logs the zero-shot accuracy and Recall@K that
a computation by hand over the same validation batches gives; it is usable from YAML."""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LightningCLI

from multimodal.data import ImageTextDataModule
from multimodal.data.demo import HELD_OUT_TEMPLATES, render_captions, write_demo_shards
from multimodal.eval.callback import ZeroShotRetrievalCallback
from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.tasks import ContrastivePretraining
from tests.helpers import CONFIGS, quiet_trainer
from text import TextConfig, TextEncoder
from vision import ImageTransformConfig, ViT, ViTConfig

VAL_BATCHES, VAL_BATCH = 2, 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_demo_shards(root, progress=False)
    return root


def tiny_task() -> ContrastivePretraining:
    image = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2))
    text = TextEncoder(
        TextConfig(
            vocab_size=49408,
            transformer=TransformerConfig(
                dim=32, n_layers=1, n_heads=2, causal=True, position="learned", max_positions=16
            ),
        )
    )
    return ContrastivePretraining(CLIP(image, text, embed_dim=32))


def datamodule(shards) -> ImageTextDataModule:
    return ImageTextDataModule(
        str(shards / "train"),
        str(shards / "test"),
        context_length=16,
        batch_size=32,
        val_batch_size=VAL_BATCH,
        num_workers=0,
        transform=ImageTransformConfig(image_size=32, normalization="openai_clip"),
    )


def test_logs_the_metrics_computed_by_hand_over_the_validation_batches(shards):
    task, data = tiny_task(), datamodule(shards)
    callback = ZeroShotRetrievalCallback("digits", ks=(1, 5))
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=VAL_BATCHES,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(task, data)
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}

    model, tokenizer = task.model.eval(), data.tokenizer
    images, labels, references = [], [], []
    with torch.no_grad():
        loader = iter(data.val_dataloader())
        for _ in range(VAL_BATCHES):
            batch = next(loader)
            images.append(model.encode_image(batch["images"]))
            labels.append(batch["labels"])
            references += batch["references"]
        tokens = tokenizer.batch_encode([c for refs in references for c in refs], max_length=16)
        texts = model.encode_text(tokens.input_ids, tokens.attention_mask)
        prompts = [render_captions(c, HELD_OUT_TEMPLATES) for c in range(10)]
        tokens = tokenizer.batch_encode([p for ps in prompts for p in ps], max_length=16)
        prompt_features = model.encode_text(tokens.input_ids, tokens.attention_mask)
        classifier = F.normalize(
            prompt_features.view(10, len(HELD_OUT_TEMPLATES), -1).mean(1), dim=-1
        )
    images, labels = torch.cat(images), torch.cat(labels)
    assert len(images) == VAL_BATCHES * VAL_BATCH
    logits = images @ classifier.T
    top1 = (logits.argmax(1) == labels).double().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    assert logged["val/zeroshot_top1"] == pytest.approx(top1, abs=1e-6)
    assert logged["val/zeroshot_top5"] == pytest.approx(top5, abs=1e-6)

    # text -> image Recall@1 and @5 over every caption of the collected images
    counts = [len(refs) for refs in references]
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    scores = texts @ images.T  # (N_t, N_i)
    wrong_above = (scores >= scores.gather(1, owner[:, None])).sum(1) - 1
    for k in (1, 5):
        assert logged[f"val/retrieval/text_to_image/recall@{k}"] == pytest.approx(
            (wrong_above < k).double().mean().item(), abs=1.5 / len(owner)
        )
    assert "val/retrieval/image_to_text/median_rank" in logged


def test_runs_only_every_n_epochs(shards):
    task, data = tiny_task(), datamodule(shards)
    callback = ZeroShotRetrievalCallback("digits", retrieval=False, every_n_epochs=2)
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(task, data)
    assert "val/zeroshot_top1" not in trainer.callback_metrics  # epoch 1 of every 2
    trainer.validate(task, data)  # a standalone validation always evaluates
    assert "val/zeroshot_top1" in trainer.callback_metrics


def test_usable_from_a_yaml_config(tmp_path):
    snippet = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "multimodal.eval.ZeroShotRetrievalCallback",
                    "init_args": {"classes": "digits", "every_n_epochs": 5, "retrieval": True},
                }
            ]
        }
    }
    extra = tmp_path / "callbacks.yaml"
    extra.write_text(yaml.safe_dump(snippet))
    args = ["--config", str(CONFIGS / "clip/digits.yaml"), "--config", str(extra)]
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # pytest's arguments are not ours
        cli = LightningCLI(run=False, args=args, save_config_callback=None)
    found = [c for c in cli.trainer.callbacks if isinstance(c, ZeroShotRetrievalCallback)]
    assert len(found) == 1 and found[0].every_n_epochs == 5
    assert found[0].class_names[0] == "zero"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ZeroShotRetrievalCallback(None, retrieval=False)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ZeroShotRetrievalCallback("digits", every_n_epochs=0)
    with pytest.raises(ValueError, match="neither a built-in"):
        ZeroShotRetrievalCallback("no-such-classes", templates="digits")
    with pytest.raises(ValueError, match="pass templates"):
        ZeroShotRetrievalCallback("names.txt")
