"""Bad input to `multimodal` ends in one line naming the problem and exit status 2, never a
traceback. The cases run in one interpreter (tests/cli/run_cases.py) to pay one start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli.run_cases import run_cases
from tests.helpers import CONFIGS

CLIP = str(CONFIGS / "clip/digits.yaml")
BORING = str(CONFIGS / "smoke/boring.yaml")


def assert_one_line_error(result: dict, *expected: str) -> str:
    output = result["stdout"] + result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["status"] == 2, (result["argv"], output[-3000:])
    assert "Traceback" not in output and "weights_only=False" not in output, output[-3000:]
    assert len(lines) == 1, (result["argv"], lines)
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def results(demo_shards, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("errors")
    (cwd / "data").mkdir()
    (cwd / "data/digits").symlink_to(demo_shards)  # the configs read data/digits
    (cwd / "empty").mkdir()
    (cwd / "notes.ckpt").write_text("my notes about the run, not a checkpoint\n")
    (cwd / "random.ckpt").write_bytes(bytes(range(7, 256)) * 16)
    torch.save({"weight": torch.ones(2)}, cwd / "weights.pt")  # a torch file, not Lightning's
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "x": Path("a")}, cwd / "obj.ckpt")
    (cwd / "earlier/digits/checkpoints").mkdir(parents=True)  # an earlier run's folder
    (cwd / "earlier/digits/checkpoints/last.ckpt").write_bytes(b"")
    test = str(demo_shards / "test")
    zeroshot = ["zeroshot", "--data", test, "--num-workers", "0", "--no-progress"]
    cases = {
        "negative batch": ["fit", "--config", CLIP, "--data.init_args.batch_size", "-3"],
        "missing shards": [
            "fit", "--config", CLIP, "--data.init_args.train_urls", "no_such_folder",
            "--trainer.default_root_dir", "failed_runs",
        ],
        "empty shards": ["fit", "--config", CLIP, "--data.init_args.train_urls", "empty"],
        "random ckpt_path": ["fit", "--config", BORING, "--ckpt_path", "random.ckpt"],
        "text ckpt_path": ["fit", "--config", BORING, "--ckpt_path", "notes.ckpt"],
        "state dict ckpt_path": ["fit", "--config", BORING, "--ckpt_path", "weights.pt"],
        "objects ckpt_path": ["fit", "--config", BORING, "--ckpt_path", "obj.ckpt"],
        "text checkpoint": [*zeroshot, "--checkpoint", "notes.ckpt", "--classes", "digits"],
        "random checkpoint": [*zeroshot, "--checkpoint", "random.ckpt", "--classes", "digits"],
        "classes typo": [*zeroshot, "--checkpoint", "random.ckpt", "--classes", "digitz"],
        "wrong classes": [*zeroshot, "--checkpoint", "random.ckpt", "--classes", "cifar10"],
        "command typo": ["zeroshoot", "--data", test],
        "option typo": ["fit", "--config", BORING, "--trainer.max_stepz", "3"],
        "run exists": ["fit", "--config", CLIP, "--trainer.default_root_dir", "earlier"],
        "bad run name": ["fit", "--config", CLIP, "--run-name", "my run"],
    }  # fmt: skip
    found = run_cases(list(cases.values()), cwd)
    return {"cwd": cwd, **dict(zip(cases, found, strict=True))}


def test_config_value_errors_name_the_field(results):
    assert_one_line_error(results["negative batch"], "batch_size=-3")
    assert_one_line_error(results["option typo"], "max_stepz")


def test_missing_or_empty_shards_name_the_folder(results):
    assert_one_line_error(results["missing shards"], "no_such_folder")
    assert_one_line_error(results["empty shards"], "'empty'", "no *.tar")
    # the failed start left no run folder behind (nor the root it would have created)
    assert not (results["cwd"] / "failed_runs").exists()


def test_checkpoints_that_are_not_checkpoints_say_what_they_are(results):
    assert_one_line_error(results["random ckpt_path"], "random.ckpt", "not a torch file")
    assert_one_line_error(results["text ckpt_path"], "notes.ckpt", "is a text file")
    line = assert_one_line_error(results["state dict ckpt_path"], "weights.pt")
    assert "not a Lightning checkpoint" in line
    line = assert_one_line_error(results["objects ckpt_path"], "obj.ckpt")
    assert "Python objects other than tensors" in line and "PosixPath" in line
    assert_one_line_error(results["text checkpoint"], "notes.ckpt", "is a text file")
    assert_one_line_error(results["random checkpoint"], "random.ckpt", "not a torch file")


def test_class_lists_are_checked_by_name_and_against_the_shards(results):
    assert_one_line_error(results["classes typo"], "'digitz'", "did you mean 'digits'")
    line = assert_one_line_error(results["wrong classes"], "cifar10", "'airplane'", "'zero'")
    assert "does not match the shards" in line


def test_a_mistyped_command_suggests_the_nearest(results):
    assert_one_line_error(results["command typo"], "'zeroshoot'", "multimodal zeroshot")


def test_a_fresh_fit_refuses_an_earlier_runs_folder_and_bad_names(results):
    line = assert_one_line_error(results["run exists"], "earlier/digits", "already holds")
    assert "--ckpt_path last" in line and "--run-name" in line
    assert_one_line_error(results["bad run name"], "'my run'")


def test_a_checkpoint_folder_must_be_a_sharded_checkpoint(tmp_path):
    from multimodal.checkpoint_check import DISTRIBUTED_METADATA, check_lightning_checkpoint

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match="last.ckpt' is a folder but not a distributed"):
        check_lightning_checkpoint(folder)
    (folder / DISTRIBUTED_METADATA).write_bytes(b"")  # FSDP2 checkpoints: left to the strategy
    assert check_lightning_checkpoint(folder) == {}
