"""Evaluation reports: `metrics.json`, `summary.md` and one self-contained `report.html`.

A `Report` holds a title, the metrics (a nested dict of numbers and strings), meta data shown
at the top (model, checkpoint, data, date) and `Section`s in display order. The section
builders turn plain data (dicts, lists, numpy arrays, PIL images) into plots and tables, so
this module depends on no metric code: it draws whatever the zero-shot, retrieval or
captioning evaluations computed.

Images (in tables and retrieval examples) may be PIL images or arrays (numpy, or anything
with `__array__` such as a CPU tensor) shaped (H, W), (H, W, C) or (C, H, W) with C in
{1, 3, 4}, either uint8 or float in [0, 1]. They are resized to about `image_size` pixels on
the longest side: small images (8x8 digits) by an integer nearest-neighbour factor so the
pixels stay crisp, large ones with Lanczos.

Written by hand: the libraries we use (torchmetrics, Lightning loggers) log scalars but do
not write an offline report with tables, plots and example images in one file.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from multimodal.eval import plots

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
HTML_FILE = "report.html"
NOT_AVAILABLE = "n/a"
TOP_CONFUSIONS = 10


# --------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class ImageCell:
    """An image ready to embed: PNG bytes and their pixel size. Build with `image_cell`."""

    png: bytes
    width: int
    height: int
    alt: str = ""


@dataclass(frozen=True)
class Marked:
    """A cell marked correct (✓) or wrong (✗), such as one retrieved result."""

    value: Any
    correct: bool


@dataclass(frozen=True)
class Plot:
    """A rendered figure: PNG bytes, pixel size and a text alternative."""

    png: bytes
    width: int
    height: int
    alt: str


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text (escaped on output)."""

    text: str


@dataclass
class Table:
    """Rows of cells under named columns. Cells may be None, numbers, strings, images (PIL,
    arrays of 2 or 3 dims, `ImageCell`), `Marked` cells or lists of those (shown one per
    line); they are normalised on construction."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def __post_init__(self) -> None:
        self.columns = [str(c) for c in self.columns]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"rows[{i}]: expected {len(self.columns)} cells (columns {self.columns}), "
                    f"got {len(row)}"
                )
        self.rows = [[_cell(v) for v in row] for row in self.rows]


Block = Text | Plot | Table


@dataclass
class Section:
    """A heading and its blocks (text, plots, tables) in display order."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, block in enumerate(self.blocks):
            if not isinstance(block, (Text, Plot, Table)):
                raise ValueError(f"blocks[{i}]: expected Text, Plot or Table, got {block!r}")


@dataclass
class Report:
    """Everything one evaluation writes.

    Args:
        title: shown as the heading of summary.md and report.html.
        metrics: nested dict with string keys; leaves are numbers (Python or numpy scalars),
            strings, None or lists of those. Written as metrics.json, NaN and infinities as
            null (strict JSON).
        sections: shown after the metrics table, in order.
        meta: shown at the top (model, checkpoint, data paths, date...); values via str().
        explanations: flattened metric name ("retrieval/image_to_text/recall@1") -> one line
            saying what it is (and any caveat), shown next to the value in the metrics table
            of summary.md and report.html (a third column, only when there are any).
    """

    title: str
    metrics: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    explanations: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.title, str) or not self.title.strip():
            raise ValueError(f"title: expected a non-empty string, got {self.title!r}")
        _check_metrics(self.metrics, "metrics")
        for key in self.meta:
            if not isinstance(key, str):
                raise ValueError(f"meta: keys must be strings, got {key!r}")
        for i, section in enumerate(self.sections):
            if not isinstance(section, Section):
                raise ValueError(f"sections[{i}]: expected a Section, got {section!r}")
        names = {name for name, _ in flatten_metrics(self.metrics)}
        for name, text in self.explanations.items():
            if name not in names or not isinstance(text, str):
                raise ValueError(
                    f"explanations[{name!r}]: expected a metric name of the report with a "
                    f"string, got {text!r}"
                )

    def metric_rows(self) -> tuple[list[str], list[list[Any]]]:
        """(columns, rows) of the metrics table: name and value, and what each metric is
        when the report has explanations."""
        flat = flatten_metrics(self.metrics)
        if not self.explanations:
            return ["metric", "value"], [[name, value] for name, value in flat]
        return ["metric", "value", "what it is"], [
            [name, value, self.explanations.get(name, "")] for name, value in flat
        ]


