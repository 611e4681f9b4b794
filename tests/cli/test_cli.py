"""The `multimodal` command: help, the platform commands, and every YAML config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.run_cases import run_cases
from tests.helpers import ROOT, fit_briefly, run

SUITES = sorted((ROOT / "configs/eval").glob("*.yaml"))  # `multimodal benchmark --tasks`
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set(SUITES))  # `multimodal fit`


def test_help_lists_lightning_and_platform_commands():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("fit", "validate", "test", "predict", "demo"):
        assert command in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("multimodal")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fit" in result.stdout


def test_demo_and_evaluation_commands_have_help():
    result = run("demo", "--help")
    assert result.returncode == 0, result.stderr
    assert "--epochs" in result.stdout and "report" in result.stdout


@pytest.fixture(scope="module")
def printed_configs(tmp_path_factory) -> dict[Path, dict]:
    """`multimodal fit --config C --print_config` of every config, in one interpreter (one
    start-up for all: tests/cli/run_cases.py)."""
    cases = [["fit", "--config", str(c), "--print_config"] for c in CONFIGS]
    results = run_cases(cases, tmp_path_factory.mktemp("print_config"))
    return dict(zip(CONFIGS, results, strict=True))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_config_parses(config, printed_configs):
    result = printed_configs[config]
    assert result["status"] == 0, result["stderr"][-3000:]
    assert "class_path" in result["stdout"]


@pytest.mark.parametrize("suite", SUITES, ids=[str(c.relative_to(ROOT)) for c in SUITES])
def test_every_benchmark_suite_parses(suite):
    from multimodal.eval.benchmark_suite import load_suite

    assert load_suite(suite).tasks


def test_fit_runs_the_smoke_config(tmp_path):
    fit_briefly("smoke/boring.yaml", tmp_path, steps=4)


def test_vit_digits_config_trains_and_tests(tmp_path):
    config = str(ROOT / "configs/vision/vit_digits.yaml")
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    fit_briefly("vision/vit_digits.yaml", tmp_path, steps=3)
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    test = run("test", "--config", config, *common, "--ckpt_path", str(checkpoint))
    assert test.returncode == 0, test.stderr
    assert "test/acc1" in test.stdout


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """A tab-separated classification file and a WordPiece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("text")
    rows = [("even", "the number two"), ("odd", "the number three"), ("even", "four apples")]
    tsv = root / "train.tsv"
    tsv.write_text("".join(f"{label}\t{text}\n" for label, text in rows * 20))
    tokenizer = root / "tokenizer"
    result = run(
        "tokenizer",
        "train",
        "--corpus",
        str(tsv),
        str(ROOT / "README.md"),
        "--kind",
        "wordpiece",
        "--vocab-size",
        "500",
        "--out",
        str(tokenizer),
    )
    assert result.returncode == 0, result.stderr
    return {"tsv": str(tsv), "tokenizer": str(tokenizer)}


@pytest.mark.parametrize("name", ["gpt_reverse", "t5_reverse", "bert_mlm", "bert_classifier"])
def test_text_configs_train(name, tmp_path, text_files):
    overrides = {
        "bert_mlm": ["--data.init_args.tokenizer", text_files["tokenizer"]],
        "bert_classifier": [
            "--model.init_args.init_from",
            "null",  # from scratch: tests/tasks/test_init_from.py starts it from a bert_mlm run
            "--data.init_args.tokenizer",
            text_files["tokenizer"],
            "--data.init_args.train_file",
            text_files["tsv"],
        ],
    }.get(name, [])
    fit_briefly(f"text/{name}.yaml", tmp_path, *overrides, steps=2)


@pytest.mark.parametrize("config", ["vision/vit_digits_shards.yaml", "clip/digits.yaml"])
def test_shard_configs_train_from_demo_shards(tmp_path, config):
    from multimodal.data.demo import write_demo_shards

    write_demo_shards(tmp_path / "digits", progress=False)
    fit_briefly(
        config, tmp_path,
        "--data.init_args.train_urls", str(tmp_path / "digits/train"),
        "--data.init_args.val_urls", str(tmp_path / "digits/val"),
        "--data.init_args.num_workers", "0",
        steps=3,
    )  # fmt: skip
