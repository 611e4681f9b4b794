"""Data streams as users run them: `multimodal fit` / `validate` of the configs' datamodules
on 2 gloo processes x 2 workers (one pass per epoch, exact validation), an exact resume after
the job is SIGKILLed mid-epoch, resampled streams, and weighted mixing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from multimodal.data import ShardLoader, ShardPipelineConfig, build_pipeline
from multimodal.data.pipeline import Source
from multimodal.data.stream_plan import plan_slot
from tests.data.stream_recorder import read_records
from tests.data.test_pipeline import all_keys, key_batch, key_only, write_shards
from tests.helpers import CONFIGS, ROOT

TRAIN_SIZES = [5, 40, 12, 27, 8, 33, 19]  # 7 uneven shards, 144 samples
VAL_SIZES = [7, 11, 5]
BATCH = 8
DDP = ("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# the plan, against brute force


@pytest.mark.parametrize("training", [True, False])
def test_plan_covers_every_sample_once_with_at_most_one_padded_batch_per_rank(training):
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.randint(0, 30) for _ in range(rng.randint(1, 9))]
        if sum(counts) == 0:
            continue
        world, workers, batch = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 9)
        if sum(counts) < world:
            continue
        per_rank = []
        for rank in range(world):
            samples, batches = [], 0
            for worker in range(workers):
                plan = plan_slot(
                    counts, rank=rank, world_size=world, worker=worker, num_workers=workers,
                    batch_size=batch, epoch=3, seed=1, shuffle=True, training=training,
                )  # fmt: skip
                samples += [(s.shard, i) for s in plan.segments for i in range(s.start, s.stop)]
                batches += plan.batches
            assert len(set(samples)) == len(samples)  # a rank never holds a sample twice
            per_rank.append((samples, batches))
        everything = Counter(x for samples, _ in per_rank for x in samples)
        assert set(everything) == {(s, i) for s, n in enumerate(counts) for i in range(n)}
        padding = sum(everything.values()) - sum(counts)
        if training and world > 1:
            assert len({b for _, b in per_rank}) == 1  # equal batch counts
            assert all(len(s) == b * batch for s, b in per_rank)  # full batches
            assert padding <= world * batch
        else:
            assert padding == 0


# ---------------------------------------------------------------------------------------------
# multimodal fit under DDP, as the configs build the datamodule


def recorder(out: Path, kill_at_step: int = -1) -> str:
    spec = {"out": str(out), "kill_at_step": kill_at_step}
    return json.dumps(
        {"class_path": "tests.data.stream_recorder.StreamRecorder", "init_args": spec}
    )


def checkpoints(folder: Path, every: int) -> str:
    spec = {"dirpath": str(folder), "every_n_train_steps": every, "save_top_k": -1}
    return json.dumps(
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": spec}
    )


def fit(
    data: Path, out: Path, *extra: str, kill_at_step: int = -1, new_session: bool = False
) -> subprocess.CompletedProcess:
    """`multimodal fit` of the digits CLIP config on the uneven shards, fp32, recorded."""
    args = [
        sys.executable, "-m", "multimodal", "fit", "--config", str(CONFIGS / "clip/digits.yaml"),
        "--data.init_args.train_urls", str(data / "train"),
        "--data.init_args.val_urls", str(data / "val"),
        "--data.init_args.batch_size", str(BATCH), "--data.init_args.num_workers", "2",
        "--data.init_args.shuffle_buffer", "16",
        "--trainer.max_epochs", "2", "--trainer.precision", "32",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(out),
        f"--trainer.callbacks+={recorder(out / 'record', kill_at_step)}",
        f"--trainer.callbacks+={checkpoints(out / 'ckpt', 3)}",
        *extra,
    ]  # fmt: skip
    return subprocess.run(
        args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
        start_new_session=new_session,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def steps_after(records: list[dict], step: int) -> list[list[tuple[list[str], float]]]:
    return [[(s["keys"], s["loss"]) for s in r["train"] if s["step"] > step] for r in records]


def assert_same_continuation(reference: list[dict], resumed: list[dict], step: int) -> None:
    """From `step` on, every rank's batches equal the uninterrupted run's, key for key, and
    so do the fp32 losses (<= 1e-6)."""
    want, got = steps_after(reference, step), steps_after(resumed, step)
    assert [len(r) for r in got] == [len(r) for r in want] and got[0]
    for rank_want, rank_got in zip(want, got, strict=True):
        for (keys_want, loss_want), (keys_got, loss_got) in zip(rank_want, rank_got, strict=True):
            assert keys_got == keys_want
            assert abs(loss_got - loss_want) <= 1e-6


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uneven")
    write_shards(root / "train", TRAIN_SIZES)
    write_shards(root / "val", VAL_SIZES, prefix="val")
    return root


@pytest.mark.slow
def test_ddp_epochs_are_one_pass_and_a_sigkilled_job_resumes_exactly(uneven, tmp_path):
    """2 ranks x 2 workers, 7 uneven shards: each epoch every sample once (one padded batch
    at most per rank), no repeated sample in a batch, reshuffled epochs, equal batch counts,
    validation keys exactly once over the ranks; then a job killed in epoch 1 and resumed
    from its last checkpoint continues with the uninterrupted run's batches and losses."""
    ok(fit(uneven, tmp_path / "full", *DDP))
    full = read_records(tmp_path / "full" / "record")
    assert len(full) == 2
    train_keys = all_keys(sorted(str(p) for p in (uneven / "train").glob("*.tar")))
    epochs = sorted({s["epoch"] for s in full[0]["train"]})
    assert epochs == [0, 1]
    orders = []
    for epoch in epochs:
        batches = [[s["keys"] for s in r["train"] if s["epoch"] == epoch] for r in full]
        assert len(batches[0]) == len(batches[1]) == 9  # ceil(ceil(144 / 2) / 8)
        assert all(len(b) == BATCH and len(set(b)) == BATCH for r in batches for b in r)
        seen = Counter(k for r in batches for b in r for k in b)
        assert sorted(seen) == sorted(train_keys)  # every sample, and only samples of the set
        assert sum(seen.values()) - len(train_keys) <= 2 * BATCH  # padding: <= 1 batch/rank
        assert all(not set(r0) & set(r1) for r0, r1 in [(batches[0][0], batches[1][0])])
        orders.append([k for b in batches[0] for k in b])
    assert orders[0] != orders[1]  # reshuffled
    val_keys = all_keys(sorted(str(p) for p in (uneven / "val").glob("*.tar")))
    for n in range(2):  # one validation per epoch; together the ranks score each key once
        scored = full[0]["val"][n] + full[1]["val"][n]
        assert sorted(scored) == sorted(val_keys)

    # a job preempted hard in epoch 1: the recorder SIGKILLs every process after step 14
    killed = fit(uneven, tmp_path / "killed", *DDP, kill_at_step=14, new_session=True)
    assert killed.returncode == -signal.SIGKILL
    for rank in read_records(tmp_path / "killed" / "record"):  # the first rank there killed all
        assert rank["train"][-1]["step"] in (13, 14)
    (last,) = (tmp_path / "killed" / "ckpt").glob("*step=12.ckpt")  # every 3 steps
    ok(fit(uneven, tmp_path / "resumed", *DDP, "--ckpt_path", str(last)))
    assert_same_continuation(full, read_records(tmp_path / "resumed" / "record"), step=12)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "overrides", "resume_steps"),
    [
        ("one pass", (), (6,)),  # 18 steps per epoch: mid-epoch 0 (DDP and resampled: epoch 1)
        (
            "resampled",
            ("--data.init_args.resampled", "true", "--data.init_args.epoch_length", "6"),
            (9,),
        ),
    ],
)
def test_one_process_resumes_exactly_mid_epoch(uneven, tmp_path, mode, overrides, resume_steps):
    ok(fit(uneven, tmp_path / "full", *overrides))
    full = read_records(tmp_path / "full" / "record")
    steps = [s["step"] for s in full[0]["train"]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == (
        36 if mode == "one pass" else 12
    )
    for step in resume_steps:
        (ckpt,) = (tmp_path / "full" / "ckpt").glob(f"*step={step}.ckpt")
        out = tmp_path / f"resumed{step}"
        ok(fit(uneven, out, *overrides, "--ckpt_path", str(ckpt)))
        assert_same_continuation(full, read_records(out / "record"), step=step)


# ---------------------------------------------------------------------------------------------
# exact validation under DDP


def validate(config: str, demo: Path, out: Path, *extra: str) -> dict:
    """`multimodal validate` of a config's untrained model (seeded: the same weights in every
    run) on the demo shards, fp32; returns the records of every rank."""
    args = [
        sys.executable, "-m", "multimodal", "validate", "--config", str(CONFIGS / config),
        "--data.init_args.train_urls", str(demo / "train"),
        "--data.init_args.val_urls", str(demo / "val"),
        "--data.init_args.num_workers", "2", "--trainer.precision", "32",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out), f"--trainer.callbacks+={recorder(out)}",
        *extra,
    ]  # fmt: skip
    if config.startswith("vqa/") or config.startswith("caption/"):
        args += ["--data.init_args.tokenizer", str(demo / "tokenizer")]
    ok(subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600))
    return read_records(out)


