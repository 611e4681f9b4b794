"""Figures for evaluation reports, rendered to PNG bytes with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects with their own `FigureCanvasAgg`, never
through pyplot, so rendering a report neither needs a display nor changes the backend or the
global figure state of a notebook that imports this module. Inputs are validated by the
section builders in `multimodal.eval.report`; these functions only draw.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

DPI = 100
MAX_BARS = 60  # per-class bar charts with more classes show the lowest and highest half each
MAX_LABELLED_CLASSES = 20  # confusion matrices above this show no tick labels nor counts


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure (size in inches) attached to an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure encoded as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _unit_range(values: Sequence[float]) -> bool:
    """True when every finite value lies in [0, 1]: the axis then spans exactly [0, 1]."""
    finite = [v for v in values if np.isfinite(v)]
    return all(0.0 <= v <= 1.0 for v in finite)


LABEL_STEP = 11  # points between stacked value labels (8 pt text and a gap)
CLOSE = 0.12  # share of the y range within which two values' labels would touch


def _label_offsets(values: Sequence[float], span: float) -> list[float]:
    """Vertical offsets (points) of the value labels of the points at one K: the lowest
    value's label below its point, the others above, each stacked one LABEL_STEP higher than
    the label below it while their values are within CLOSE of the y range, so that no two
    labels overlap."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    offsets = [0.0] * len(values)
    offsets[order[0]] = -13.0
    previous: tuple[float, float] | None = None  # (value, offset) of the label below
    for i in order[1:]:
        offset = 6.0
        if previous is not None and abs(values[i] - previous[0]) < CLOSE * span:
            offset = previous[1] + LABEL_STEP
        offsets[i] = offset
        previous = (values[i], offset)
    if len(values) == 1:
        offsets[order[0]] = 6.0
    return offsets


def recall_curve_figure(curves: Mapping[str, Mapping[int, float]], title: str) -> Figure:
    """Recall@K against K, one line per direction (e.g. image->text), values annotated: at
    each K the lowest value's label below its point and the others above, stacked where the
    values are close (`_label_offsets`), so the labels never overlap."""
    fig = new_figure(6.0, 3.8)
    ax = fig.add_subplot()
    all_ks: set[int] = set()
    all_values: list[float] = []
    for name, curve in curves.items():
        ks = sorted(curve)
        values = [curve[k] for k in ks]
        all_ks.update(ks)
        all_values.extend(values)
        ax.plot(ks, values, marker="o", label=name)
    if all(len(curve) <= 10 for curve in curves.values()):
        finite = [v for v in all_values if np.isfinite(v)]
        span = 1.0 if _unit_range(all_values) else (max(finite, default=1.0) or 1.0)
        for k in sorted(all_ks):
            points = [curve[k] for curve in curves.values() if k in curve]
            for v, offset in zip(points, _label_offsets(points, span), strict=True):
                ax.annotate(
                    f"{v:.3g}",
                    (k, v),
                    textcoords="offset points",
                    xytext=(0, offset),
                    ha="center",
                    fontsize=8,
                )
    ks_sorted = sorted(all_ks)
    if ks_sorted[-1] >= 10 * ks_sorted[0]:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ks_sorted))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ks_sorted])
    if _unit_range(all_values):
        ax.set_ylim(0.0, 1.08)
    else:
        ax.set_ylim(bottom=0.0)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def per_class_figure(class_names: Sequence[str], accuracies: Sequence[float], title: str) -> Figure:
    """Horizontal bars of per-class accuracy, lowest at the top; classes without a value
    (NaN) are left out. Above MAX_BARS classes only the lowest and highest MAX_BARS // 2 are
    drawn, and the title says so."""
    pairs = [(a, n) for n, a in zip(class_names, accuracies, strict=True) if np.isfinite(a)]
    pairs.sort(key=lambda p: p[0])
    split = None
    if len(pairs) > MAX_BARS:
        half = split = MAX_BARS // 2
        title = f"{title} ({half} lowest and {half} highest of {len(pairs)} classes)"
        pairs = pairs[:half] + pairs[-half:]
    values = [a for a, _ in pairs]
    names = [n for _, n in pairs]
    fig = new_figure(6.5, min(max(0.24 * len(pairs) + 1.2, 2.0), 16.0))
    ax = fig.add_subplot()
    positions = np.arange(len(pairs))
    ax.barh(positions, values, color="#4c72b0")
    ax.set_yticks(positions, labels=names, fontsize=8 if len(pairs) > 30 else 9)
    ax.set_ylim(len(pairs) - 0.5, -0.5)  # lowest accuracy on top, where the eye starts
    if split is not None:
        ax.axhline(split - 0.5, color="grey", linestyle="--", linewidth=1)
    if len(pairs) <= 40:
        for y, v in zip(positions, values, strict=True):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    if _unit_range(values):
        ax.set_xlim(0.0, 1.12)
    ax.set_xlabel("accuracy")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Heat map of a (C, C) confusion matrix (rows true, columns predicted), coloured by the
    share of each true class so rare classes stay visible; counts and tick labels are drawn
    for up to MAX_LABELLED_CLASSES classes."""
    n = matrix.shape[0]
    labelled = n <= MAX_LABELLED_CLASSES
    rows = matrix.sum(axis=1, keepdims=True)
    share = matrix / np.where(rows > 0, rows, 1)
    side = min(max(0.45 * n + 2.5, 4.5), 11.0) if labelled else 8.0
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if labelled:
        ticks = np.arange(n)
        rotate = max(len(name) for name in class_names) > 3
        ax.set_xticks(
            ticks,
            labels=class_names,
            rotation=45 if rotate else 0,
            ha="right" if rotate else "center",
        )
        ax.set_yticks(ticks, labels=class_names)
        integral = bool(np.all(matrix == np.round(matrix)))
        fontsize = 9 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                text = f"{int(value)}" if integral else f"{value:.2g}"
                colour = "white" if share[i, j] > 0.5 else "black" if value else "#b0b0b0"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig
