"""The comparison report of `multimodal benchmark`: leaderboards (models x datasets for each
task's headline metric, the best of each column marked), a bar chart a dataset, per-class
zero-shot deltas between two models, the definition of every metric shown, and the run's meta
data (models with checkpoint hashes, data specs, date, package versions), written through
`multimodal.eval.report`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch import Tensor

from multimodal.eval import plots
from multimodal.eval.benchmark_embed import RunOptions
from multimodal.eval.benchmark_suite import Suite
from multimodal.eval.report import Marked, Plot, Report, Section, Table, Text

if TYPE_CHECKING:
    from multimodal.eval.benchmark import BenchmarkRun, ModelSpec


def json_safe(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars to Python, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.generic, Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


HEADLINES = {
    "zeroshot": [("acc1", "zero-shot top-1")],
    "retrieval": [
        ("image_retrieval_recall@5", "text->image R@5"),
        ("text_retrieval_recall@5", "image->text R@5"),
    ],
    "linear_probe": [("lp_acc1", "linear probe top-1")],
    "knn": [("acc1", "k-NN top-1")],
}
DEFINITIONS = {
    "acc1 (zero-shot top-1)": "share of test images whose most similar class prompt embedding "
    "(mean of the class's templates) is their class.",
    "acc5": "share of test images whose class is among the 5 most similar classes.",
    "mean_per_class_recall": "top-1 accuracy of each class present in the data, averaged over "
    "classes (balanced accuracy).",
    "image_retrieval_recall@K (text->image)": "share of captions whose own image is among the K "
    "images of highest cosine similarity; ties count against the model.",
    "text_retrieval_recall@K (image->text)": "share of captioned images with one of their own "
    "captions among the K most similar captions; ties count against the model.",
    "lp_acc1 (linear probe top-1)": "top-1 of a logistic regression on the frozen, standardised "
    "image features of the training data, L2 strength chosen on a validation split of it.",
    "knn acc1 (k-NN top-1)": "top-1 of a majority vote of the k training images of highest "
    "cosine similarity.",
    "mean": "the model's headline metric averaged over the datasets of the table.",
    "✓": "the best model of the column (every model tied with it is marked).",
}


def _best_marked(values: list[float | None]) -> list[Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    best = max(finite) if finite else None
    return [Marked(v, True) if v is not None and v == best else v for v in values]


def leaderboard_tables(
    suite: Suite, models: Sequence[ModelSpec], records: Mapping[tuple[str, int], dict[str, Any]]
) -> list[Table]:
    """One table a headline metric: models x task columns (+ the mean), the best of each
    column marked. `records[(model label, entry index)]` is a cell's record."""
    tables = []
    for task, headlines in HEADLINES.items():
        columns = [i for i, entry in enumerate(suite.tasks) if entry.task == task]
        if not columns:
            continue
        for metric, title in headlines:
            grid = []
            for model in models:
                row = []
                for i in columns:
                    record = records.get((model.label, i))
                    row.append(None if record is None else record["metrics"].get(metric))
                if len(columns) > 1:  # the mean over the datasets
                    known = [v for v in row if v is not None]
                    row.append(sum(known) / len(known) if len(known) == len(row) else None)
                grid.append(row)
            marked_columns = [_best_marked([row[j] for row in grid]) for j in range(len(grid[0]))]
            rows = [
                [model.label] + [marked_columns[j][r] for j in range(len(grid[0]))]
                for r, model in enumerate(models)
            ]
            tables.append(
                Table(
                    ["model", *(suite.labels[i] for i in columns)]
                    + (["mean"] if len(columns) > 1 else []),
                    rows,
                    caption=f"{title} ({metric})",
                )
            )
    return tables


