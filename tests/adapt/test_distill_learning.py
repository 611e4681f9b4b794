"""A 1 + 1-layer CLIP distilled from the 2 + 3-layer digits CLIP (configs/adapt/clip_distill.yaml)
classifies held-out digits zero-shot at least as well as the same student trained for the same
steps without the teacher (configs/clip/digits.yaml with 1 + 1 layers). The teacher is the
session's trained digits CLIP (tests/conftest.py)."""

from __future__ import annotations

import time

import pytest

from multimodal.tasks import load_task
from tests.helpers import cli_from_config, held_out_zeroshot
from tests.tasks.test_vision_language_training import data_overrides

STUDENT_EPOCHS = 4
NO_VAL = ("--trainer.limit_val_batches", "0")
MODEL = "--model.init_args.model.init_args."
ONE_LAYER = (
    MODEL + "image_tower.init_args.config.n_layers", "1",
    MODEL + "text_tower.init_args.config.transformer.n_layers", "1",
)  # fmt: skip


def trained(config: str, *overrides: str):
    cli = cli_from_config(config, *overrides, *NO_VAL, "--trainer.max_epochs", str(STUDENT_EPOCHS))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, time.perf_counter() - start


# One training of each is within the noise. At the distillation temperature 1 a full-suite
# run gave distilled 0.648 vs alone 0.663, and five seeds +0.4 points on their means; at the
# config's 2: 0.686 vs 0.607 on the means, every seed ahead (+5.2 to +10.0). The test compares
# the means of five seeded pairs.
SEEDS = (0, 1, 2, 3, 4)


@pytest.mark.slow
@pytest.mark.xdist_group("trained_digits_clip")  # one worker trains the shared CLIP
def test_distilled_student_beats_the_student_trained_alone(trained_digits_clip, demo_shards):
    _, teacher_path = trained_digits_clip
    data = (*data_overrides("clip/digits.yaml", demo_shards), "--data.init_args.num_workers", "1")
    teacher = load_task(teacher_path).model
    scores: dict[str, list[float]] = {"teacher": [], "distilled": [], "alone": []}
    seconds = {"distilled": 0.0, "alone": 0.0}
    for seed in SEEDS:
        seeded = (*data, "--seed_everything", str(seed))
        distilled, distilled_time = trained(
            "adapt/clip_distill.yaml", *seeded,
            "--model.init_args.teacher_checkpoint", str(teacher_path),
        )  # fmt: skip
        alone, alone_time = trained("clip/digits.yaml", *seeded, *ONE_LAYER)
        assert distilled.trainer.global_step == alone.trainer.global_step > 0
        assert sum(p.numel() for p in distilled.model.parameters()) == sum(
            p.numel() for p in alone.model.parameters()
        )  # the same student
        val = distilled.datamodule  # the val split, for all three
        for name, model in (
            ("teacher", teacher), ("distilled", distilled.model.model), ("alone", alone.model.model)
        ):  # fmt: skip
            scores[name].append(held_out_zeroshot(model, val)[0].float().mean().item())
        seconds["distilled"] += distilled_time
        seconds["alone"] += alone_time
    mean = {name: sum(values) / len(values) for name, values in scores.items()}
    print(
        f"zero-shot top-1 on the val split: teacher {mean['teacher']:.3f}; 1 + 1-layer student "
        f"({STUDENT_EPOCHS} epochs, seeds {SEEDS}) distilled {scores['distilled']} "
        f"({seconds['distilled']:.0f} s), alone {scores['alone']} ({seconds['alone']:.0f} s)"
    )
    assert mean["teacher"] > mean["alone"], scores  # a teacher worth distilling
    assert mean["distilled"] >= mean["alone"], scores
