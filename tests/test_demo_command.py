"""`multimodal demo` with one short epoch writes one report holding both evaluations; as
shipped, it reaches the retrieval and zero-shot figures of the README (slow)."""

from __future__ import annotations

import json
import time

import pytest

from multimodal import demo

TOWERS = "--model.init_args.model.init_args"
TINY = (  # config overrides: a small model, one validation batch, fp32
    f"{TOWERS}.image_tower.init_args.config.n_layers", "1",
    f"{TOWERS}.text_tower.init_args.config.transformer.n_layers", "1",
    "--trainer.limit_val_batches", "1", "--trainer.precision", "32",
)  # fmt: skip


def test_demo_writes_the_zeroshot_and_retrieval_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--epochs", "1", "--limit-train-batches", "2", *TINY]
    assert demo.main([*args, "--num-workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = out / "report"
    assert f"report: {report / 'report.html'}" in printed
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["zeroshot"]["n_samples"] == 270  # the test split
    assert 0 <= metrics["zeroshot"]["top1"] <= 1
    assert metrics["retrieval"]["n_images"] == metrics["retrieval"]["n_texts"] == 270
    html = (report / "report.html").read_text()
    for title in ("Zero-shot: per-class accuracy", "Zero-shot: examples", "Retrieval: Recall@K",
                  "Retrieval: examples"):  # fmt: skip
        assert title in html
    assert html.count('src="data:image/png;base64,') >= 16 + 4 * 5
    assert (out / demo.DATA_DIR / "tokenizer").is_dir()
    assert sorted(p.name for p in (out / demo.DATA_DIR / "test").glob("*.tar")) == [
        "instances-000000.tar",
        "instances-000001.tar",
    ]  # the instance-level digits: 270 test images, 256 a shard
    assert list(out.rglob("config.yaml")), "the run's config is saved next to its logs"


def test_demo_refuses_arguments_that_are_not_config_overrides(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "1", "--optimizer.lr", "1"])
    assert "unrecognized arguments: --optimizer.lr" in capsys.readouterr().err


def test_demo_names_the_missing_config(monkeypatch):
    monkeypatch.setattr(demo, "CONFIG", demo.CONFIG.with_name("no-such-config.yaml"))
    with pytest.raises(FileNotFoundError, match="no-such-config.yaml.*checkout"):
        demo.main(["--epochs", "1"])


@pytest.mark.slow
def test_demo_ranks_each_images_own_caption_first_and_classifies_digits_zero_shot(tmp_path):
    """`make demo` as shipped (the config's epochs): on the test split, image -> text and
    text -> image Recall@1 >= 0.3 among 270 unique captions (chance: 1/270) and zero-shot
    top-1 >= 0.9 with the held-out templates."""
    out = tmp_path / "demo"
    start = time.perf_counter()
    assert demo.main(["--out", str(out), "--no-progress"]) == 0
    elapsed = time.perf_counter() - start
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    retrieval, zeroshot = metrics["retrieval"], metrics["zeroshot"]
    figures = (
        f"i2t R@1 {retrieval['image_to_text/recall@1']:.3f}, "
        f"t2i R@1 {retrieval['text_to_image/recall@1']:.3f}, "
        f"zero-shot top-1 {zeroshot['top1']:.3f} in {elapsed:.0f} s"
    )
    print(figures)
    assert retrieval["n_texts"] == 270
    assert retrieval["image_to_text/recall@1"] >= 0.3, figures
    assert retrieval["text_to_image/recall@1"] >= 0.3, figures
    assert zeroshot["top1"] >= 0.9, figures
