"""FSDP2 on 2 CPU processes (gloo), one launch of tests/train/fsdp_worker.py: the sharded CLIP
step equals one process on the whole batch, training equals DDP's, and a distributed
checkpoint resumes to the same next loss; a second launch (slow) trains compiled, checkpointed
blocks under DDP and FSDP2 to the eager losses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from multimodal.train import FSDP2Strategy, FSDPOptions
from tests.helpers import ROOT
from tests.train.fsdp_worker import STEPS, WORLD, global_batch, tiny_clip_task


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runs(NamedTuple):
    ranks: list[dict[str, Tensor]]  # each rank's results (fsdp_worker.main)
    checkpoints: Path  # the distributed checkpoint folders of the FSDP2 run


def launch(out: Path, mode: str) -> list[dict[str, Tensor]]:
    """fsdp_worker on WORLD processes (one process group); each rank's results."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "tests.train.fsdp_worker", str(out), mode]
    ranks = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = [rank.communicate(timeout=600)[0] for rank in ranks]
    for rank, log in zip(ranks, logs, strict=True):
        assert rank.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    out = tmp_path_factory.mktemp("fsdp")
    return Runs(launch(out, "fsdp"), out / "ckpt")


def single_process_step() -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and gradients of the same task on the whole batch in this process."""
    task = tiny_clip_task()
    loss = task.loss(task(global_batch()))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in task.named_parameters() if p.grad is not None}


def test_sharded_step_equals_one_process(runs: Runs) -> None:
    loss, grads = single_process_step()
    for rank in runs.ranks:
        torch.testing.assert_close(rank["fsdp/losses"][0], loss, atol=1e-5, rtol=0)
        got = {k.removeprefix("fsdp/grad/"): v for k, v in rank.items() if "/grad/" in k}
        assert got.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=0, msg=name)


def test_blocks_are_sharded_over_the_ranks(runs: Runs) -> None:
    for rank in runs.ranks:
        local, total = rank["fsdp/block_shard"].tolist()
        assert local * WORLD == total


def test_three_steps_equal_ddp(runs: Runs) -> None:
    for rank in runs.ranks:
        assert len(rank["fsdp/losses"]) == STEPS
        assert not torch.equal(rank["fsdp/losses"][0], rank["fsdp/losses"][-1])  # it trains
        torch.testing.assert_close(rank["fsdp/losses"], rank["ddp/losses"], atol=1e-5, rtol=0)


def test_distributed_checkpoint_resumes_to_the_same_loss(runs: Runs) -> None:
    folder = runs.checkpoints / "step=2.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    assert len(list(folder.glob("*.distcp"))) == WORLD  # one shard file per rank
    for rank in runs.ranks:
        # resumed from other initial weights: the loss of step 3 is the uninterrupted one
        torch.testing.assert_close(
            rank["resumed/losses"], rank["fsdp/losses"][2:], atol=1e-6, rtol=0
        )


def test_bf16_params_cpu_offload_and_checkpointing_step(runs: Runs) -> None:
    for rank in runs.ranks:
        mixed, full = rank["bf16/losses"][0], rank["fsdp/losses"][0]
        assert not torch.equal(mixed, full)  # bf16 compute does differ
        torch.testing.assert_close(mixed, full, atol=2e-2, rtol=0)


def test_fsdp_options_validate_and_reach_the_strategy() -> None:
    with pytest.raises(ValueError, match="param_dtype"):
        FSDPOptions(param_dtype="bf16")
    strategy = FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32", cpu_offload=True)
    policies = strategy.options.policies()
    assert policies["mp_policy"].param_dtype == torch.bfloat16
    assert policies["mp_policy"].reduce_dtype == torch.float32
    assert "offload_policy" in policies


def test_fsdp_config_builds(tmp_path: Path) -> None:
    from tests.helpers import cli_from_config

    cli = cli_from_config("clip/vit_b32_fsdp.yaml", "--trainer.default_root_dir", str(tmp_path))
    assert isinstance(cli.trainer.strategy, FSDP2Strategy)
    assert cli.trainer.strategy.options.param_dtype == "bfloat16"
    assert cli.model.block_options.grad_checkpointing
    blocks = cli.model.model.image_tower.encoder.blocks
    assert len(blocks) == 12 and len(cli.model.model.text_tower.transformer.blocks) == 12


@pytest.mark.slow
def test_compiled_checkpointed_blocks_under_ddp_and_fsdp2(tmp_path: Path) -> None:
    for rank in launch(tmp_path, "compile"):
        eager = rank["eager/losses"]
        assert not torch.equal(eager[0], eager[1])
        torch.testing.assert_close(rank["ddp_compiled/losses"], eager, atol=1e-4, rtol=0)
        torch.testing.assert_close(rank["fsdp_compiled/losses"], eager, atol=1e-4, rtol=0)
