"""What `multimodal fit` prints and where it writes: a short non-TTY log without third-party
notices, one run folder (best and last checkpoints, metrics, config) named after the config,
resume with --ckpt_path last, and the end-of-run summary. (--run-name: tests/cli/test_cluster.py;
a refused fresh start and bad names: tests/cli/test_errors.py.)"""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from multimodal.console import NOTICES, one_line, quiet_third_party
from multimodal.runs import RunFolder
from tests.helpers import CONFIGS, ROOT, run

SHORT = (
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "0.1",  # 1 batch of 16 (an int 1 is parsed as 1.0: all)
    "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
)  # fmt: skip
NOTICE_TEXTS = ("tensorboardX", "💡", "LeafSpec", "has `__len__` defined", "model summary")


@pytest.fixture(scope="module")
def first_run(demo_shards, tmp_path_factory):
    """configs/clip/digits.yaml fitted 3 steps in a fresh folder, stdout a pipe (not a TTY)."""
    cwd = tmp_path_factory.mktemp("console")
    (cwd / "data").mkdir()
    (cwd / "data/digits").symlink_to(demo_shards)  # the config reads data/digits
    result = subprocess.run(
        [sys.executable, "-m", "multimodal", "fit", "--config", str(CONFIGS / "clip/digits.yaml"),
         *SHORT],
        cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_fit_log_is_short_and_without_third_party_notices(first_run):
    _, result = first_run
    output = result.stdout + result.stderr
    assert len(output.splitlines()) < 200, output
    assert "\r" not in output  # no redrawn progress bars in a log
    for text in NOTICE_TEXTS:
        assert text not in output, text
    # the progress line of the epoch names the in-batch accuracy as such
    assert "epoch 1/1 done, step 3" in result.stdout and "val/inbatch_acc" in result.stdout
    assert "val/acc " not in output


def test_run_folder_holds_best_and_last_checkpoints_and_logs(first_run):
    cwd, result = first_run
    run = cwd / "runs/clip/digits"  # default_root_dir runs/clip + the config's name
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.csv", "config.yaml"):
        assert (run / name).is_file(), sorted(p.name for p in run.rglob("*"))
    assert not list(cwd.rglob("version_*")) and not list(cwd.rglob("lightning_logs"))
    summary = result.stdout[result.stdout.index("run finished: runs/clip/digits") :]
    assert "epochs 1, steps 3" in summary
    assert "best        val/loss = " in summary
    assert "runs/clip/digits/checkpoints/best.ckpt" in summary
    assert "last        runs/clip/digits/checkpoints/last.ckpt" in summary
    assert "log         runs/clip/digits/metrics.csv" in summary
    assert len(summary.splitlines()) <= 20  # one screen


def test_resume_continues_the_run_and_its_metrics(first_run):
    cwd, _ = first_run
    clip = ["fit", "--config", str(CONFIGS / "clip/digits.yaml"), *SHORT]
    # each training run in its own process (one interpreter per run, as users run them)
    resumed = run(*clip, "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epochs 2, steps 6" in resumed.stdout  # 3 steps, then 3 more from last.ckpt
    assert "runs/clip/digits/checkpoints/last.ckpt" in resumed.stdout + resumed.stderr
    with open(cwd / "runs/clip/digits/metrics.csv", newline="") as file:
        steps = {int(row["step"]) for row in csv.DictReader(file)}
    assert min(steps) < 3 and max(steps) >= 5, steps  # the first part's rows are kept


def test_known_notices_are_silenced_but_not_user_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit(
            "Your `IterableDataset` has `__len__` defined. In combination with ...",
            UserWarning, "data.py", 1, module="lightning.pytorch.utilities.data",
        )  # fmt: skip
        own = "Your `IterableDataset` has `__len__` defined (a user's own warning)"
        warnings.warn(own, stacklevel=1)
        warnings.warn("something the user should see", stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert NOTICES  # the filters above come from this table
    assert messages == [
        "Your `IterableDataset` has `__len__` defined (a user's own warning)",
        "something the user should see",
    ]


def test_one_line_reports_the_innermost_value_error():
    try:
        try:
            raise ValueError("ShardPipelineConfig.batch_size=-3 must be > 0")
        except ValueError:
            raise ValueError(
                "Does not validate against any of the Union subtypes\nSubtypes: [A, None]\n"
                "Errors:\n  - ShardPipelineConfig.batch_size=-3 must be > 0\n"
                "  - Expected a <class 'NoneType'>\nGiven value type: <class 'Namespace'>"
            ) from None
    except ValueError as error:
        wrapped = error
    assert one_line(wrapped) == "ShardPipelineConfig.batch_size=-3 must be > 0"
    assert one_line(str(wrapped)) == "ShardPipelineConfig.batch_size=-3 must be > 0"
    assert one_line(FileNotFoundError(2, "No such file or directory", "x.yaml")) == (
        "No such file or directory: x.yaml"
    )


def test_a_failed_start_removes_only_what_it_created(tmp_path):
    made = RunFolder(tmp_path / "runs/clip/digits")
    (tmp_path / "runs/clip/digits").mkdir(parents=True)
    (tmp_path / "runs/clip/digits/config.yaml").write_text("x")
    assert made.remove_if_unused() and not (tmp_path / "runs").exists()

    kept = RunFolder(tmp_path / "runs/clip/digits")
    (tmp_path / "runs/clip/digits/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/clip/digits/checkpoints/last.ckpt").write_text("x")
    assert not kept.remove_if_unused() and Path(tmp_path / "runs/clip/digits").is_dir()
    existing = RunFolder(tmp_path / "runs/clip/digits")
    assert existing.created is None and not existing.remove_if_unused()


def test_more_cpu_processes_than_cores_warn_once(capsys, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator

    from multimodal.cli import warn_if_processes_exceed_cores

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cpu = CPUAccelerator()
    for devices, rank_zero in ((3, True), (2, True), (3, False)):
        trainer = SimpleNamespace(accelerator=cpu, is_global_zero=rank_zero, num_devices=devices)
        warn_if_processes_exceed_cores(trainer)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: --trainer.devices 3 starts 3 processes on 2 CPU cores: each gets less than a "
        "core, so the run is slower than with --trainer.devices 2"
    ]
