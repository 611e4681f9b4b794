"""Zero-shot and retrieval reports that explain themselves: every metric defined next to its
value, the image->text Recall@K ceiling detected from captions shared word for word (and the
reported recall at or under it), metadata in metrics.json, value labels of the Recall@K plot
that do not overlap, zero-shot examples misclassified first with their top-3 classes and
probabilities (recomputed here), and the page rendered in headless Chromium where there is one.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.eval import class_names as names
from multimodal.eval.commands import retrieval_main, zeroshot_main
from multimodal.eval.evaluate import eval_loader
from multimodal.eval.loading import load_model
from multimodal.eval.metric_notes import reachable_image_to_text
from multimodal.eval.plots import recall_curve_figure
from multimodal.eval.zeroshot import embed_images, render_prompts, zeroshot_classifier
from tests.eval.test_generation_eval import caption_run  # noqa: F401 (fixture)
from tests.export.conftest import few_digits, tiny_checkpoint  # noqa: F401 (fixtures)

DIGITS = 10


def _common(checkpoint, config, data, out) -> list[str]:
    return [
        "--checkpoint", str(checkpoint), "--config", str(config), "--data", str(data),
        "--out", str(out), "--num-workers", "0", "--no-progress", "--device", "cpu",
    ]  # fmt: skip


def _metric_table(summary: str) -> dict[str, tuple[str, str]]:
    """metric -> (value, what it is) of summary.md's metrics table."""
    block = summary.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ")][1:]
    table = {}
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 3, row
        table[cells[0]] = (cells[1], cells[2])
    return table


@pytest.fixture(scope="module")
def reports(tiny_checkpoint, few_digits, tmp_path_factory):  # noqa: F811
    """The zero-shot and retrieval reports of the tiny digits CLIP on 40 noise images whose
    captions are shared 4 images a caption (10 digit captions)."""
    checkpoint, config = tiny_checkpoint
    root = tmp_path_factory.mktemp("explained")
    zs, rt = root / "zeroshot", root / "retrieval"
    assert zeroshot_main([*_common(checkpoint, config, few_digits, zs), "--examples", "8"]) == 0
    assert retrieval_main(_common(checkpoint, config, few_digits, rt)) == 0
    return {"zeroshot": zs, "retrieval": rt, "checkpoint": checkpoint, "config": config}


def test_every_metric_is_defined_where_it_is_shown(reports):
    for kind in ("zeroshot", "retrieval"):
        summary = (reports[kind] / "summary.md").read_text()
        table = _metric_table(summary)
        metrics = json.loads((reports[kind] / "metrics.json").read_text())
        flat = [k for k in _flat(metrics) if not k.startswith("meta/")]
        assert sorted(table) == sorted(flat)
        undefined = [name for name, (_, what) in table.items() if not what]
        assert not undefined, undefined
        html = (reports[kind] / "report.html").read_text()
        assert "<th>what it is</th>" in html
    zeroshot = _metric_table((reports["zeroshot"] / "summary.md").read_text())
    assert "averaged over the classes" in zeroshot["zeroshot/mean_per_class_recall"][1]
    assert "5 highest" in zeroshot["zeroshot/top5"][1]
    retrieval = _metric_table((reports["retrieval"] / "summary.md").read_text())
    assert "ties count against the model" in retrieval["retrieval/text_to_image/recall@5"][1]
    assert "first 5 images" in retrieval["retrieval/text_to_image/recall@5"][1]


def _flat(metrics, prefix=""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}"


def test_shared_captions_give_a_detected_ceiling_with_a_caveat_next_to_the_figure(reports):
    metrics = json.loads((reports["retrieval"] / "metrics.json").read_text())["retrieval"]
    # 40 images, captions "a photo of the number <digit>": each shared with 3 other images,
    # so an image's own caption ties with 3 wrong ones: best rank 4, R@1 = 0 for any model
    assert metrics["images_with_shared_captions"] == 40
    assert metrics["image_to_text/reachable_recall@1"] == 0
    assert "image_to_text/reachable_recall@5" not in metrics  # rank 4 <= 5: reachable
    assert metrics["image_to_text/recall@1"] == 0
    table = _metric_table((reports["retrieval"] / "summary.md").read_text())
    what = table["retrieval/image_to_text/recall@1"][1]
    assert "⚠ 40 of 40 images have only captions that other images share" in what
    assert "no model exceeds 0" in what
    assert "⚠" not in table["retrieval/image_to_text/recall@5"][1]
    assert "⚠" not in table["retrieval/text_to_image/recall@1"][1]
    html = (reports["retrieval"] / "report.html").read_text()
    assert "⚠ image_to_text/recall@1: 40 of 40 images" in html  # in the Recall@K section


