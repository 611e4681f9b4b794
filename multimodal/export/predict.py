"""The prediction writer of `multimodal predict`: every rank writes its rows to a part file,
rank 0 merges the parts into the output folder.

A task's `predict_step` returns the rows of one batch as a dict: `keys` (B sample keys) and
fields that are either (B, ...) tensors or lists of B values; an optional `valid` (B,) bool
marks padded items, which are dropped. Each field goes where it reads best:

- a floating tensor of 2 or more dimensions (embeddings) -> `<field>.npy` (float32, one row
  per sample) next to `keys.txt` (one key a line, the rows' order);
- everything else (captions, answers, class indices, token ids) -> `predictions.jsonl`, one
  JSON object per sample: `{"key": ..., "<field>": ...}`;
- `manifest.json` lists the files written and their rows; a later run into the same folder
  removes the files of the previous one that it does not write again.

Under DDP each rank writes `.parts/part-rank<r>.npz` and `.parts/part-rank<r>.jsonl`
(atomically: a temporary name, then `os.replace`), all ranks meet at a barrier, and rank 0
concatenates the parts in rank order, which is the order of the data: the predict loaders give
each rank a contiguous run of it (`multimodal.data.stream_plan`), so the merged files equal a
one-process run's. Shard batches read by several DataLoader workers arrive in turn from each
worker; their `order` entry (`multimodal.data.shards_datamodules.PredictShardLoader`) puts a
rank's rows back in the order of the data before its part is written. Lightning's progress
bar shows the batches as they are predicted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

log = logging.getLogger(__name__)

KEYS = "keys.txt"
JSONL = "predictions.jsonl"
MANIFEST = "manifest.json"  # what the last merge wrote: {"files": {name: rows}, "ranks": n}
PARTS = ".parts"
DEFAULT_FOLDER = "predictions"


def is_array_field(value: Any) -> bool:
    """Whether a predicted field is written as an .npy array (a float tensor of >= 2 dims)."""
    return isinstance(value, Tensor) and value.dim() >= 2 and value.is_floating_point()


def _plain(value: Any) -> Any:
    """A JSON-ready value: tensors and NumPy values become Python numbers and lists."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def split_rows(prediction: dict[str, Any]) -> tuple[list[str], dict[str, np.ndarray], list[dict]]:
    """One batch's prediction -> (keys, {field: (N, ...) float32 array}, N JSON records), the
    items whose `valid` is False left out."""
    if not isinstance(prediction, dict) or "keys" not in prediction:
        raise ValueError(
            "predict_step must return a dict with the batch's sample `keys`, got "
            f"{type(prediction).__name__}"
        )
    keys = [str(k) for k in prediction["keys"]]
    n = len(keys)
    valid = prediction.get("valid")
    keep = [True] * n if valid is None else [bool(v) for v in _plain(valid)]
    arrays: dict[str, np.ndarray] = {}
    records: list[dict[str, Any]] = [{"key": k} for k in keys]
    for name, value in prediction.items():
        if name in ("keys", "valid"):
            continue
        if len(value) != n:
            raise ValueError(f"predicted field {name!r} has {len(value)} rows for {n} keys")
        if is_array_field(value):
            arrays[name] = value.detach().float().cpu().numpy()[np.asarray(keep, dtype=bool)]
            continue
        for record, item in zip(records, value, strict=True):
            record[name] = _plain(item)
    kept = [k for k, ok in zip(keys, keep, strict=True) if ok]
    records = [r for r, ok in zip(records, keep, strict=True) if ok]
    if all(len(r) == 1 for r in records):  # only keys: no text fields
        records = []
    return kept, arrays, records