ZEROSHOT = json.dumps(
    {"class_path": "multimodal.eval.ZeroShotRetrievalCallback", "init_args": {"classes": "digits"}}
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "extra", "exact"),
    [
        (
            "clip/digits.yaml",
            (f"--trainer.callbacks+={ZEROSHOT}",),
            ("val/zeroshot", "val/retrieval"),
        ),
        ("vqa/digits.yaml", (), ("val/acc", "val/loss")),
    ],
)
def test_validation_on_two_ranks_scores_every_item_once_and_equals_one_process(
    config, extra, exact, demo_shards, tmp_path
):
    one = validate(config, demo_shards, tmp_path / "one", *extra)
    two = validate(config, demo_shards, tmp_path / "two", *extra, *DDP)
    assert len(one) == 1 and len(two) == 2
    (keys,) = one[0]["val"]
    assert len(keys) == len(set(keys)) == (270 if config.startswith("clip") else 5 * 270)
    scored = two[0]["val"][0] + two[1]["val"][0]
    assert sorted(scored) == sorted(keys)  # every item exactly once over the ranks
    compared = [k for k in one[0]["metrics"] if k.startswith(exact)]
    assert len(compared) >= 2
    for name in compared:
        # equal up to float32 summation order: 1e-6 relative (a loss of 9.48 differed by 1.9e-6)
        expected = one[0]["metrics"][name]
        assert abs(two[0]["metrics"][name] - expected) <= 1e-6 * max(1.0, abs(expected)), name


