"""A callback that writes what each rank trained and validated on, for the stream tests.

It is passed to `multimodal fit` / `validate` subprocesses on the command line
(`--trainer.callbacks+={"class_path": "tests.data.stream_recorder.StreamRecorder", ...}`), so
it lives in an importable module, not in a test file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StreamRecorder(Callback):
    """Writes `out/rank{R}.json`: every training step (epoch, global step, batch keys, loss),
    the validation keys of each validation epoch, and the logged metrics at the end.

    Args:
        out: folder of the records.
        kill_at_step: SIGKILL the whole process group (every rank and worker) once this many
            optimizer steps are done, like a preempted job (-1: never).
    """

    def __init__(self, out: str, kill_at_step: int = -1) -> None:
        self.out = Path(out)
        self.kill_at_step = kill_at_step
        self.record: dict[str, Any] = {"train": [], "val": [], "metrics": {}}
        self._val_keys: list[str] = []

    def _write(self, trainer: Trainer) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, path)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record["train"].append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "keys": list(batch["keys"]),
                "loss": float(loss),
            }
        )
        self._write(trainer)
        if trainer.global_step == self.kill_at_step:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._val_keys += list(batch["keys"])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.record["val"].append(self._val_keys)
        self._val_keys = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_metrics(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_metrics(trainer)

    def _save_metrics(self, trainer: Trainer) -> None:
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self._write(trainer)


def read_records(out: Path) -> list[dict[str, Any]]:
    """The records of every rank, by rank."""
    paths = sorted(out.glob("rank*.json"), key=lambda p: int(p.stem.removeprefix("rank")))
    return [json.loads(p.read_text()) for p in paths]
