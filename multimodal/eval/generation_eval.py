"""What `multimodal caption-eval` and `multimodal vqa-eval` share: their arguments, the
task and datamodule rebuilt from a checkpoint, the loader over the evaluation shards, the
report's meta data and the predictions file.

The task and its datamodule come from the fit config (`instantiate_model_and_data`, the
checkpoint rebuilt by `load_task`), so the evaluation feeds the model exactly as validation
does: the datamodule's own sample map (evaluation image transform, tokenizer) and collate,
over every sample of the shards once, in order.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from multimodal.checkpoint_check import check_torch_file
from multimodal.data.pipeline import ShardLoader, ShardPipelineConfig, build_pipeline
from multimodal.eval.arguments import checkpoint_arguments, run_arguments
from multimodal.eval.loading import instantiate_model_and_data
from multimodal.eval.zeroshot import PRECISIONS
from multimodal.tasks.loading import RUN_CONFIG, find_run_config, read_config_file

EXIT_BAD_INPUT = 2  # as argparse and the other evaluation commands
PREDICTIONS_FILE = "predictions.jsonl"
PACKAGES = ("torch", "lightning", "torchvision", "webdataset", "multimodal")
HASH_CHUNK = 1 << 20


def common_parser(prog: str, description: str, out: str) -> argparse.ArgumentParser:
    """The arguments of both commands: checkpoint, config, data, report folder, loader and
    device settings, examples."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    checkpoint_arguments(parser)
    parser.add_argument(
        "--data", required=True, metavar="SHARDS", help="shards: a folder, brace pattern or list"
    )
    parser.add_argument("--out", default=out, metavar="DIR", help=f"report folder ({out})")
    run_arguments(parser, batch_size=64, items="items")
    parser.add_argument(
        "--examples", type=int, default=8, metavar="N", help="examples a table in the report (8)"
    )
    return parser


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse errors for counts out of range."""
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    if args.num_workers < 0:
        parser.error(f"--num-workers={args.num_workers} must be >= 0")
    if args.examples < 0:
        parser.error(f"--examples={args.examples} must be >= 0")


def fail(prog: str, error: Exception) -> int:
    """One line on stderr naming the command and the error; the bad-input exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


@dataclass
class LoadedRun:
    """A trained task ready to evaluate, its datamodule and where they came from."""

    task: Any  # the LightningModule, in eval mode, on the device
    data: Any  # the LightningDataModule of the fit config (not set up)
    checkpoint: Path
    config: Path


def _class_of(section: Any) -> type | None:
    """The class a config section's class_path names, or None when it names none."""
    path = section.get("class_path") if isinstance(section, dict) else None
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def load_run(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | None,
    *,
    task_class: type,
    data_class: type,
    command: str,
    device: str = "cpu",
) -> LoadedRun:
    """The task of `checkpoint` rebuilt from its fit config (default: the config.yaml saved
    with the run) with its weights, and the config's datamodule. ValueError or
    FileNotFoundError with one line when the checkpoint is missing or not a torch file, or
    the config trains another task than `task_class` or reads other data than `data_class`."""
    checkpoint = check_torch_file(checkpoint)
    if config is None:
        config = find_run_config(checkpoint)
        if config is None:
            raise FileNotFoundError(
                f"no config for checkpoint {str(checkpoint)!r}: pass --config (the fit config); "
                f"looked for {RUN_CONFIG} in the run folder {checkpoint.resolve().parent.parent}"
            )
    config = Path(config)
    content = read_config_file(config, "model", "data")
    for section, expected in (("model", task_class), ("data", data_class)):
        found = _class_of(content[section])
        if found is not None and not issubclass(found, expected):
            raise ValueError(
                f"config {str(config)!r} has {section} {content[section]['class_path']}: "
                f"{command} needs a {expected.__module__}.{expected.__name__} checkpoint "
                f"and its fit config"
            )
    task, data = instantiate_model_and_data(config, checkpoint)
    for what, value, expected in (("task", task, task_class), ("datamodule", data, data_class)):
        if not isinstance(value, expected):
            raise ValueError(
                f"config {str(config)!r} builds a {type(value).__name__} {what}: {command} "
                f"needs a {expected.__name__}"
            )
    task.eval().to(device)
    return LoadedRun(task, data, checkpoint, config)


def shard_loader(
    urls: str | list[str],
    map_sample: Callable[[dict[str, Any]], Any],
    collate: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    num_workers: int,
    one_item_per_sample: bool,
) -> ShardLoader:
    """Every sample of the shards once, the last batch kept partial, mapped and collated as a
    datamodule's validation loader does it (one process, no shuffling): in shard order with
    0 or 1 workers, several workers interleaving the batches of their shards."""
    config = ShardPipelineConfig(
        urls=urls,
        batch_size=batch_size,
        shuffle_shards=False,
        shuffle_buffer=0,
        drop_last=False,
        training=False,
        one_item_per_sample=one_item_per_sample,
    )
    dataset = build_pipeline(config, map_sample, rank=0, world_size=1, collate=collate)
    return ShardLoader(dataset, num_workers=num_workers)


def progress_bar(loader: Iterable[Any], desc: str, enabled: bool) -> Iterator[Any]:
    """tqdm over the batches, with a total when the loader knows its length."""
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return iter(tqdm(loader, desc=desc, total=total, unit="batch", disable=not enabled))


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast in `precision` (fp32: no autocast) on the device's type."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file (of every file, sorted by name, for a checkpoint folder)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def package_versions(names: Sequence[str] = PACKAGES) -> str:
    """ "python 3.12.3, torch 2.x, ...": the installed versions of `names` (those installed)."""
    versions = [f"python {platform.python_version()}"]
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(versions)


def run_meta(run: LoadedRun, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The report's meta data: model, checkpoint and its hash, config, data, `extra` (the
    generation settings), precision, device, date and package versions."""
    return {
        "model": type(run.task.model).__name__,
        "task": type(run.task).__name__,
        "checkpoint": str(run.checkpoint),
        "checkpoint_sha256": file_sha256(run.checkpoint),
        "config": str(run.config),
        "data": args.data,
        **extra,
        "precision": args.precision,
        "device": args.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
    }


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One JSON object a line, written to a temporary file that then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def best_and_worst(scores: Sequence[float], n: int) -> tuple[list[int], list[int]]:
    """The indices of the `n` highest scores (best first) and of the `n` lowest among the
    rest (worst first); ties in data order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    best = order[:n]
    rest = order[n:]
    worst = sorted(rest, key=lambda i: (scores[i], i))[:n]
    return best, worst