# --------------------------------------------------------------------------- images and cells


def _image_array(image: Any, name: str) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 with C in {3, 4} from a PIL image or an array-like."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"{name}: expected a PIL image or an array shaped (H, W), (H, W, C) or (C, H, W) "
            f"with C in 1, 3, 4; got shape {tuple(np.shape(image))}"
        )
    if min(array.shape[:2]) < 1:
        raise ValueError(f"{name}: empty image of shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise ValueError(
                f"{name}: float images must hold values in [0, 1] (undo the normalisation "
                f"first); got range [{array.min():.3g}, {array.max():.3g}]"
            )
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {array.dtype}")


def image_cell(image: Any, *, size: int = 64, alt: str = "", name: str = "image") -> ImageCell:
    """An image resized to about `size` px on its longest side, as an embeddable PNG.

    Smaller images are enlarged by the largest integer factor that keeps them within `size`
    (nearest neighbour: an 8x8 digit becomes 64x64 sharp blocks); larger ones are shrunk to
    `size` with Lanczos. An `ImageCell` is returned unchanged. `name` is used in errors."""
    if isinstance(image, ImageCell):
        return image
    if size < 1:
        raise ValueError(f"size: expected a positive number of pixels, got {size}")
    pil = Image.fromarray(_image_array(image, name))
    longest = max(pil.size)
    if longest < size:
        factor = size // longest
        if factor > 1:
            pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    elif longest > size:
        scale = size / longest
        new = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(new, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return ImageCell(buffer.getvalue(), pil.width, pil.height, alt)


def _is_image(value: Any) -> bool:
    if not isinstance(value, (np.ndarray, Image.Image, ImageCell)) and hasattr(value, "__array__"):
        value = np.asarray(value)
    return isinstance(value, (Image.Image, ImageCell)) or (
        isinstance(value, np.ndarray) and value.ndim in (2, 3)
    )


def _cell(value: Any) -> Any:
    """Normalise a table cell: numpy scalars to Python, images (PIL, arrays or tensors of 2
    or 3 dims) to ImageCell, sequences to tuples of cells; anything else to its str()."""
    if value is None or isinstance(value, (bool, int, float, str, ImageCell)):
        return value
    if isinstance(value, Marked):
        return Marked(_cell(value.value), bool(value.correct))
    if isinstance(value, np.generic):
        return value.item()
    if not isinstance(value, np.ndarray) and hasattr(value, "__array__"):
        value = np.asarray(value)  # tensors and other array-likes
    if _is_image(value):
        return image_cell(value)
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else tuple(_cell(v) for v in value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_cell(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- sections


def _plot(fig: Any, alt: str) -> Plot:
    png = plots.figure_png(fig)
    with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
    return Plot(png, width, height, alt)


def _as_float(value: Any, name: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _names(class_names: Sequence[Any], name: str = "class_names") -> list[str]:
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"{name}: expected a non-empty sequence of names, got {class_names!r}")
    return [str(c) for c in class_names]


def recall_curve_section(
    curves: Mapping[str, Mapping[int, float]], *, title: str = "Retrieval: Recall@K"
) -> Section:
    """A line plot of Recall@K against K per direction, and the same numbers as a table.

    Args:
        curves: direction -> {K: recall}, e.g. {"image->text": {1: 0.5, 5: 0.8, 10: 0.9}}.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(
            f"curves: expected a non-empty dict direction -> {{K: recall}}, got {curves!r}"
        )
    clean: dict[str, dict[int, float]] = {}
    for direction, curve in curves.items():
        if not isinstance(curve, Mapping) or not curve:
            raise ValueError(f"curves[{direction!r}]: expected a non-empty dict K -> recall")
        points = {}
        for k, recall in curve.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"curves[{direction!r}]: K must be an integer >= 1, got {k!r}")
            points[int(k)] = _as_float(recall, f"curves[{direction!r}][{k}]")
        clean[str(direction)] = points
    ks = sorted({k for curve in clean.values() for k in curve})
    fig = plots.recall_curve_figure(clean, title)
    table = Table(
        ["direction"] + [f"R@{k}" for k in ks],
        [[d] + [curve.get(k) for k in ks] for d, curve in clean.items()],
    )
    alt = f"Recall@K for K in {ks} for {', '.join(clean)}"
    return Section(title, [_plot(fig, alt), table])


def per_class_section(
    class_names: Sequence[str],
    accuracies: Sequence[float],
    *,
    support: Sequence[int] | None = None,
    title: str = "Per-class accuracy",
    label: str = "class",
) -> Section:
    """A horizontal bar chart of per-class accuracy (lowest first) and a table in the same
    order. NaN or None (a class without samples) shows as n/a.

    Args:
        class_names: C names.
        accuracies: C accuracies (a list, numpy array or tensor).
        support: optional C sample counts, shown as a column.
        label: what the names are (the table's first column), e.g. "question type".
    """
    names = _names(class_names)
    values = [_as_float(a, f"accuracies[{i}]") for i, a in enumerate(_sequence(accuracies))]
    if len(values) != len(names):
        raise ValueError(
            f"accuracies: expected one value per class ({len(names)} class_names), "
            f"got {len(values)}"
        )
    counts = None
    if support is not None:
        counts = [int(s) for s in _sequence(support)]
        if len(counts) != len(names):
            raise ValueError(
                f"support: expected one count per class ({len(names)} class_names), "
                f"got {len(counts)}"
            )
    order = sorted(range(len(names)), key=lambda i: (math.isnan(values[i]), values[i]))
    columns = [label, "accuracy"] + (["support"] if counts is not None else [])
    rows = [
        [names[i], None if math.isnan(values[i]) else values[i]]
        + ([counts[i]] if counts is not None else [])
        for i in order
    ]
    blocks: list[Block] = []
    if any(not math.isnan(v) for v in values):
        fig = plots.per_class_figure(names, values, title)
        alt = f"accuracy of each of {len(names)} classes, lowest first"
        if label != "class":
            alt = f"accuracy by {label} ({len(names)}), lowest first"
        blocks.append(_plot(fig, alt))
    blocks.append(Table(columns, rows))
    return Section(title, blocks)


def confusion_section(
    matrix: Any,
    class_names: Sequence[str],
    *,
    title: str = "Confusion matrix",
    top: int = TOP_CONFUSIONS,
) -> Section:
    """A heat map of a (C, C) confusion matrix (rows: true class, columns: predicted, as in
    torchmetrics and scikit-learn) and a table of the `top` largest off-diagonal entries.
    Counts and tick labels are drawn for up to 20 classes; above that the table names the
    confusions."""
    names = _names(class_names)
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"matrix: expected a square (C, C) array, got shape {array.shape}")
    if array.shape[0] != len(names):
        raise ValueError(
            f"class_names: expected {array.shape[0]} names for a {array.shape} matrix, "
            f"got {len(names)}"
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("matrix: expected finite, non-negative counts")
    fig = plots.confusion_figure(array, names, title)
    off = array.copy()
    np.fill_diagonal(off, 0.0)
    pairs = [(i, j) for i, j in zip(*np.nonzero(off), strict=True)]
    pairs.sort(key=lambda p: (-off[p], p))  # largest first, ties in class order
    row_sums = array.sum(axis=1)
    integral = bool(np.all(array == np.round(array)))
    rows = [
        [
            names[i],
            names[j],
            int(off[i, j]) if integral else float(off[i, j]),
            float(off[i, j] / row_sums[i]),
        ]
        for i, j in pairs[:top]
    ]
    table = Table(
        ["true", "predicted", "count", "share of true class"],
        rows,
        caption=f"The {min(top, len(pairs))} largest confusions"
        if pairs
        else "No confusions: every prediction is on the diagonal.",
    )
    alt = f"confusion matrix of {len(names)} classes, rows true, columns predicted"
    return Section(title, [_plot(fig, alt), table])


class RetrievalExample(NamedTuple):
    """One query and its top results, best first; `correct[i]` marks `results[i]`. A plain
    (query, results, correct) tuple works too."""

    query: Any
    results: Sequence[Any]
    correct: Sequence[bool]


def _examples_table(
    examples: Sequence[Any], name: str, query_is_image: bool, image_size: int
) -> Table:
    rows = []
    width = 0
    for i, example in enumerate(examples):
        try:
            query, results, correct = example
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}]: expected (query, results, correct)") from None
        if len(results) != len(correct):
            raise ValueError(
                f"{name}[{i}]: {len(results)} results but {len(correct)} correct flags"
            )
        where = f"{name}[{i}]"
        if query_is_image:
            cells = [image_cell(query, size=image_size, name=f"{where}.query")]
            for r, result in enumerate(results):
                if not isinstance(result, str):
                    raise ValueError(f"{where}.results[{r}]: expected a caption string")
            cells += [Marked(text, bool(ok)) for text, ok in zip(results, correct, strict=True)]
        else:
            if not isinstance(query, str):
                raise ValueError(f"{where}.query: expected a caption string, got {query!r}")
            cells = [query]
            for r, (result, ok) in enumerate(zip(results, correct, strict=True)):
                cell = image_cell(result, size=image_size, name=f"{where}.results[{r}]")
                cells.append(Marked(cell, bool(ok)))
        rows.append(cells)
        width = max(width, len(cells) - 1)
    rows = [row + [""] * (width + 1 - len(row)) for row in rows]
    return Table(["query"] + [str(r + 1) for r in range(width)], rows)


def retrieval_examples_section(
    text_to_image: Sequence[RetrievalExample] = (),
    image_to_text: Sequence[RetrievalExample] = (),
    *,
    title: str = "Retrieval examples",
    image_size: int = 64,
) -> Section:
    """Example queries with their top results (usually 5), each marked ✓ correct or ✗ wrong.

    Args:
        text_to_image: (caption, [images], [correct]) per query.
        image_to_text: (image, [captions], [correct]) per query.
        image_size: display size of the images in pixels (see `image_cell`).
    """
    if not text_to_image and not image_to_text:
        raise ValueError("text_to_image, image_to_text: expected at least one example")
    blocks: list[Block] = []
    if text_to_image:
        blocks.append(Text("Text -> image: a caption and the images it retrieves, best first."))
        blocks.append(_examples_table(text_to_image, "text_to_image", False, image_size))
    if image_to_text:
        blocks.append(Text("Image -> text: an image and the captions it retrieves, best first."))
        blocks.append(_examples_table(image_to_text, "image_to_text", True, image_size))
    return Section(title, blocks)


def table_section(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    image_size: int = 64,
    text: str = "",
) -> Section:
    """A generic table from dicts, e.g. caption examples {"image", "generated", "references"}.

    Columns are `columns` or the keys in first-seen order; a missing key is an empty cell.
    Images (PIL or arrays of 2 or 3 dims) are embedded at `image_size`; lists show one item a
    line."""
    if columns is None:
        seen: dict[str, None] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"rows[{i}]: expected a dict column -> value, got {row!r}")
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    cells = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}]: expected a dict column -> value, got {row!r}")
        unknown = set(row) - set(columns)
        if unknown:
            raise ValueError(f"rows[{i}]: keys {sorted(unknown)} are not in columns")
        cells.append(
            [
                image_cell(row[c], size=image_size, name=f"rows[{i}][{c!r}]")
                if _is_image(row.get(c))
                else row.get(c)
                for c in columns
            ]
        )
    blocks: list[Block] = [Text(text)] if text else []
    blocks.append(Table(list(columns), cells))
    return Section(title, blocks)


def _sequence(values: Any) -> list[Any]:
    """A list from a list, tuple, numpy array or tensor (anything with __array__)."""
    if isinstance(values, (list, tuple)):
        return list(values)
    return np.asarray(values).reshape(-1).tolist()


# --------------------------------------------------------------------------- metrics


def _check_metrics(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: keys must be strings (JSON objects), got {key!r}")
            _check_metrics(inner, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            _check_metrics(inner, f"{path}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str, np.generic))):
        raise ValueError(
            f"{path}: expected a number, string, None, list or dict, got {type(value).__name__}"
            " (call .item() or .tolist() on tensors)"
        )


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """[("zeroshot/top1", 0.95), ...]: nested keys joined by "/", in insertion order."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(flatten_metrics(value, f"{name}/"))
        else:
            rows.append((name, value))
    return rows


def format_value(value: Any) -> str:
    """Numbers with up to 4 decimals (trailing zeros dropped), tiny or huge ones in
    scientific notation; None and NaN as n/a."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return NOT_AVAILABLE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return NOT_AVAILABLE
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        return "0" if text == "-0" else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------- markdown


def _md(text: str) -> str:
    """User text for Markdown: "<" as &lt; (GitHub renders raw HTML tags; this disarms them
    and keeps "->" readable), pipes escaped for tables, line breaks as <br>."""
    escaped = str(text).replace("<", "&lt;").replace("|", "\\|")
    return "<br>".join(escaped.splitlines()) if "\n" in escaped else escaped


def _md_cell(value: Any) -> str:
    if isinstance(value, Marked):
        return ("✓ " if value.correct else "✗ ") + _md_cell(value.value)
    if isinstance(value, ImageCell):
        return f"[image: {_md(value.alt)}]" if value.alt else "[image]"
    if isinstance(value, tuple):
        return "<br>".join(_md_cell(v) for v in value)
    return _md(format_value(value))


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: Report) -> str:
    """summary.md: title, meta, the flattened metrics, each section's text and tables; plots
    are named but live only in report.html (Markdown is text-only)."""
    lines = [f"# {_md(report.title)}", ""]
    if report.meta:
        lines += [f"- **{_md(k)}**: {_md(format_value(v))}" for k, v in report.meta.items()]
        lines.append("")
    lines += ["## Metrics", ""]
    columns, rows = report.metric_rows()
    lines += _md_table(columns, rows) if rows else ["_No metrics._"]
    for section in report.sections:
        lines += ["", f"## {_md(section.title)}"]
        for block in section.blocks:
            lines.append("")
            if isinstance(block, Text):
                lines.append(_md(block.text))
            elif isinstance(block, Plot):
                lines.append(f"_Plot ({_md(block.alt)}): in report.html; Markdown is text-only._")
            else:
                if block.caption:
                    lines += [f"**{_md(block.caption)}**", ""]
                lines += _md_table(block.columns, block.rows)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 1.2em 2em; }
header h1 { margin: 0 0 .4em 0; font-size: 1.6em; }
header dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em;
            margin: 0; font-size: .9em; }
header dt { font-weight: 600; color: #c9d1d9; }
header dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
nav { padding: .6em 2em; background: #eaeef2; font-size: .9em; }
nav a { margin-right: 1.2em; color: #0969da; text-decoration: none; }
main { padding: 0 2em 2em 2em; max-width: 1200px; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px;
          padding: .4em 1.2em 1em 1.2em; margin-top: 1.2em; overflow-x: auto; }
h2 { font-size: 1.25em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left;
         vertical-align: middle; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.ok { background: #dafbe1; }
td.bad { background: #ffebe9; }
span.mark { font-weight: 700; margin-right: .3em; }
td.ok span.mark { color: #1a7f37; }
td.bad span.mark { color: #cf222e; }
td img { display: block; image-rendering: pixelated; }
td.ok img, td.bad img { display: inline-block; vertical-align: middle; }
figure { margin: .6em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: .85em; color: #57606a; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, width: int, height: int, alt: str) -> str:
    alt = _e(alt or "image")
    return f'<img src="{_data_uri(png)}" width="{width}" height="{height}" alt="{alt}">'


def _html_inner(value: Any) -> str:
    if isinstance(value, ImageCell):
        return _img(value.png, value.width, value.height, value.alt)
    if isinstance(value, Marked):
        mark = "✓" if value.correct else "✗"
        label = "correct" if value.correct else "wrong"
        return f'<span class="mark" title="{label}">{mark}</span>{_html_inner(value.value)}'
    if isinstance(value, tuple):
        return "<br>".join(_html_inner(v) for v in value)
    return _e(format_value(value))


def _html_cell(value: Any) -> str:
    if isinstance(value, Marked):
        css = ' class="ok"' if value.correct else ' class="bad"'
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        css = ' class="num"'
    else:
        css = ""
    return f"<td{css}>{_html_inner(value)}</td>"


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{_e(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead>")
    parts.append("<tbody>")
    parts += ["<tr>" + "".join(_html_cell(v) for v in row) + "</tr>" for row in rows]
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{_e(block.text)}</p>"
    if isinstance(block, Plot):
        image = _img(block.png, block.width, block.height, block.alt)
        return f"<figure>{image}<figcaption>{_e(block.alt)}</figcaption></figure>"
    return _html_table(block.columns, block.rows, block.caption)


def render_html(report: Report) -> str:
    """report.html: one self-contained page (inline CSS, PNG data URIs, no scripts, no
    external URLs) with the meta data, the metrics table and every section."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{_e(report.title)}</h1>",
    ]
    if report.meta:
        parts.append("<dl>")
        parts += [f"<dt>{_e(k)}</dt><dd>{_e(format_value(v))}</dd>" for k, v in report.meta.items()]
        parts.append("</dl>")
    parts.append("</header>")
    links = ['<a href="#metrics">Metrics</a>'] + [
        f'<a href="#section-{i}">{_e(s.title)}</a>' for i, s in enumerate(report.sections, 1)
    ]
    parts += ["<nav>" + "".join(links) + "</nav>", "<main>"]
    parts += ['<section id="metrics">', "<h2>Metrics</h2>"]
    columns, rows = report.metric_rows()
    parts.append(_html_table(columns, rows) if rows else "<p>No metrics.</p>")
    parts.append("</section>")
    for i, section in enumerate(report.sections, 1):
        parts += [f'<section id="section-{i}">', f"<h2>{_e(section.title)}</h2>"]
        parts += [_html_block(block) for block in section.blocks]
        parts.append("</section>")
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- writing


def _metrics_json(metrics: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"


META_KEY = "meta"  # where `write_report(meta_in_json=True)` puts the meta data in metrics.json


def _with_meta(report: Report) -> dict[str, Any]:
    """The metrics with the report's meta under META_KEY (values other than JSON scalars and
    lists or dicts of them as their str())."""
    if META_KEY in report.metrics:
        raise ValueError(f"metrics: the key {META_KEY!r} is taken by the meta data")

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str, np.generic)):
            return value
        return str(value)

    return {META_KEY: plain(report.meta), **report.metrics}


def write_report(
    report: Report, out_dir: str | Path, *, meta_in_json: bool = False
) -> dict[str, Path]:
    """Write metrics.json, summary.md and report.html into `out_dir` (created if needed).
    With `meta_in_json`, metrics.json also holds the report's meta data under "meta".

    Everything is rendered in memory first, then each file goes to a temporary file in
    `out_dir` that replaces the target with os.replace: an error leaves every file either
    complete or untouched, and no temporary files behind.

    Returns: {"metrics": path, "summary": path, "html": path}.
    """
    out = Path(out_dir)
    contents = {
        "metrics": (
            METRICS_FILE,
            _metrics_json(_with_meta(report) if meta_in_json else report.metrics),
        ),
        "summary": (SUMMARY_FILE, render_markdown(report)),
        "html": (HTML_FILE, render_html(report)),
    }
    out.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, Path]] = []  # temporary file, target
    try:
        for filename, text in contents.values():
            tmp = out / f".{filename}.{uuid.uuid4().hex}.tmp"  # open(): umask applies
            pending.append((tmp, out / filename))
            with open(tmp, "xb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        while pending:
            tmp, target = pending[0]
            os.replace(tmp, target)
            pending.pop(0)
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return {key: out / filename for key, (filename, _) in contents.items()}