def test_reachable_recall_by_hand_and_bounds_the_measured_recall():
    texts = ["a", "a", "b", "c", "c", "d", "e", "e", "e"]
    owner = [0, 1, 1, 2, 3, 3, 4, 4, 5]
    # image 0: "a" also image 1's -> best rank 2; image 1: "b" is its own only -> 1;
    # image 2: "c" also image 3's -> 2; image 3: "d" -> 1; image 4: "e" (own twice) also
    # image 5's once -> 2; image 5: "e" also image 4's twice -> 3
    n, shared, reachable = reachable_image_to_text(texts, owner, (1, 2, 3))
    assert (n, shared) == (6, 4)
    assert reachable == {1: 2 / 6, 2: 5 / 6, 3: 1.0}
    # any embedding giving identical texts identical features stays under the ceiling
    from multimodal.eval.retrieval import retrieval_metrics

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        images = torch.nn.functional.normalize(torch.randn(6, 3, generator=generator), dim=-1)
        by_text = {t: torch.randn(3, generator=generator) for t in set(texts)}
        features = torch.nn.functional.normalize(torch.stack([by_text[t] for t in texts]), dim=-1)
        result = retrieval_metrics(images, features, torch.tensor(owner), ks=(1, 2, 3))
        for k, ceiling in reachable.items():
            assert result.image_to_text.recall[k] <= ceiling + 1e-12


def test_metadata_is_in_metrics_json(reports):
    sha = hashlib.sha256(reports["checkpoint"].read_bytes()).hexdigest()
    for kind in ("zeroshot", "retrieval"):
        meta = json.loads((reports[kind] / "metrics.json").read_text())["meta"]
        assert meta["checkpoint_sha256"] == sha
        assert str(reports["checkpoint"]) in meta["model"]
        assert meta["data"].endswith("test")
        assert "torch " in meta["versions"] and "python " in meta["versions"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["date"])
    meta = json.loads((reports["zeroshot"] / "metrics.json").read_text())["meta"]
    assert meta["templates"] == "digits" and "10 classes" in meta["classes"]