# ---------------------------------------------------------------------------------------------
# weighted mixing


def test_weighted_mixing_draws_in_proportion_counts_sources_and_resumes_exactly(tmp_path):
    a = write_shards(tmp_path / "a", [50, 50], prefix="a")
    b = write_shards(tmp_path / "b", [30], prefix="b")
    config = ShardPipelineConfig(
        sources=[Source(a, 0.7, "web"), Source(b, 0.3, "curated")],
        batch_size=20,
        shuffle_buffer=16,
        epoch_length=500,
    )

    def loader() -> ShardLoader:
        dataset = build_pipeline(config, key_only, rank=0, world_size=1, collate=key_batch)
        return ShardLoader(dataset, num_workers=2)

    full = loader()
    epoch = [batch["keys"] for batch in full]
    draws = [k for batch in epoch for k in batch]
    assert len(draws) == 10_000
    assert abs(sum(k.startswith("a") for k in draws) / len(draws) - 0.7) <= 0.02
    assert dict(full.source_counts) == {
        "web": sum(k.startswith("a") for k in draws),
        "curated": sum(k.startswith("b") for k in draws),
    }
    interrupted = loader()
    stream = iter(interrupted)
    for _ in range(237):
        next(stream)
    state = interrupted.state_dict()
    assert len(json.dumps(state)) < 1000  # a few integers, not the shuffle buffer
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch["keys"] for batch in resumed] == epoch[237:]