def dataset_bar_plot(
    dataset: str, bars: Mapping[str, Mapping[str, float | None]], models: Sequence[str]
) -> Plot:
    """Grouped bars: one group a metric (`bars[metric][model]`), one bar a model."""
    metrics = list(bars)
    group = max(1.4, 0.4 * len(models))  # inches a metric
    fig = plots.new_figure(max(4.5, 1.2 + group * len(metrics)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    x = np.arange(len(metrics))
    for m, model in enumerate(models):
        values = [bars[metric].get(model) for metric in metrics]
        heights = [np.nan if v is None else v for v in values]
        positions = x - 0.4 + width * (m + 0.5)
        ax.bar(positions, heights, width, label=model)
        for position, value in zip(positions, heights, strict=True):
            if np.isfinite(value):
                ax.annotate(f"{value:.2f}", (position, value), textcoords="offset points",
                            xytext=(0, 2), ha="center", fontsize=7)  # fmt: skip
    ax.set_xticks(x, [textwrap.fill(metric, 14) for metric in metrics], fontsize=8)
    ax.set_ylim(0.0, 1.12)
    ax.set_ylabel("score")
    ax.set_title(dataset)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    png = plots.figure_png(fig)
    with Image.open(io.BytesIO(png)) as image:
        width_px, height_px = image.size
    alt = f"{dataset}: {', '.join(metrics)} of {len(models)} models"
    return Plot(png, width_px, height_px, alt)


def dataset_sections(
    suite: Suite, models: Sequence[ModelSpec], records: Mapping[tuple[str, int], dict[str, Any]]
) -> list[Section]:
    """A bar chart a dataset of every headline metric of its tasks by model."""
    by_dataset: dict[str, dict[str, dict[str, float | None]]] = {}
    for i, entry in enumerate(suite.tasks):
        bars = by_dataset.setdefault(entry.name, {})
        for metric, title in HEADLINES[entry.task]:
            label = title if suite.labels[i] == entry.name else f"{title} ({suite.labels[i]})"
            bars[label] = {
                model.label: records[(model.label, i)]["metrics"].get(metric)
                for model in models
                if (model.label, i) in records
            }
    sections = []
    for dataset, bars in by_dataset.items():
        sections.append(
            Section(
                f"Dataset: {dataset}", [dataset_bar_plot(dataset, bars, [m.label for m in models])]
            )
        )
    return sections


def delta_sections(
    suite: Suite,
    first: ModelSpec,
    second: ModelSpec,
    records: Mapping[tuple[str, int], dict[str, Any]],
) -> list[Section]:
    """Per-class zero-shot accuracy of two models and its change, largest changes first."""
    sections = []
    for i, entry in enumerate(suite.tasks):
        a, b = records.get((first.label, i)), records.get((second.label, i))
        if entry.task != "zeroshot" or a is None or b is None:
            continue
        per_a = a["details"]["per_class_accuracy"]
        per_b = b["details"]["per_class_accuracy"]
        rows = []
        for name in per_a:
            va, vb = per_a[name], per_b.get(name)
            delta = None if va is None or vb is None else vb - va
            rows.append([name, va, vb, delta])
        rows.sort(key=lambda row: -abs(row[3]) if row[3] is not None else math.inf)
        text = (
            f"Zero-shot accuracy of each class of {suite.labels[i]} with {first.label} (A) and "
            f"{second.label} (B); delta = B - A, largest changes first; n/a: no image of the class."
        )
        sections.append(
            Section(
                f"Per-class deltas: {suite.labels[i]}",
                [
                    Text(text),
                    Table(["class", f"A: {first.label}", f"B: {second.label}", "delta"], rows),
                ],
            )
        )
    return sections


def versions() -> dict[str, str]:
    out = {}
    for package in ("multimodal", "torch", "lightning", "open_clip_torch", "timm", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["python"] = sys.version.split()[0]
    return out


def _specs(suite: Suite) -> dict[str, str]:
    """dataset name -> data spec, training data of the probes included."""
    out: dict[str, str] = {}
    for entry in suite.tasks:
        out.setdefault(entry.name, str(entry.spec))
        if entry.train_spec is not None:
            out.setdefault(f"{entry.name} (training)", str(entry.train_spec))
    return out


def benchmark_report(
    suite: Suite,
    models: Sequence[ModelSpec],
    run: BenchmarkRun,
    compare: tuple[ModelSpec, ModelSpec] | None,
    options: RunOptions,
) -> Report:
    """The comparison report: leaderboards, a bar chart a dataset, per-class deltas of the
    compared models and the definitions of every metric shown."""
    sections = [
        Section(
            "Leaderboard",
            [
                Text(
                    "Rows are models, columns the suite's datasets; ✓ marks the best model of "
                    "each column. The full records are in results.jsonl (CLIP_benchmark's fields)."
                ),
                *leaderboard_tables(suite, models, run.records),
            ],
        ),
        *dataset_sections(suite, models, run.records),
    ]
    if compare is not None:
        sections += delta_sections(suite, compare[0], compare[1], run.records)
    sections.append(
        Section(
            "Definitions",
            [Table(["metric", "definition"], [[k, v] for k, v in DEFINITIONS.items()])],
        )
    )
    headline: dict[str, Any] = {}  # model -> column -> headline metrics (all: results.jsonl)
    for (label, i), record in sorted(run.records.items(), key=lambda item: item[0][1]):
        entry = suite.tasks[i]
        values = {m: record["metrics"].get(m) for m, _ in HEADLINES[entry.task]}
        headline.setdefault(label, {})[f"{suite.labels[i]} / {entry.task}"] = json_safe(values)
    metrics = {
        "cells": {
            "total": run.computed + run.cached,
            "computed": run.computed,
            "cached": run.cached,
        },
        "embeddings": {"computed": run.embeddings_computed, "cached": run.embeddings_cached},
        "headline": {model.label: headline.get(model.label, {}) for model in models},
    }
    version_text = ", ".join(f"{name} {version}" for name, version in versions().items())
    meta = {
        "models": {model.label: model.meta() for model in models},
        "data": _specs(suite),
        "compared": None if compare is None else f"A={compare[0].label}, B={compare[1].label}",
        "precision": options.precision,
        "device": options.device,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": version_text,
    }
    return Report(title="Benchmark", metrics=metrics, sections=sections, meta=meta)
