"""Evaluation reports: the three files, their content, escaping, embedded images, atomicity."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.eval import plots
from multimodal.eval import report as rp
from multimodal.eval.report import (
    Report,
    confusion_section,
    format_value,
    image_cell,
    per_class_section,
    recall_curve_section,
    retrieval_examples_section,
    table_section,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"img", "meta", "br", "hr", "link", "input", "source", "wbr"}
EVIL = "<script>alert(1)</script>"

METRICS = {
    "zeroshot": {"top1": 0.9512345, "top5": 1.0, "n": 500, "note": "held-out templates"},
    "retrieval": {"image->text": {"R@1": 0.5, "R@5": 0.8}, "text->image": {"R@1": 0.45}},
    "missing": None,
}
FLAT_ROWS = [
    "| zeroshot/top1 | 0.9512 |",
    "| zeroshot/top5 | 1 |",
    "| zeroshot/n | 500 |",
    "| zeroshot/note | held-out templates |",
    "| retrieval/image->text/R@1 | 0.5 |",
    "| retrieval/image->text/R@5 | 0.8 |",
    "| retrieval/text->image/R@1 | 0.45 |",
    "| missing | n/a |",
]


def _digit(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (8, 8), dtype=np.uint8)


def _build(rng: np.random.Generator):
    """A report with every section kind; returns it, the example images in the order the HTML
    embeds them (with the pixels expected after resizing) and the number of plots."""
    names = [f"class {i}" for i in range(10)]
    matrix = rng.integers(0, 5, (10, 10)) + np.diag(rng.integers(20, 40, 10))
    accuracies = matrix.diagonal() / matrix.sum(1)
    t2i = [
        (f"query {q} {EVIL}", [_digit(rng) for _ in range(5)], [q == r for r in range(5)])
        for q in range(2)
    ]
    i2t = [(_digit(rng), [f"caption {r}" for r in range(5)], [True] + [False] * 4)]
    # one image of each accepted kind for the generic table
    chw_float = rng.random((3, 16, 16))  # (C, H, W) float in [0, 1]
    pil_wide = Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8))  # 100x50
    hwc_small = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)  # W 20, H 10
    rows = [
        {"image": chw_float, "generated": "a digit", "references": ["ref a", f"ref {EVIL}"]},
        {"image": pil_wide, "generated": "a wide image", "references": ["ref c"]},
        {"image": torch.from_numpy(hwc_small), "generated": "small", "references": []},
    ]
    report = Report(
        title=f"Evaluation {EVIL}",
        metrics=METRICS,
        sections=[
            recall_curve_section({"image->text": {1: 0.5, 5: 0.8, 10: 0.9}, "t->i": {1: 0.4}}),
            per_class_section(names, accuracies, support=matrix.sum(1)),
            confusion_section(matrix, names),
            retrieval_examples_section(t2i, i2t),
            table_section("Caption examples", rows),
        ],
        meta={"model": "runs/clip/last.ckpt", "note": EVIL},
    )
    # expected embedded pixels: nearest-neighbour upscaling by an integer factor is np.kron
    # with a block of ones; large images are shrunk to 64 px on the longest side
    expected = [np.kron(img, np.ones((8, 8), np.uint8)) for _, imgs, _ in t2i for img in imgs]
    expected.append(np.kron(i2t[0][0], np.ones((8, 8), np.uint8)))
    chw_u8 = np.round(np.moveaxis(chw_float, 0, -1) * 255).astype(np.uint8)
    expected.append(np.kron(chw_u8, np.ones((4, 4, 1), np.uint8)))
    expected.append((32, 64))  # shrunk with Lanczos: only the size is checked
    expected.append(np.kron(hwc_small, np.ones((3, 3, 1), np.uint8)))  # 64 // 20 = 3
    return report, expected, 3


class _Collector(HTMLParser):
    """Tags, balance errors, img sources and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(0)
    report, expected, n_plots = _build(rng)
    out = tmp_path_factory.mktemp("report") / "nested" / "dir"
    paths = write_report(report, out)
    return report, expected, n_plots, paths, out


def test_write_report_writes_the_three_files(written):
    _, _, _, paths, out = written
    assert paths == {
        "metrics": out / "metrics.json",
        "summary": out / "summary.md",
        "html": out / "report.html",
    }
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "summary.md"]


def test_metrics_json_round_trips_sorted_and_indented(written):
    _, _, _, paths, _ = written
    text = paths["metrics"].read_text()
    assert json.loads(text) == METRICS
    assert text == json.dumps(METRICS, indent=2, sort_keys=True) + "\n"


