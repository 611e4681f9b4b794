"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary, for tests."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def cli_from_config(config: str, *overrides: str) -> LightningCLI:
    """LightningCLI of configs/<config> with overrides, instantiated but not run, quietly (no
    logger, checkpoints, progress bar or summary): `cli.trainer.fit(cli.model, cli.datamodule)`."""
    quiet = (
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    )  # fmt: skip
    args = ["--config", str(CONFIGS / config), *quiet, *overrides]
    return LightningCLI(run=False, args=args, save_config_callback=None)
