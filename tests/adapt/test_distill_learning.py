"""A 2-layer CLIP distilled from the 4-layer digits CLIP (configs/adapt/clip_distill.yaml)
classifies held-out digits zero-shot at least as well as the same student trained for the same
steps without the teacher (configs/clip/digits.yaml with 2 + 2 layers)."""

from __future__ import annotations

import time

import pytest
import torch

from multimodal.data.demo import HELD_OUT_TEMPLATES, render_captions
from multimodal.eval.zeroshot import zeroshot_classifier, zeroshot_logits
from tests.helpers import cli_from_config
from tests.tasks.test_vision_language_training import data_overrides

TEACHER_EPOCHS = 16  # 20 steps of 64 an epoch
STUDENT_EPOCHS = 4
FP32 = ("--trainer.precision", "32-true", "--trainer.limit_val_batches", "0")
MODEL = "--model.init_args.model.init_args."
TWO_LAYERS = (
    MODEL + "image_tower.init_args.config.n_layers", "2",
    MODEL + "text_tower.init_args.config.transformer.n_layers", "2",
)  # fmt: skip


def zero_shot_top1(cli) -> float:
    """Zero-shot top-1 on the val split with prompt templates held out of training."""
    model, data = cli.model.model.eval(), cli.datamodule
    classifier = zeroshot_classifier(
        model,
        data.tokenizer,
        [render_captions(c, HELD_OUT_TEMPLATES) for c in range(10)],
        context_length=data.context_length,
    )
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = zeroshot_logits(model.encode_image(batch["images"]), classifier)
            correct += (logits.argmax(1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    return correct / total


def trained(config: str, epochs: int, *overrides: str):
    cli = cli_from_config(config, *overrides, *FP32, "--trainer.max_epochs", str(epochs))
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


@pytest.mark.slow
def test_distilled_student_beats_the_student_trained_alone(demo_shards, tmp_path):
    data = (*data_overrides("clip/digits.yaml", demo_shards), "--data.init_args.num_workers", "1")
    start = time.perf_counter()
    teacher = trained("clip/digits.yaml", TEACHER_EPOCHS, *data)
    path = tmp_path / "teacher.ckpt"  # the format load_task reads, as `multimodal fit` writes
    torch.save(
        {"state_dict": teacher.model.state_dict(), "hyper_parameters": dict(teacher.model.hparams)},
        path,
    )
    teacher_time = time.perf_counter() - start

    start = time.perf_counter()
    distilled = trained(
        "adapt/clip_distill.yaml",
        STUDENT_EPOCHS,
        *data,
        "--model.init_args.teacher_checkpoint", str(path),
    )  # fmt: skip
    distilled_time = time.perf_counter() - start
    start = time.perf_counter()
    alone = trained("clip/digits.yaml", STUDENT_EPOCHS, *data, *TWO_LAYERS)
    alone_time = time.perf_counter() - start
    assert distilled.trainer.global_step == alone.trainer.global_step > 0
    assert sum(p.numel() for p in distilled.model.parameters()) == sum(
        p.numel() for p in alone.model.parameters()
    )  # the same student

    scores = {
        "teacher": zero_shot_top1(teacher),
        "distilled": zero_shot_top1(distilled),
        "alone": zero_shot_top1(alone),
    }
    print(
        f"zero-shot top-1: teacher ({TEACHER_EPOCHS} epochs, {teacher_time:.0f} s) "
        f"{scores['teacher']:.3f}; 2-layer student ({STUDENT_EPOCHS} epochs) distilled "
        f"({distilled_time:.0f} s) {scores['distilled']:.3f}, alone ({alone_time:.0f} s) "
        f"{scores['alone']:.3f}"
    )
    assert scores["teacher"] > scores["alone"], scores  # a teacher worth distilling
    assert scores["distilled"] >= scores["alone"], scores