def test_metrics_json_is_strict_json_with_numpy_scalars(tmp_path):
    metrics = {"a": float("nan"), "b": np.float32(0.5), "c": [np.int64(3), float("inf")]}
    paths = write_report(Report("t", metrics), tmp_path)
    text = paths["metrics"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": 0.5, "c": [3, None]}
    assert "| a | n/a |" in paths["summary"].read_text()


def test_html_is_balanced_self_contained_and_escaped(written):
    report, _, _, paths, _ = written
    page = paths["html"].read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    for tag in ("html", "head", "body", "title", "style"):
        assert parser.tags.count(tag) == 1, tag
    assert "script" not in parser.tags
    assert "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    text = "".join(parser.text)
    assert f"Evaluation {EVIL}" in text  # the escaped title reads as the user wrote it
    assert f"query 0 {EVIL}" in text
    assert "n/a" in text  # the None metric
    section_titles = [s.title for s in report.sections]
    for title in section_titles:
        assert title in text


def test_html_embeds_every_plot_and_example_image_as_png(written):
    _, expected, n_plots, paths, _ = written
    parser = _Collector()
    parser.feed(paths["html"].read_text())
    images = parser.images
    assert len(images) == n_plots + len(expected)
    decoded = []
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        png = base64.b64decode(attrs["src"][len(prefix) :], validate=True)
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as im:
            assert (int(attrs["width"]), int(attrs["height"])) == im.size
            decoded.append(np.asarray(im))
        assert attrs["alt"]
    for plot in decoded[:n_plots]:  # recall curve, bars, confusion: real figures
        assert plot.shape[0] > 200 and plot.shape[1] > 300
    for got, want in zip(decoded[n_plots:], expected, strict=True):
        if isinstance(want, tuple):
            assert got.shape[:2] == want
        else:
            np.testing.assert_array_equal(got, want)


def test_summary_markdown_has_flat_metrics_and_section_tables(written):
    report, _, _, paths, _ = written
    md = paths["summary"].read_text()
    assert md.startswith("# Evaluation &lt;script>alert(1)&lt;/script>\n")
    assert "<script" not in md
    assert "- **model**: runs/clip/last.ckpt" in md
    for row in FLAT_ROWS:
        assert row in md, row
    for section in report.sections:
        assert f"## {section.title}" in md
    assert "| direction | R@1 | R@5 | R@10 |" in md
    assert "| t->i | 0.4 | n/a | n/a |" in md
    assert "| query | 1 | 2 | 3 | 4 | 5 |" in md
    assert "| query 1 &lt;script>alert(1)&lt;/script> | ✗ [image] | ✓ [image] | ✗ [image] |" in md
    assert "| [image] | ✓ caption 0 | ✗ caption 1 |" in md
    assert "| [image] | a digit | ref a<br>ref &lt;script>alert(1)&lt;/script> |" in md
    assert md.count("_Plot (") == 3
    assert "data:image" not in md


def test_per_class_rows_sorted_lowest_first_with_missing_last():
    section = per_class_section(["a", "b", "c", "d"], [0.5, float("nan"), 0.25, 1.0])
    table = section.blocks[-1]
    assert table.columns == ["class", "accuracy"]
    assert table.rows == [["c", 0.25], ["a", 0.5], ["d", 1.0], ["b", None]]


@pytest.mark.parametrize("n", [6, 30])
def test_confusion_lists_the_largest_off_diagonal_entries(n):
    rng = np.random.default_rng(n)
    matrix = rng.permutation(n * n).reshape(n, n)  # distinct counts: a unique ranking
    names = [f"k{i}" for i in range(n)]
    table = confusion_section(matrix, names).blocks[-1]
    brute = sorted(
        ((matrix[i, j], i, j) for i in range(n) for j in range(n) if i != j), reverse=True
    )[:10]
    assert [r[:3] for r in table.rows] == [[names[i], names[j], int(c)] for c, i, j in brute]
    for (c, i, _), row in zip(brute, table.rows, strict=True):
        assert row[3] == pytest.approx(c / matrix[i].sum())


def test_confusion_figure_labels_only_small_matrices():
    small = plots.confusion_figure(np.eye(5) * 3, list("abcde"), "t")
    ax = small.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcde")
    assert sorted(t.get_text() for t in ax.texts) == sorted(["3"] * 5 + ["0"] * 20)
    big = plots.confusion_figure(np.eye(25), [str(i) for i in range(25)], "t")
    assert len(big.axes[0].get_xticklabels()) == 0 and len(big.axes[0].texts) == 0


def test_perfect_confusion_says_so():
    table = confusion_section(np.eye(3, dtype=int) * 4, ["a", "b", "c"]).blocks[-1]
    assert table.rows == [] and "No confusions" in table.caption


def test_recall_table_matches_the_curves():
    section = recall_curve_section({"i->t": {10: 0.9, 1: 0.5}, "t->i": {5: 0.7}})
    table = section.blocks[-1]
    assert table.columns == ["direction", "R@1", "R@5", "R@10"]
    assert table.rows == [["i->t", 0.5, None, 0.9], ["t->i", None, 0.7, None]]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "n/a"),
        (float("nan"), "n/a"),
        (np.float32("nan"), "n/a"),
        (0.95, "0.95"),
        (0.123456, "0.1235"),
        (1.0, "1"),
        (0.0, "0"),
        (3, "3"),
        (np.int64(7), "7"),
        (12345.678, "12345.678"),
        (1e-5, "1.000e-05"),
        (2.5e7, "2.500e+07"),
        (True, "true"),
        ("text", "text"),
        ([0.5, None], "[0.5, n/a]"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_image_cell_accepts_pil_uint8_float_and_chw():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    want = np.kron(rgb, np.ones((8, 8, 1), np.uint8))
    chw_tensor = torch.from_numpy(np.moveaxis(rgb, -1, 0) / 255.0).float()
    for image in (rgb, Image.fromarray(rgb), np.moveaxis(rgb, -1, 0), rgb / 255.0, chw_tensor):
        cell = image_cell(image)
        with Image.open(io.BytesIO(cell.png)) as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), want)
        assert (cell.width, cell.height) == (64, 64)


