"""`multimodal demo` with one short epoch writes one report holding both evaluations (the
figures of the shipped config are asserted by tests/tasks/test_contrastive.py)."""

from __future__ import annotations

import json

import pytest

from multimodal import demo

TOWERS = "--model.init_args.model.init_args"
TINY = (  # config overrides: a small model, one validation batch, fp32
    f"{TOWERS}.image_tower.init_args.config.n_layers", "1",
    f"{TOWERS}.text_tower.init_args.config.transformer.n_layers", "1",
    "--trainer.limit_val_batches", "1", "--trainer.precision", "32",
)  # fmt: skip


@pytest.mark.parametrize("variant", ["digits", "instances"])
def test_demo_writes_the_zeroshot_and_retrieval_report(variant, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--epochs", "1", "--limit-train-batches", "2", *TINY]
    args += ["--variant", variant]
    assert demo.main([*args, "--num-workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = out / "report"
    assert f"report: {report / 'report.html'}" in printed
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["zeroshot"]["n_samples"] == 270  # the test split
    assert 0 <= metrics["zeroshot"]["top1"] <= 1
    assert metrics["retrieval"]["n_images"] == 270
    # the plain digits carry 8 captions an image, the instances one unique caption
    assert metrics["retrieval"]["n_texts"] == (270 if variant == "instances" else 8 * 270)
    html = (report / "report.html").read_text()
    for title in ("Zero-shot: per-class accuracy", "Zero-shot: examples", "Retrieval: Recall@K",
                  "Retrieval: examples"):  # fmt: skip
        assert title in html
    assert html.count('src="data:image/png;base64,') >= 16 + 4 * 5
    assert (out / demo.DATA_DIR / variant / "tokenizer").is_dir()
    probe = sorted((out / demo.DATA_DIR / variant).glob("probe/*.tar"))
    assert len(probe) == (9 if variant == "instances" else 0)  # 2,160 renderings, 256 a shard
    assert sorted(p.name for p in (out / demo.DATA_DIR / variant / "test").glob("*.tar")) == [
        f"{variant}-000000.tar",
        f"{variant}-000001.tar",
    ]  # 270 test images, 256 a shard
    assert list(out.rglob("config.yaml")), "the run's config is saved next to its logs"


def test_demo_refuses_arguments_that_are_not_config_overrides(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "1", "--optimizer.lr", "1"])
    assert "unrecognized arguments: --optimizer.lr" in capsys.readouterr().err


def test_demo_names_the_missing_config(monkeypatch):
    missing = dict(demo.CONFIGS)
    missing[demo.VARIANT] = missing[demo.VARIANT].with_name("no-such-config.yaml")
    monkeypatch.setattr(demo, "CONFIGS", missing)
    with pytest.raises(FileNotFoundError, match="no-such-config.yaml.*checkout"):
        demo.main(["--epochs", "1"])


def test_demo_data_is_written_again_when_a_split_is_missing(tmp_path, monkeypatch, capsys):
    """An instance demo written before the probe split existed is written again (the README's
    probe command reads `probe/`); a complete one is kept."""
    from multimodal.data import demo as demo_data

    written = []
    monkeypatch.setattr(demo_data, "write_demo_shards", lambda root, **kw: written.append(kw))
    root = tmp_path / "instances"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        (root / split / "instances-000000.tar").touch()
    (root / "tokenizer").mkdir()
    demo.write_data(root, progress=False, variant="instances")
    assert [kw["variant"] for kw in written] == ["instances"]
    (root / "probe").mkdir()
    (root / "probe" / "instances-000000.tar").touch()
    demo.write_data(root, progress=False, variant="instances")
    assert len(written) == 1 and "(already written)" in capsys.readouterr().out
    plain = tmp_path / "digits"  # the plain demo has no probe split
    for split in ("train", "val", "test", "tokenizer"):
        (plain / split).mkdir(parents=True)
        (plain / split / "digits-000000.tar").touch()
    demo.write_data(plain, progress=False, variant="digits")
    assert len(written) == 1