def test_zeroshot_examples_misclassified_first_with_top3_probabilities(reports, few_digits):  # noqa: F811
    summary = (reports["zeroshot"] / "summary.md").read_text()
    block = summary.split("## Zero-shot: examples", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in block.splitlines() if line.startswith("| image"))
    assert "top 3 (probability)" in header
    rows = [line for line in block.splitlines() if line.startswith("| [image")]
    marks = [("✗" in row.split("|")[4]) for row in rows]
    assert marks == sorted(marks, reverse=True)  # the misclassified ones first
    # the top 3 recomputed: cosines of the image and the averaged prompts, times the scale
    loaded = load_model(reports["checkpoint"], config=reports["config"])
    classes = names.class_names("digits")
    with torch.no_grad():
        classifier = zeroshot_classifier(
            loaded.model,
            loaded.tokenizer,
            render_prompts(classes, names.templates("digits")),
            context_length=loaded.context_length,
        )
        features, keys, labels = [], [], []
        for batch in eval_loader(str(few_digits), loaded, num_workers=0):
            features.append(embed_images(loaded.model, batch["images"]))
            keys.extend(batch["keys"])
            labels.append(batch["labels"])
        probs = (torch.cat(features) @ classifier.T * loaded.model.scale()).softmax(-1)
    n_wrong = int((probs.argmax(-1) != torch.cat(labels)).sum())
    shown_wrong = min(4, n_wrong)  # up to half of the 8 examples
    assert sum(marks) == shown_wrong > 0
    assert len(rows) == shown_wrong + min(8 - shown_wrong, len(keys) - n_wrong)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        key, shown = cells[1], cells[4].split("<br>")
        top = probs[keys.index(key)].topk(3)
        expected = [f"{classes[c]} {p:.3f}" for c, p in zip(top.indices, top.values, strict=True)]
        assert shown == expected, (key, shown, expected)


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_recall_curve_value_labels_do_not_overlap():
    # crossing and nearly equal curves: the old alternating offsets put curve 0's label above
    # and curve 1's below, colliding where curve 0 is just under curve 1
    curves = {
        "image->text": {1: 0.50, 2: 0.61, 5: 0.80, 10: 0.90, 20: 0.95},
        "text->image": {1: 0.52, 2: 0.60, 5: 0.81, 10: 0.90, 20: 0.97},
        "third": {1: 0.51, 2: 0.62, 5: 0.30, 10: 0.91, 20: 0.96},
    }
    fig = recall_curve_figure(curves, "t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    assert len(labels) == 15
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not _boxes_overlap(boxes[i], boxes[j]), (labels[i], labels[j])


CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    return next((path for name in CHROMIUM if (path := shutil.which(name))), None)


def test_report_pages_render_in_headless_chromium(reports, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(f"no headless Chromium: none of {', '.join(CHROMIUM)} is on PATH")
    for kind in ("zeroshot", "retrieval"):
        page = (reports[kind] / "report.html").resolve()
        shot = tmp_path / f"{kind}.png"
        done = subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu",
                f"--screenshot={shot}", "--window-size=1200,1600",
                "--enable-logging=stderr", "--v=0", page.as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        console = [
            line
            for line in done.stderr.splitlines()
            if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)
        ]
        assert not console, console
        pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "blank screenshot"


def test_explanations_must_name_metrics_and_add_a_column_only_when_given(tmp_path):
    from multimodal.eval.report import Report, render_markdown

    with pytest.raises(ValueError, match=r"explanations\['a/c'\]"):
        Report("t", metrics={"a": {"b": 1}}, explanations={"a/c": "no such metric"})
    plain = render_markdown(Report("t", metrics={"a": {"b": 1}}))
    assert "| metric | value |" in plain and "what it is" not in plain
    explained = render_markdown(Report("t", metrics={"a": {"b": 1}}, explanations={"a/b": "x"}))
    assert "| metric | value | what it is |" in explained and "| a/b | 1 | x |" in explained


# --------------------------------------------------------------------------- attention section


def _section(summary: str, title: str) -> str:
    assert f"## {title}" in summary, title
    return summary.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _generation_args(checkpoint, config, data, out) -> list[str]:
    return [
        "--checkpoint", str(checkpoint), "--config", str(config), "--data", str(data),
        "--out", str(out), "--num-workers", "0", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def _keys(block: str, column: int) -> list[str]:
    rows = [line for line in block.splitlines() if line.startswith("| ")][1:]  # no header
    return [[c.strip() for c in row.split("|")[1:-1]][column] for row in rows]


def test_zeroshot_attention_section_shows_the_example_images(reports, few_digits, tmp_path):  # noqa: F811
    assert "attention" not in (reports["zeroshot"] / "summary.md").read_text().lower()
    out = tmp_path / "attention"
    args = _common(reports["checkpoint"], reports["config"], few_digits, out)
    assert zeroshot_main([*args, "--examples", "4", "--attention"]) == 0
    summary = (out / "summary.md").read_text()
    examples = _keys(_section(summary, "Zero-shot: examples"), 1)
    attention = _section(summary, "Zero-shot: attention of the example images")
    assert "Attention rollout of the image tower" in attention
    assert _keys(attention, 0) == examples and len(examples) == 4
    html = (out / "report.html").read_text()
    # each example: its image in the examples table, its image and rollout in the attention one
    assert html.count('src="data:image/png;base64,') >= 3 * 4


def test_a_model_without_a_vit_tower_gets_a_one_line_note():
    from torch import nn

    from multimodal.eval.evaluate import attention_or_note

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_tower = nn.Linear(3, 3)

    section = attention_or_note(Tower(), {"k": torch.zeros(3, 4, 4)}, (0, 0, 0), (1, 1, 1))
    (note,) = section.blocks
    assert note.text.startswith("No attention maps: attention maps need a vision.ViT image tower")
    assert "\n" not in note.text


def test_caption_eval_attention_section_for_best_and_worst(caption_run, tmp_path):  # noqa: F811
    from multimodal.eval.caption_eval import caption_eval_main

    checkpoint, config, shards, _ = caption_run
    out = tmp_path / "caption"
    args = _generation_args(checkpoint, config, shards, out)
    assert caption_eval_main([*args, "--examples", "2", "--attention"]) == 0
    summary = (out / "summary.md").read_text()
    shown = _keys(_section(summary, "Best captions by CIDEr-D"), 1)
    shown += _keys(_section(summary, "Worst captions by CIDEr-D"), 1)
    attention = _section(summary, "Attention of the best and worst examples")
    assert _keys(attention.split("**Where")[0], 0) == list(dict.fromkeys(shown))
    assert "Where the decoder looked when it generated each token" in attention
    metrics = json.loads((out / "metrics.json").read_text())
    plain = tmp_path / "plain"
    assert (
        caption_eval_main([*_generation_args(checkpoint, config, shards, plain), "--examples", "2"])
        == 0
    )
    assert "Attention" not in (plain / "summary.md").read_text()
    assert json.loads((plain / "metrics.json").read_text())["caption"] == metrics["caption"]
