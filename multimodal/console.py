"""What `multimodal` prints: third-party notices silenced, progress as single lines when stdout
is not a terminal, and errors condensed to one line.

`quiet_third_party()` drops only the notices listed in `NOTICES` / `LOG_NOTICES` (matched by
message, never by category), so user warnings and every other library warning still show.
`LineProgressBar` replaces Lightning's tqdm bar in CI and SLURM logs, where each refresh of a
bar becomes a new line (2,157 lines for the digits demo).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

# (message regex, module regex) of third-party warnings that say nothing about the user's run
NOTICES: tuple[tuple[str, str], ...] = (
    # the default logger is replaced by the CLI's CSVLogger anyway
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", r"lightning\."),
    # Lightning's own pytree helper uses a torch class torch has deprecated
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r""),
    # the shard datamodules size epochs per rank and worker: __len__ is exact by construction
    (r"Your `IterableDataset` has `__len__` defined", r"lightning\."),
    # the summary counts parameters in fp32 under bf16-mixed: the count is right, MB approximate
    (r"Precision .* is not supported by the model summary", r"lightning\."),
    # a resumed run writes into its own folder; a fresh fit refuses one with checkpoints
    (r"Checkpoint directory .* exists and is not empty", r"lightning\."),
)
# prefixes of Lightning log records (rank_zero_info) that advertise other products
LOG_NOTICES: tuple[str, ...] = ("💡 Tip:",)
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LOG_NOTICES)


_FILTER = _DropNotices()


def quiet_third_party() -> None:
    """Silence the known third-party notices of `NOTICES` and `LOG_NOTICES` (idempotent)."""
    for message, module in NOTICES:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
    # rank_zero_info logs through these children; a logger's filter sees only its own records
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def stdout_is_terminal() -> bool:
    """Whether progress bars can redraw in place (stdout is a TTY)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def metric_pairs(metrics: Mapping[str, Any], skip: tuple[str, ...] = ("v_num",)) -> list[str]:
    """`name value` strings of the scalar metrics, 4 significant digits, sorted by name."""
    parts = []
    for name in sorted(metrics):
        if name in skip:
            continue
        value = metrics[name]
        if hasattr(value, "item"):
            if getattr(value, "numel", lambda: 1)() != 1:
                continue
            value = value.item()
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        parts.append(f"{name} {value}")
    return parts


def format_metrics(metrics: Mapping[str, Any], skip: tuple[str, ...] = ("v_num",)) -> str:
    """The scalar metrics on one line (see `metric_pairs`)."""
    return "  ".join(metric_pairs(metrics, skip))


class LineProgressBar(ProgressBar):
    """Progress as whole lines, for logs: one line at the end of every training epoch (with the
    latest training and validation metrics), one after each mid-epoch validation, and one every
    `interval_s` seconds of a long epoch or evaluation. Used by `multimodal fit` when stdout is
    not a terminal; Lightning's tqdm bar otherwise.

    Args:
        interval_s: at most one progress line this often within an epoch (seconds).
    """

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        if interval_s <= 0:
            raise ValueError(f"LineProgressBar.interval_s={interval_s} must be > 0")
        self.interval_s = interval_s
        self._enabled = True
        self._last_line = 0.0
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, text: str) -> None:
        if self._enabled:
            elapsed = time.monotonic() - self._start
            print(f"[{_clock(elapsed)}] {text}", flush=True)
            self._last_line = time.monotonic()

    def _due(self) -> bool:
        return time.monotonic() - self._last_line >= self.interval_s

    def _epoch(self, trainer: pl.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        return f"epoch {trainer.current_epoch + 1}/{total}"

    def _steps(self, trainer: pl.Trainer) -> str:
        total = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        return f"step {trainer.global_step}" + (f"/{total}" if total else "")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_line = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self._due():
            total = self.total_train_batches
            of = f"/{total}" if isinstance(total, int) else ""
            metrics = format_metrics(self.get_metrics(trainer, pl_module))
            where = f"{self._epoch(trainer)} batch {batch_idx + 1}{of} {self._steps(trainer)}"
            self._line(f"{where}  {metrics}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = format_metrics(self.get_metrics(trainer, pl_module))
        self._line(f"{self._epoch(trainer)} done, {self._steps(trainer)}  {metrics}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # mid-epoch validation
            metrics = format_metrics(self.get_metrics(trainer, pl_module))
            self._line(f"validation at {self._steps(trainer)}  {metrics}")

    def _evaluation_batch(self, trainer: pl.Trainer, what: str, batch_idx: int) -> None:
        if not trainer.sanity_checking and self._due():
            self._line(f"{what}: batch {batch_idx + 1}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self._evaluation_batch(trainer, "validation", batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self._evaluation_batch(trainer, "test", batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self._evaluation_batch(trainer, "predict", batch_idx)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._start = self._last_line = time.monotonic()

    on_test_start = on_validation_start
    on_predict_start = on_validation_start


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# jsonargparse's lines that restate the input rather than the problem
_NOISE = (
    re.compile(r"^\s*Subtypes: "),
    re.compile(r"^\s*Given value type: "),
    re.compile(r"^\s*Given value: "),
    re.compile(r"^\s*- Expected a <class 'NoneType'>"),
    re.compile(r"^\s*Errors:\s*$"),
)
_WRAPPERS = (
    "Does not validate against any of the Union subtypes",
    "Problem with given class_path",
)


def root_cause(error: BaseException) -> BaseException:
    """The innermost ValueError / OSError in `error`'s chain (`__cause__` or `__context__`):
    jsonargparse wraps a config class's ValueError in its own."""
    best, seen = error, set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ValueError, OSError)):
            best = current
        current = current.__cause__ or current.__context__
    return best


def one_line(error: BaseException | str) -> str:
    """An error message as one line: the root cause's message (see `root_cause`), with the
    lines jsonargparse adds around it removed and the rest joined."""
    if isinstance(error, BaseException):
        cause = root_cause(error)
        if isinstance(cause, OSError) and cause.filename is not None and cause.strerror:
            return f"{cause.strerror}: {cause.filename}"
        text = str(cause) or type(cause).__name__
    else:
        text = error
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [
        line.removeprefix("- ")
        for line in lines
        if not any(p.match(line) for p in _NOISE) and not line.startswith(_WRAPPERS)
    ]
    return "; ".join(kept or lines)
