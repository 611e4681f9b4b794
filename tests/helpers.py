"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import Tensor

from multimodal.short_runs import PRECISION_ENV

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def env_precision() -> list[str]:
    """`--trainer.precision P` of MULTIMODAL_PRECISION (set by conftest on CPUs that emulate
    bf16), [] when unset: the configs' bf16-mixed would be ~17x slower there."""
    precision = os.environ.get(PRECISION_ENV, "").strip()
    return ["--trainer.precision", precision] if precision else []


def fast_precision() -> str:
    """bf16-mixed where this machine computes bf16 natively, else 32-true (for learning tests
    whose subject is not the precision)."""
    return os.environ.get(PRECISION_ENV, "").strip() or "bf16-mixed"


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
    args = ["--config", str(CONFIGS / config), *quiet, *env_precision(), *overrides]
    return _NoCheckpointsCLI(run=False, args=args, save_config_callback=None)


class _NoCheckpointsCLI(LightningCLI):
    """LightningCLI without the config's ModelCheckpoint callbacks when checkpointing is off
    (Lightning refuses a ModelCheckpoint with `enable_checkpointing=False`)."""

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("enable_checkpointing") is False:
            callbacks = trainer.get("callbacks") or []
            kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super().instantiate_trainer(**kwargs)


def run(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m multimodal ARGS` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "multimodal", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def fit_briefly(
    config: str, root_dir: Path, *overrides: str, steps: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`multimodal fit` of configs/<config> for `steps` steps and one validation batch,
    quietly, in `root_dir`; asserts it succeeds and stops where asked."""
    result = run(
        "fit", "--config", str(CONFIGS / config), *overrides,
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root_dir),
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"max_steps={steps}" in result.stdout + result.stderr
    return result


def held_out_zeroshot(model, datamodule) -> tuple[Tensor, Tensor]:
    """Zero-shot classification of the 10 digits over `datamodule`'s val loader with the
    prompt templates held out of training: (per-sample correctness, labels)."""
    from multimodal.data.demo import HELD_OUT_TEMPLATES, render_captions
    from multimodal.eval.zeroshot import zeroshot_classifier, zeroshot_logits

    model = model.eval()
    classifier = zeroshot_classifier(
        model,
        datamodule.tokenizer,
        [render_captions(c, HELD_OUT_TEMPLATES) for c in range(10)],
        context_length=datamodule.context_length,
    )
    right, labels = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits = zeroshot_logits(model.encode_image(batch["images"]), classifier)
            right.append(logits.argmax(1) == batch["labels"])
            labels.append(batch["labels"])
    return torch.cat(right), torch.cat(labels)


def save_task(task: pl.LightningModule, path: Path) -> Path:
    """`task`'s weights and hyper-parameters in the checkpoint format `load_task` reads (what
    `multimodal fit` writes, less the trainer state)."""
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path
