"""Every vision-language config trains a few steps on the demo shards under fp32, bf16-mixed
and 16-mixed (which Lightning runs as bf16 on CPU; fp16 autocast is checked separately), and
under 2-process DDP (gloo on CPU)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from tests.helpers import cli_from_config, fit_briefly

CONFIGS_VL = ["clip/digits.yaml", "caption/digits.yaml", "vqa/digits.yaml"]


def data_overrides(config: str, shards: Path) -> list[str]:
    """Point a config at the session's demo shards (and their tokenizer), no workers."""
    args = [
        "--data.init_args.train_urls", str(shards / "train"),
        "--data.init_args.val_urls", str(shards / "val"),
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip
    if not config.startswith("clip/"):
        args += ["--data.init_args.tokenizer", str(shards / "tokenizer")]
    return args


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("config", CONFIGS_VL)
def test_config_trains_two_steps(config, precision, demo_shards):
    cli = cli_from_config(
        config,
        *data_overrides(config, demo_shards),
        "--trainer.precision", precision,
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    if config.startswith("caption/"):
        assert {"val/exact_match", "val/bleu_4", "val/rouge_l", "val/cider_d"} <= set(metrics)
    changed = [n for n, p in cli.model.named_parameters() if not p.detach().equal(before[n])]
    assert len(changed) > 0.9 * len(before), "most parameters should have been updated"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS_VL)
def test_config_trains_under_two_process_ddp(config, demo_shards, tmp_path):
    result = fit_briefly(
        config, tmp_path, *data_overrides(config, demo_shards),
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        steps=2, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output


@pytest.mark.parametrize("config", CONFIGS_VL)
def test_config_forward_backward_under_fp16_autocast(config, demo_shards):
    """Lightning runs `16-mixed` as bf16 on CPU; fp16 itself (the GPU path) is checked here
    with torch's CPU fp16 autocast: finite loss and gradients (a -inf mask or an overflow
    in half precision would show as NaN)."""
    import torch

    cli = cli_from_config(config, *data_overrides(config, demo_shards))
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    task = cli.model
    task.trainer = None  # no datamodule checks: the step's loss only
    with torch.autocast("cpu", dtype=torch.float16):
        loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in task.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_captioning_warns_when_bleu_4_is_zero_by_construction(demo_shards):
    """Captions of at most 2 tokens have no 4-gram: validation logs BLEU-4 = 0 and says why."""
    config = "caption/digits.yaml"
    cli = cli_from_config(
        config,
        *data_overrides(config, demo_shards),
        "--model.init_args.generation.max_new_tokens", "2",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="val/bleu_4 is 0 by construction: no caption written"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert float(cli.trainer.callback_metrics["val/bleu_4"]) == 0.0
