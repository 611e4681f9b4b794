"""MULTIMODAL_MAX_STEPS caps LightningCLI runs at N steps and N evaluation batches, and only
them."""

from __future__ import annotations

import pytest

from multimodal import short_runs
from multimodal.short_runs import ENV, PRECISION_ENV, with_short_run_overrides

CAPPED = [
    "--trainer.max_steps", "3",
    "--trainer.limit_val_batches", "3",
    "--trainer.limit_test_batches", "3",
    "--trainer.limit_predict_batches", "3",
    "--trainer.val_check_interval", "3",
    "--trainer.check_val_every_n_epoch", "null",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_precision_override(monkeypatch):
    """tests/conftest.py sets MULTIMODAL_PRECISION on CPUs that emulate bf16; unset here."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)


def test_precision_goes_before_the_users_trainer_arguments(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv(PRECISION_ENV, "32-true")
    args = ["fit", "--config", "a.yaml", "--trainer.precision", "bf16-mixed"]
    override = ["--trainer.precision", "32-true"]
    assert with_short_run_overrides(args) == [*args[:3], *override, *args[3:]]  # the user's wins
    assert with_short_run_overrides(["fit", "--config", "a.yaml"]) == [
        "fit",
        "--config",
        "a.yaml",
        *override,
    ]
    assert f"{PRECISION_ENV}=32-true: --trainer.precision 32-true" in capsys.readouterr().err


def test_unset_leaves_the_arguments_alone(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert with_short_run_overrides(None) is None
    assert with_short_run_overrides(["fit", "--config", "a.yaml"]) == ["fit", "--config", "a.yaml"]
    assert short_runs.short_run_overrides() == []


@pytest.mark.parametrize("command", short_runs.SUBCOMMANDS)
def test_set_appends_the_caps_to_every_lightning_subcommand(monkeypatch, capsys, command):
    monkeypatch.setenv(ENV, "3")
    args = [command, "--config", "a.yaml", "--trainer.max_steps", "100"]
    assert with_short_run_overrides(args) == [*args, *CAPPED]  # last one wins in LightningCLI
    assert f"{ENV}=3: --trainer.max_steps 3" in capsys.readouterr().err


def test_set_reads_sys_argv_when_no_arguments_are_given(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    monkeypatch.setattr("sys.argv", ["multimodal", "fit", "--config", "a.yaml"])
    assert with_short_run_overrides(None) == ["fit", "--config", "a.yaml", *CAPPED]


def test_help_and_other_commands_are_not_capped(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    for args in (["fit", "--help"], ["--help"], ["shards", "demo", "--out", "d"]):
        assert with_short_run_overrides(args) == args


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"{ENV}='{value}' must be an integer >= 1"):
        with_short_run_overrides(["fit"])