def test_interrupted_replace_leaves_no_partial_files(tmp_path, monkeypatch):
    report = Report("t", {"a": 1.0}, [per_class_section(["x", "y"], [0.5, 1.0])])

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(report, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_failure_after_first_file_keeps_complete_files_only(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_report(Report("old", {"a": 0.0}), out)
    old_html = (out / "report.html").read_text()
    real_replace = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="interrupted"):
        write_report(Report("new", {"a": 1.0}), out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "summary.md"]
    assert json.loads((out / "metrics.json").read_text()) == {"a": 1.0}
    assert (out / "summary.md").read_text().startswith("# old")  # untouched, not truncated
    assert (out / "report.html").read_text() == old_html


def test_rendering_error_writes_nothing(tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("render failed")

    monkeypatch.setattr(rp, "render_html", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(Report("t", {"a": 1}), tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: per_class_section(["a", "b"], [0.5]), "accuracies"),
        (lambda: per_class_section(["a", "b"], [0.5, 1.0], support=[3]), "support"),
        (lambda: per_class_section([], []), "class_names"),
        (lambda: per_class_section(["a"], ["high"]), r"accuracies\[0\]"),
        (lambda: confusion_section(np.ones((2, 3)), ["a", "b"]), "matrix"),
        (lambda: confusion_section(np.ones(4), ["a"]), "matrix"),
        (lambda: confusion_section(np.ones((2, 2)), ["a", "b", "c"]), "class_names"),
        (lambda: confusion_section(-np.ones((2, 2)), ["a", "b"]), "matrix"),
        (lambda: recall_curve_section({}), "curves"),
        (lambda: recall_curve_section({"i->t": {0: 0.5}}), "curves"),
        (lambda: retrieval_examples_section(), "text_to_image"),
        (
            lambda: retrieval_examples_section([("q", [np.zeros((8, 8))], [True, False])]),
            r"text_to_image\[0\]",
        ),
        (
            lambda: retrieval_examples_section(image_to_text=[(np.zeros((8, 8)), [1], [True])]),
            r"image_to_text\[0\]\.results\[0\]",
        ),
        (
            lambda: retrieval_examples_section([("q", [np.zeros((8, 8, 2))], [True])]),
            r"text_to_image\[0\]\.results\[0\]",
        ),
        (lambda: image_cell(np.full((8, 8), 2.5)), r"\[0, 1\]"),
        (lambda: table_section("t", [{"a": 1}, 3]), r"rows\[1\]"),
        (lambda: Report("", {}), "title"),
        (lambda: Report("t", {"a": {1: 0.5}}), r"metrics\['a'\]"),
        (lambda: Report("t", {"a": object()}), r"metrics\['a'\]"),
    ],
)
def test_bad_input_raises_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_rendering_does_not_touch_pyplot():
    code = (
        "import sys, numpy as np\n"
        "from multimodal.eval.report import Report, confusion_section, render_html\n"
        "render_html(Report('t', {}, [confusion_section(np.eye(3), list('abc'))]))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_nan_accuracy_plot_is_skipped_when_no_value():
    section = per_class_section(["a"], [math.nan])
    assert [type(b).__name__ for b in section.blocks] == ["Table"]
