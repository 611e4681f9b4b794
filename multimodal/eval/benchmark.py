"""`multimodal benchmark`: every (model, dataset, task) cell of an evaluation suite, one
comparison report, and a `results.jsonl` in CLIP_benchmark's record shape.

    multimodal benchmark --models a.ckpt b.ckpt --open-clip ViT-B-32:FILE \\
        --tasks suite.yaml --out DIR [--compare A B]

The suite YAML (`multimodal.eval.benchmark_suite`) lists datasets (data specs as `multimodal
zeroshot --data` takes them) and the tasks to run on each: zeroshot, retrieval, linear_probe,
knn. The report is built by `multimodal.eval.benchmark_report`.

Records of results.jsonl: CLIP_benchmark's `dataset`, `model`, `pretrained`, `task`
(zeroshot_classification, zeroshot_retrieval, linear_probe; `knn`, which it does not have),
`metrics` (acc1, acc5, mean_per_class_recall; image_retrieval_recall@K for text -> image and
text_retrieval_recall@K for image -> text; lp_acc1, lp_mean_per_class_recall) and `language`,
then ours: the cell's key, the model's label, the task options and details (per-class accuracy).

Cells run the evaluation code of `multimodal zeroshot` and `multimodal retrieval`: the same
loaders (`eval_loader`), embedding functions (`embed_images_and_captions`,
`embed_labelled_images`), zero-shot classifier and metrics (`zeroshot_classifier`,
`ZeroShotMetrics`), retrieval metrics (`retrieval_metrics`) and probes (`linear_probe`,
`knn_probe`), so a cell's numbers are those of the single command. Embeddings are cached per
(model, dataset) under DIR/cache (`multimodal.eval.embedding_cache`); each finished cell is
appended to DIR/results.jsonl (rewritten atomically), so a rerun computes only the cells that
are not there yet: a new model's, or those an interrupted run did not reach. `--devices N`
embeds each dataset in N processes, a contiguous slice each (`multimodal.eval.benchmark_embed`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from multimodal.checkpoint_check import check_torch_file
from multimodal.eval import class_names as names
from multimodal.eval.arguments import run_arguments
from multimodal.eval.benchmark_embed import EmbedPool, RunOptions, embed_data
from multimodal.eval.benchmark_report import benchmark_report, json_safe, leaderboard_tables
from multimodal.eval.benchmark_suite import Suite, SuiteTask, load_suite
from multimodal.eval.commands import (
    Data,
    check_class_names,
    data_classes,
    matching_templates,
    open_data,
)
from multimodal.eval.datasets import DatasetSpec
from multimodal.eval.embedding_cache import (
    EmbeddingCache,
    Embeddings,
    data_fingerprint,
    file_sha256,
    model_fingerprint,
    text_sha256,
)
from multimodal.eval.evaluate import (
    CAPTIONS,
    RECALL_KS,
)
from multimodal.eval.linear_probe import knn_probe, linear_probe
from multimodal.eval.loading import LoadedModel, load_model
from multimodal.eval.report import Marked, write_report
from multimodal.eval.retrieval import retrieval_metrics
from multimodal.eval.zeroshot import (
    PRECISIONS,
    ZeroShotMetrics,
    model_device,
    zeroshot_classifier,
    zeroshot_logits,
)

RESULTS_FILE = "results.jsonl"
CACHE_DIR = "cache"
# the task names of CLIP_benchmark's records (knn has none there: it keeps ours)
BENCHMARK_TASK = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
    "knn": "knn",
}
LANGUAGE = "en"  # the built-in templates are English

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model of the suite: how to load it and how results name it.

    Attributes:
        label: the name in the report (unique).
        model, pretrained: CLIP_benchmark's fields (architecture and weights).
        fingerprint: `model_fingerprint` of the weights (and config).
    """

    label: str
    model: str
    pretrained: str
    checkpoint: str | None
    config: str | None
    open_clip: str | None
    open_clip_tag: str | None
    fingerprint: str
    sha256: str | None = None  # of the checkpoint file

    def load(self, device: str) -> LoadedModel:
        if self.open_clip is None:  # a text file or random bytes: say so before torch reads it
            check_torch_file(self.checkpoint)
        return load_model(
            self.checkpoint,
            config=self.config,
            open_clip=self.open_clip,
            pretrained=self.open_clip_tag,
            device=device,
        )

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "pretrained": self.pretrained}
        if self.checkpoint is not None:
            out["checkpoint_sha256"] = self.sha256
        if self.config is not None:
            out["config"] = self.config
        out["fingerprint"] = self.fingerprint
        return out