def _replace(path: Path, write: Any) -> None:
    """Write `path` atomically: `write(temporary path)`, then `os.replace`."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    _replace(path, write)


def _write_npz(path: Path, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as f:
            np.savez(f, keys=np.asarray(keys, dtype=str), **arrays)

    _replace(path, write)


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as f:
            np.save(f, array)

    _replace(path, write)


def _write_text(path: Path, text: str) -> None:
    _replace(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_part(
    folder: Path, rank: int, keys: list[str], arrays: dict[str, np.ndarray], records: list[dict]
) -> None:
    """Rank `rank`'s rows as `folder/.parts/part-rank<r>.npz` (keys and arrays) and `.jsonl`
    (records), each written atomically."""
    parts = folder / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    _write_npz(parts / f"part-rank{rank}.npz", keys, arrays)
    _write_jsonl(parts / f"part-rank{rank}.jsonl", records)


def merge_parts(folder: Path, world_size: int) -> dict[str, int]:
    """Concatenate the parts of ranks 0 .. world_size - 1 in rank order into `folder`
    (`<field>.npy` + `keys.txt`, `predictions.jsonl`); returns {file name: rows}. Reads the
    parts weights-free: `np.load(allow_pickle=False)`."""
    parts = folder / PARTS
    keys: list[str] = []
    arrays: dict[str, list[np.ndarray]] = {}
    records: list[str] = []
    for rank in range(world_size):
        with np.load(parts / f"part-rank{rank}.npz", allow_pickle=False) as part:
            keys += part["keys"].tolist()
            for name in part.files:
                if name != "keys":
                    arrays.setdefault(name, []).append(part[name])
        records += (parts / f"part-rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        log.warning("predictions: %d keys occur more than once: %r", len(repeated), repeated[0])
    written: dict[str, int] = {}
    for name, chunks in arrays.items():
        merged = np.concatenate(chunks)
        if len(merged) != len(keys):
            raise ValueError(f"{name} has {len(merged)} rows for {len(keys)} keys")
        _write_npy(folder / f"{name}.npy", merged)
        written[f"{name}.npy"] = len(merged)
    if arrays:
        _write_text(folder / KEYS, "".join(f"{k}\n" for k in keys))
        written[KEYS] = len(keys)
    if records:
        _write_text(folder / JSONL, "".join(f"{r}\n" for r in records))
        written[JSONL] = len(records)
    for stale in set(_manifest_files(folder)) - set(written):  # a previous run's, not rewritten
        (folder / stale).unlink(missing_ok=True)
    _write_text(folder / MANIFEST, json.dumps({"files": written, "ranks": world_size}, indent=1))
    shutil.rmtree(parts)
    return written


def _manifest_files(folder: Path) -> list[str]:
    """The files the last merge into `folder` wrote (none without its manifest)."""
    path = folder / MANIFEST
    if not path.is_file():
        return []
    files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    return [name for name in files if Path(name).name == name]  # plain names in the folder


class PredictionWriter(BasePredictionWriter):
    """Writes what `trainer.predict` predicts into `out_dir` (see the module docstring).

    Args:
        out_dir: the output folder (default: `predictions/` in the Trainer's
            `default_root_dir`, the run folder under `multimodal predict`).
    """

    def __init__(self, out_dir: str | os.PathLike | None = None) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.written: dict[str, int] = {}
        self._keys: list[str] = []
        self._order: list[tuple[int, ...] | None] = []
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._records: list[dict[str, Any]] = []

    def folder(self, trainer: Trainer) -> Path:
        """Where the merged files go."""
        if self.out_dir is not None:
            return self.out_dir
        return Path(trainer.default_root_dir) / DEFAULT_FOLDER

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # rows carry their keys: the batch indices Lightning cannot read from a shard loader
        # are not needed (`multimodal.data.predict_inputs.Unwrapped`)
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        if stage == "predict":
            # a rank may have no item (fewer items than ranks): it writes an empty part
            pl_module.allow_zero_length_dataloader_with_multiple_devices = True

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._keys, self._arrays, self._records, self.written = [], {}, [], {}
        self._order: list[tuple[int, ...] | None] = []  # each row's place in the data order

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        keys, arrays, records = split_rows(prediction)
        if self._keys and set(arrays) != set(self._arrays):
            raise ValueError(
                f"predicted arrays {sorted(arrays)} differ from the first batches' "
                f"{sorted(self._arrays)}"
            )
        order = batch.get("order") if isinstance(batch, dict) else None
        self._order += [None if order is None else (*order, i) for i in range(len(keys))]
        self._keys += keys
        for name, array in arrays.items():
            self._arrays.setdefault(name, []).append(array)
        self._records += records

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # not on_predict_epoch_end: Lightning skips the loop, and its epoch hooks, on a rank
        # whose loader has no batch (fewer items than ranks), which would leave the other
        # ranks waiting at the barriers
        if stage == "predict":
            self.write(trainer)

    def write(self, trainer: Trainer) -> None:
        """Write this rank's part, wait for every rank's, merge them on rank 0."""
        folder = self.folder(trainer)
        parts = folder / PARTS
        if trainer.is_global_zero and parts.exists():
            shutil.rmtree(parts)  # a previous run's parts (maybe of more ranks)
        trainer.strategy.barrier("prediction_parts_clean")
        keys, records = self._keys, self._records
        arrays = {name: np.concatenate(chunks) for name, chunks in self._arrays.items()}
        if self._order and None not in self._order:  # shard batches of several workers
            rows = sorted(range(len(keys)), key=self._order.__getitem__)
            keys = [keys[i] for i in rows]
            arrays = {name: array[rows] for name, array in arrays.items()}
            records = [records[i] for i in rows] if records else records
        write_part(folder, trainer.global_rank, keys, arrays, records)
        trainer.strategy.barrier("prediction_parts_written")
        if trainer.is_global_zero:
            self.written = merge_parts(folder, trainer.world_size)
            files = ", ".join(f"{name} ({n} rows)" for name, n in self.written.items())
            print(f"predictions: {files} in {folder}", flush=True)
        trainer.strategy.barrier("predictions_merged")
        self._keys, self._arrays, self._records, self._order = [], {}, [], []


def ensure_writer(trainer: Trainer, out_dir: str | os.PathLike | None = None) -> PredictionWriter:
    """The Trainer's `PredictionWriter` (`multimodal predict`): the one configured with
    `--trainer.callbacks`, its folder replaced by `out_dir` when given, else a new one writing
    to `out_dir` (default: the run folder's `predictions/`) added to the callbacks."""
    writers = [c for c in trainer.callbacks if isinstance(c, PredictionWriter)]
    if len(writers) > 1:
        raise ValueError(f"{len(writers)} PredictionWriter callbacks are configured; keep one")
    if writers:
        if out_dir is not None:
            writers[0].out_dir = Path(out_dir)
        return writers[0]
    writer = PredictionWriter(out_dir)
    trainer.callbacks.append(writer)
    return writer
