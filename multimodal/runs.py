"""Where a `multimodal fit` run lives, how it resumes, and what it says when it ends.

A run's folder is `<trainer.default_root_dir>/<run name>`, the run name being `--run-name`
or the config file's name: `multimodal fit --config configs/clip/digits.yaml` writes
`runs/clip/digits/` with

    config.yaml            the full config of the run (LightningCLI)
    metrics.csv            every logged metric (CSVLogger), hparams.yaml
    checkpoints/last.ckpt  the latest state; checkpoints/<best>.ckpt by the config's metric
    hpc_ckpt_N.ckpt        written by Lightning when SLURM signals a requeue

No `version_N` folders: the same name is the same folder, so `--ckpt_path last` resumes it
(the newest of last.ckpt and the SLURM requeue checkpoints). A fresh `fit` refuses a folder
that already holds checkpoints, and a start that fails removes the folder it created.
`validate` / `test` / `predict` log to `<run>/<subcommand>/`.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from multimodal.console import metric_pairs

CHECKPOINTS = "checkpoints"
LAST = "last"  # --ckpt_path last: this run's newest checkpoint
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def check_run_name(name: str) -> str:
    """`name` if it can be a folder name on every platform; ValueError otherwise."""
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"--run-name {name!r}: use letters, digits and . _ - + = (no spaces or slashes)"
        )
    return name


def default_run_name(configs: Sequence[str | os.PathLike] | None, model_class: str | None) -> str:
    """The first config file's name without its suffix (`configs/clip/digits.yaml` ->
    `digits`), else the model's class name in lower case, else `run`."""
    for config in configs or ():
        name = Path(str(config)).stem
        if name:
            return name
    if model_class:
        return model_class.rsplit(".", 1)[-1].lower()
    return "run"


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The checkpoint files of a run folder (its checkpoints/ and SLURM requeue files)."""
    found = list((run_dir / CHECKPOINTS).glob("*.ckpt")) if (run_dir / CHECKPOINTS).is_dir() else []
    return sorted(found + list(run_dir.glob("hpc_ckpt_*.ckpt")))


def resume_path(run_dir: Path) -> Path | None:
    """The newest of the run's `last*.ckpt` and `hpc_ckpt_*.ckpt` (what `--ckpt_path last`
    resumes), or None when the run has none yet."""
    candidates = [
        path for path in checkpoints_in(run_dir) if path.name.startswith(("last", "hpc_ckpt_"))
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def check_fresh_start(run_dir: Path) -> None:
    """ValueError when a `fit` without `--ckpt_path` would write into an earlier run's
    checkpoints (mixing two runs' best checkpoints in one folder)."""
    existing = checkpoints_in(run_dir)
    if existing:
        raise ValueError(
            f"run folder {run_dir} already holds checkpoints ({existing[0].name}...): resume it "
            "with --ckpt_path last, name this run with --run-name NAME, or delete the folder"
        )


@dataclass
class RunFolder:
    """A run's folder and the highest folder above it that this process will create (so that a
    failed start can remove what it made and leave no empty run behind)."""

    path: Path
    created: Path | None = field(init=False)

    def __post_init__(self) -> None:
        self.created = None
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            self.created = folder

    def remove_if_unused(self) -> bool:
        """Delete the folders this process created if they hold no checkpoint."""
        if self.created is None or not self.created.is_dir():
            return False
        if any(self.created.rglob("*.ckpt")):
            return False
        shutil.rmtree(self.created, ignore_errors=True)
        return True


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued (its header
    kept) instead of deleted: a resumed run keeps the metrics of its earlier part."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class RunLogger(CSVLogger):
    """CSVLogger writing `metrics.csv` and `hparams.yaml` straight into a run folder
    (no name / version levels) and appending to an existing metrics.csv when a run resumes."""

    def __init__(self, run_dir: str | os.PathLike, subfolder: str = "") -> None:
        super().__init__(save_dir=str(run_dir), name="", version=subfolder)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def summary_lines(trainer: pl.Trainer, run_dir: Path | None, seconds: float) -> list[str]:
    """The end-of-run summary: where the run is, its best and last metrics, its checkpoints
    and logs, and how long it took. Fits one screen."""
    lines = [
        f"run finished: {run_dir or trainer.default_root_dir}",
        f"  trained     epochs {trainer.current_epoch}, steps {trainer.global_step}, in "
        f"{_duration(seconds)}" + ("  (interrupted)" if trainer.interrupted else ""),
    ]
    for callback in _checkpoint_callbacks(trainer.callbacks):
        if callback.monitor and callback.best_model_path:
            score = callback.best_model_score
            value = f"{score.item():.4g}" if score is not None else "?"
            lines.append(f"  best        {callback.monitor} = {value} ({callback.mode})")
            lines.append(f"              {callback.best_model_path}")
        if callback.last_model_path:
            lines.append(f"  last        {callback.last_model_path}")
    metrics = {
        name: value
        for name, value in trainer.callback_metrics.items()
        if not name.endswith("_step")  # the epoch mean is shown as `name` or `name_epoch`
    }
    rows: list[str] = []
    for pair in metric_pairs(metrics):
        if rows and len(rows[-1]) + len(pair) < 90:
            rows[-1] += "  " + pair
        else:
            rows.append(pair)
    for i, row in enumerate(rows[:6]):  # one screen: at most 6 lines of metrics
        lines.append(("  metrics     " if i == 0 else "              ") + row)
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            metrics_file = Path(log_dir) / "metrics.csv"
            lines.append(f"  log         {metrics_file if metrics_file.exists() else log_dir}")
    if run_dir is not None:
        lines.append("  resume      the same command with --ckpt_path last")
    return lines


def _checkpoint_callbacks(callbacks: Iterable[pl.Callback]) -> list[ModelCheckpoint]:
    return [c for c in callbacks if isinstance(c, ModelCheckpoint)]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d} min"


class WallClock:
    """Seconds since construction (the CLI's start)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