def _unique(labels: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    out = []
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
        out.append(label if counts[label] == 1 else f"{label} #{counts[label]}")
    return out


def _run_label(checkpoint: str) -> str:
    """`run/stem` of a checkpoint: a fit run keeps its checkpoints in RUN/checkpoints/."""
    path = Path(checkpoint)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{run.name}/{path.stem}" if run.name else path.stem


def model_specs(
    checkpoints: Sequence[str], configs: Sequence[str] | None, open_clips: Sequence[str]
) -> list[ModelSpec]:
    """The models of `--models` (with `--configs` in the same order) and `--open-clip
    NAME:FILE|TAG`; FileNotFoundError / ValueError naming the bad argument."""
    if configs and len(configs) != len(checkpoints):
        raise ValueError(
            f"--configs: {len(configs)} configs for {len(checkpoints)} --models (one a model, "
            "in the same order, or none: each run's saved config.yaml)"
        )
    found: list[tuple[str, dict[str, Any]]] = []
    for i, checkpoint in enumerate(checkpoints):
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--models: checkpoint {checkpoint!r} does not exist")
        config = configs[i] if configs else None
        if config is not None and not Path(config).is_file():
            raise FileNotFoundError(f"--configs: config {config!r} does not exist")
        sha = file_sha256(checkpoint)
        fingerprint = model_fingerprint(checkpoint, config=config, checkpoint_sha256=sha)
        found.append(
            (
                Path(checkpoint).stem,
                dict(model=Path(checkpoint).stem, pretrained=str(checkpoint),
                     checkpoint=str(checkpoint), config=config, open_clip=None,
                     open_clip_tag=None, fingerprint=fingerprint, sha256=sha),
            )
        )  # fmt: skip
    for value in open_clips:
        name, sep, weights = value.partition(":")
        if not sep or not name or not weights:
            raise ValueError(
                f"--open-clip {value!r}: expected NAME:FILE (a local state dict) or NAME:TAG "
                "(open_clip's pretrained tag, downloaded), e.g. ViT-B-32:vit_b_32.pt"
            )
        if Path(weights).is_file():
            sha = file_sha256(weights)
            fingerprint = model_fingerprint(weights, open_clip=name, checkpoint_sha256=sha)
            found.append(
                (
                    f"{name} ({Path(weights).stem})",
                    dict(model=name, pretrained=weights, checkpoint=weights, config=None,
                         open_clip=name, open_clip_tag=None, fingerprint=fingerprint,
                         sha256=sha),
                )
            )  # fmt: skip
        else:
            fingerprint = model_fingerprint(None, open_clip=name, pretrained=weights)
            found.append(
                (
                    f"{name} ({weights})",
                    dict(model=name, pretrained=weights, checkpoint=None, config=None,
                         open_clip=name, open_clip_tag=weights, fingerprint=fingerprint),
                )
            )  # fmt: skip
    if not found:
        raise ValueError("no models: pass --models CKPT ... and/or --open-clip NAME:FILE ...")
    stems = [label for label, _ in found]
    labels = [
        _run_label(kw["checkpoint"])
        if kw["open_clip"] is None and stems.count(label) > 1
        else label
        for label, kw in found
    ]
    labels = _unique(labels)
    return [ModelSpec(label=label, **kw) for label, (_, kw) in zip(labels, found, strict=True)]


# --------------------------------------------------------------------------- results.jsonl


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of results.jsonl ([] when absent); a line that is not a JSON object is an
    error naming the line."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def append_result(path: Path, record: dict[str, Any]) -> None:
    """results.jsonl with `record` appended, written to a temporary file and os.replace'd:
    an interruption leaves the previous complete file."""
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    line = json.dumps(json_safe(record), allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(old + line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (model, task entry) of the suite and its identity in results.jsonl."""

    model: ModelSpec
    entry: SuiteTask
    label: str  # the entry's column label
    key: str


@dataclass
class DataSource:
    """A dataset of the suite, opened once: its samples (or shard URLs) and fingerprint."""

    spec: DatasetSpec
    data: Data
    fingerprint: str
    captions: str | None = None  # embed captions too (mode): a retrieval task reads them


def embed_source(
    loaded: LoadedModel, source: DataSource, captions: str | None, options: RunOptions
) -> Embeddings:
    """A model's embeddings of one dataset in this process (`embed_data`)."""
    return embed_data(loaded, source.data, captions, options, str(source.spec))


class Embedder:
    """A model's embeddings of the suite's datasets: from memory, the disk cache, or computed
    (and cached); counts computed and cached ones."""

    def __init__(
        self,
        model: ModelSpec,
        loaded: LoadedModel,
        cache: EmbeddingCache,
        options: RunOptions,
        pool: EmbedPool | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.loaded = loaded
        self.cache = cache
        self.options = options
        self.memory: dict[tuple[str, str | None], Embeddings] = {}
        self.computed = 0
        self.cached = 0

    def get(self, source: DataSource, captions: str | None = None) -> Embeddings:
        """Embeddings of `source` with a text side of mode `captions` (default: the mode its
        retrieval tasks read, so that one pass serves every task; None: any cached embeddings
        serve, else images only)."""
        captions = captions or source.captions
        modes = [captions] if captions is not None else [None, *CAPTIONS]
        for mode in modes:
            found = self.memory.get((source.fingerprint, mode))
            if found is not None:
                return found
        for mode in modes:
            found = self.cache.load(self.model.fingerprint, source.fingerprint, self._tag(mode))
            if found is not None:
                self.cached += 1
                self.memory[(source.fingerprint, mode)] = found
                return found
        if self.pool is None:
            embeddings = embed_source(self.loaded, source, captions, self.options)
        else:
            embeddings = self.pool.embed(self.model, self.loaded, str(source.spec), captions)
        self.cache.save(self.model.fingerprint, source.fingerprint, self._tag(captions), embeddings)
        self.computed += 1
        self.memory[(source.fingerprint, captions)] = embeddings
        return embeddings

    def _tag(self, captions: str | None) -> str:
        what = "images" if captions is None else f"captions-{captions}"
        return f"{self.options.precision}-{what}"


def resolve_classes(entry: SuiteTask, data: Data) -> tuple[tuple[str, ...], str]:
    """(class names, templates name or file) of a zero-shot entry, as `multimodal zeroshot`
    resolves --classes / --templates: given names checked against the data, else the data's
    own names with the templates of the built-in list holding them."""
    if entry.classes is not None:
        classes = names.class_names(entry.classes)
        check_class_names(classes, f"classes {entry.classes}", data)
        templates = entry.templates
        if templates is None:
            if entry.classes not in names.BUILTIN_TEMPLATES:
                raise ValueError(
                    f"classes {entry.classes} has no templates of its own: set templates"
                )
            templates = entry.classes
        return classes, templates
    classes = data_classes(data, str(entry.spec))
    templates = entry.templates or matching_templates(classes)
    if templates is None:
        raise ValueError(
            f"the class names of {entry.spec} ({', '.join(classes[:3])}, ...) are no built-in "
            "list's: set templates"
        )
    return classes, templates


def zeroshot_metrics(
    embedder: Embedder, source: DataSource, entry: SuiteTask
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CLIP_benchmark metrics, details) of a zero-shot cell: the classifier of
    `zeroshot_classifier` (cached) and `ZeroShotMetrics` over the cached image features in
    the loader's batches, as `zeroshot_evaluate` runs them."""
    classes, templates_name = resolve_classes(entry, source.data)
    prompts = [list(p) for p in names.render_prompts(classes, names.templates(templates_name))]
    loaded, options = embedder.loaded, embedder.options
    classifier = embedder.cache.load_classifier(
        embedder.model.fingerprint, prompts, options.precision
    )
    if classifier is None:
        device = model_device(loaded.model)
        dtype = PRECISIONS[options.precision]
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            classifier = zeroshot_classifier(
                loaded.model, loaded.tokenizer, prompts, context_length=loaded.context_length,
                batch_size=options.batch_size, device=device,
            ).cpu()  # fmt: skip
        embedder.cache.save_classifier(
            embedder.model.fingerprint, prompts, options.precision, classifier
        )
    embeddings = embedder.get(source)
    counter = ZeroShotMetrics(len(classes))
    features, labels = embeddings.image_features, embeddings.labels
    for start in range(0, len(labels), options.batch_size):
        stop = start + options.batch_size
        counter.update(zeroshot_logits(features[start:stop], classifier), labels[start:stop])
    result = counter.compute(classes)
    metrics = {
        "acc1": result.top1,
        "acc5": result.top5,
        "mean_per_class_recall": result.mean_per_class_recall,
        "n_samples": result.n_samples,
        "n_classes": len(classes),
    }
    details = {
        "templates": templates_name,
        "per_class_accuracy": result.to_dict()["per_class_accuracy"],
        **({"skipped": embeddings.skipped} if embeddings.skipped else {}),
    }
    return metrics, details


def retrieval_cell_metrics(
    embedder: Embedder, source: DataSource, entry: SuiteTask
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CLIP_benchmark metrics, details) of a retrieval cell: `retrieval_metrics` of the
    cached features, as `run_retrieval` computes it. image_retrieval = text -> image."""
    embeddings = embedder.get(source, entry.captions)
    result = retrieval_metrics(
        embeddings.image_features, embeddings.text_features, embeddings.text_image,
        ks=RECALL_KS, max_memory_bytes=entry.max_memory_mib * 2**20,
    )  # fmt: skip
    metrics: dict[str, Any] = {}
    for k in RECALL_KS:
        metrics[f"image_retrieval_recall@{k}"] = result.text_to_image.recall[k]
        metrics[f"text_retrieval_recall@{k}"] = result.image_to_text.recall[k]
    metrics["image_retrieval_mean_rank"] = result.text_to_image.mean_rank
    metrics["text_retrieval_mean_rank"] = result.image_to_text.mean_rank
    metrics["n_images"] = len(embeddings.image_features)
    metrics["n_texts"] = len(embeddings.text_features)
    details = {"captions": entry.captions, "ours": result.to_dict()}
    if embeddings.skipped:
        details["skipped"] = embeddings.skipped
    return metrics, details


def _n_classes(*labels: Tensor) -> int:
    return int(max(int(x.max()) for x in labels)) + 1


def probe_metrics(
    embedder: Embedder, source: DataSource, train: DataSource, entry: SuiteTask
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, details) of a linear_probe (`linear_probe`) or knn (`knn_probe`) cell on the
    cached image features of the training and test data."""
    from sklearn.metrics import balanced_accuracy_score

    test = embedder.get(source)
    fit = embedder.get(train)
    pair_train = (fit.image_features, fit.labels)
    pair_test = (test.image_features, test.labels)
    n_classes = _n_classes(fit.labels, test.labels)
    if entry.task == "linear_probe":
        result = linear_probe(pair_train, pair_test, n_classes, seed=entry.seed)
        recall = balanced_accuracy_score(test.labels.numpy(), result.predictions.numpy())
        metrics = {"lp_acc1": result.top1, "lp_mean_per_class_recall": float(recall)}
        return metrics, result.to_dict()
    result = knn_probe(
        pair_train, pair_test, entry.k, n_classes, shots=entry.shots, seed=entry.seed
    )
    recall = balanced_accuracy_score(test.labels.numpy(), result.predictions.numpy())
    return {"acc1": result.top1, "mean_per_class_recall": float(recall)}, result.to_dict()


def evaluate_cell(
    embedder: Embedder, cell: Cell, sources: Mapping[str, DataSource]
) -> dict[str, Any]:
    """The results.jsonl record of one cell (CLIP_benchmark's fields first)."""
    entry = cell.entry
    source = sources[str(entry.spec)]
    if entry.task == "zeroshot":
        metrics, details = zeroshot_metrics(embedder, source, entry)
    elif entry.task == "retrieval":
        metrics, details = retrieval_cell_metrics(embedder, source, entry)
    else:
        metrics, details = probe_metrics(embedder, source, sources[str(entry.train_spec)], entry)
    return {
        "dataset": entry.name,
        "model": cell.model.model,
        "pretrained": cell.model.pretrained,
        "task": BENCHMARK_TASK[entry.task],
        "metrics": metrics,
        "language": LANGUAGE,
        "cell": cell.key,
        "model_label": cell.model.label,
        "column": cell.label,
        "suite_task": entry.task,
        "data": str(entry.spec),
        "options": entry.options(),
        "details": details,
    }


def cell_key(model: ModelSpec, entry: SuiteTask, sources: Mapping[str, DataSource]) -> str:
    """What identifies a cell's result: model and data fingerprints and the task options."""
    data = [sources[str(entry.spec)].fingerprint]
    if entry.train_spec is not None:
        data.append(sources[str(entry.train_spec)].fingerprint)
    options = json.dumps(entry.options(), sort_keys=True)
    return text_sha256(model.fingerprint, *data, options)[:32]


# --------------------------------------------------------------------------- the command


def benchmark_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal benchmark",
        description=(
            "Evaluate several models on a suite of datasets and tasks (zero-shot, retrieval, "
            "linear probe, k-NN): DIR/results.jsonl (CLIP_benchmark's records), a leaderboard "
            "report (metrics.json, summary.md, report.html) and an embedding cache, so a rerun "
            "computes only new cells."
        ),
    )
    parser.add_argument("--models", nargs="+", default=[], metavar="CKPT", help="fit checkpoints")
    parser.add_argument(
        "--configs",
        nargs="+",
        metavar="YAML",
        help="the fit configs of --models, in the same order (default: each run's config.yaml)",
    )
    parser.add_argument(
        "--open-clip",
        nargs="+",
        default=[],
        metavar="NAME:FILE",
        help="open_clip models: architecture and a local state dict (or a pretrained tag)",
    )
    parser.add_argument("--tasks", required=True, metavar="YAML", help="the suite file")
    parser.add_argument("--out", required=True, metavar="DIR", help="results and report folder")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="two model labels (or indices from 0) for per-class deltas (default: the first two)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="processes that embed each dataset, a contiguous slice each (1); with --device "
        "cuda, GPUs 0..N-1",
    )
    run_arguments(parser, batch_size=256)
    return parser


@dataclass
class BenchmarkRun:
    """What one run did: cells computed now and read from results.jsonl, embeddings computed
    and read from the cache, and the records of every cell of the suite."""

    computed: int = 0
    cached: int = 0
    embeddings_computed: int = 0
    embeddings_cached: int = 0
    records: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


def _compare_pair(
    models: Sequence[ModelSpec], compare: Sequence[str] | None
) -> tuple[ModelSpec, ModelSpec] | None:
    if compare is None:
        return (models[0], models[1]) if len(models) >= 2 else None
    by_label = {m.label: m for m in models}
    chosen = []
    for value in compare:
        if value in by_label:
            chosen.append(by_label[value])
        elif value.isdigit() and int(value) < len(models):
            chosen.append(models[int(value)])
        else:
            raise ValueError(
                f"--compare {value!r}: not a model of the suite; models: {list(by_label)} "
                f"(or indices 0..{len(models) - 1})"
            )
    return chosen[0], chosen[1]


def run_suite(
    suite: Suite,
    models: Sequence[ModelSpec],
    out: Path,
    options: RunOptions,
    *,
    devices: int = 1,
    loader: Callable[[ModelSpec, str], LoadedModel] | None = None,
) -> BenchmarkRun:
    """Every cell of `models` x `suite`: the records in out/results.jsonl are kept, the
    others computed (each model loaded once, only if it has a missing cell) and appended.
    With `devices` > 1, datasets are embedded by that many processes (`EmbedPool`)."""
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, DataSource] = {}
    for entry in suite.tasks:
        for spec in (entry.spec, entry.train_spec):
            if spec is not None and str(spec) not in sources:
                data = open_data(str(spec))
                sources[str(spec)] = DataSource(spec, data, data_fingerprint(spec, data))
    for entry in suite.tasks:
        source = sources[str(entry.spec)]
        if entry.task == "retrieval" and source.captions is None:
            source.captions = entry.captions
    results_path = out / RESULTS_FILE
    done = {record.get("cell"): record for record in read_results(results_path)}
    run = BenchmarkRun()
    pending: list[tuple[int, Cell]] = []
    for model in models:
        for i, entry in enumerate(suite.tasks):
            cell = Cell(model, entry, suite.labels[i], cell_key(model, entry, sources))
            if cell.key in done:
                run.records[(model.label, i)] = done[cell.key]
                run.cached += 1
            else:
                pending.append((i, cell))
    cache = EmbeddingCache(out / CACHE_DIR)
    load = loader or (lambda spec, device: spec.load(device))
    embedders: dict[str, Embedder] = {}
    with contextlib.ExitStack() as stack:
        pool = None
        if devices > 1 and pending:
            pool = stack.enter_context(EmbedPool(devices, options))
        bar = stack.enter_context(
            tqdm(total=len(pending), disable=not options.progress, desc="cells", unit="cell")
        )
        for i, cell in pending:
            embedder = embedders.get(cell.model.label)
            if embedder is None:
                embedders.clear()  # one model in memory at a time
                loaded = load(cell.model, options.device)
                embedder = Embedder(cell.model, loaded, cache, options, pool)
                embedders[cell.model.label] = embedder
            record = evaluate_cell(embedder, cell, sources)
            append_result(results_path, record)
            run.records[(cell.model.label, i)] = record
            run.computed += 1
            run.embeddings_computed += embedder.computed
            run.embeddings_cached += embedder.cached
            embedder.computed = embedder.cached = 0
            bar.update(1)
    return run


def benchmark_main(argv: Sequence[str]) -> int:
    """`multimodal benchmark ...`; returns the exit status."""
    parser = benchmark_parser()
    args = parser.parse_args(list(argv))
    for flag, value in (("--batch-size", args.batch_size), ("--devices", args.devices)):
        if value < 1:
            parser.error(f"{flag}={value} must be >= 1")
    if args.num_workers < 0:
        parser.error(f"--num-workers={args.num_workers} must be >= 0")
    if args.devices > 1 and torch.device(args.device).type == "cuda":
        if torch.device(args.device).index not in (None, 0):
            parser.error(f"--devices {args.devices} uses GPUs 0..N-1: pass --device cuda")
        if args.devices > torch.cuda.device_count():
            parser.error(
                f"--devices {args.devices}: this machine has {torch.cuda.device_count()} GPUs"
            )
    options = RunOptions(
        batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision,
        device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    try:
        suite = load_suite(args.tasks)
        models = model_specs(args.models, args.configs, args.open_clip)
        compare = _compare_pair(models, args.compare)
        run = run_suite(suite, models, Path(args.out), options, devices=args.devices)
    except (ValueError, FileNotFoundError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    report = benchmark_report(suite, models, run, compare, options)
    paths = write_report(report, args.out, meta_in_json=True)
    print(
        f"cells: {run.computed} computed, {run.cached} from {RESULTS_FILE}; embeddings: "
        f"{run.embeddings_computed} computed, {run.embeddings_cached} from the cache"
    )
    for table in leaderboard_tables(suite, models, run.records):
        print(table.caption)
        cells = [table.columns] + [[_plain(v) for v in row] for row in table.rows]
        widths = [max(len(row[j]) for row in cells) for j in range(len(table.columns))]
        for row in cells:
            padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            print("  " + "  ".join(padded).rstrip())
    print(f"results: {Path(args.out) / RESULTS_FILE}")
    print(f"report: {paths['html']}")
    return 0


def _plain(value: Any) -> str:
    if isinstance(value, Marked):
        return _plain(value.value) + " *"  # the best of its column
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


main = benchmark_main
