"""Cluster launch: the sbatch script run as SLURM would run it (a stand-in `srun` starting two
processes with srun's variables) forms one 2-rank run; the reference configs of the real jobs
parse and build."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

from lightning.pytorch.cli import LightningCLI

from tests.helpers import CONFIGS, ROOT

# srun's options are skipped; each task gets the variables srun sets for it
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" > "$SRUN_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sbatch_script_forms_one_two_rank_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {
        **os.environ,
        "PATH": path,  # the stand-in srun, then the venv's `multimodal`
        "PYTHONPATH": str(ROOT),  # the test's callback
        "SRUN_LOGS": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "multimodal",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MULTIMODAL_MAX_STEPS"):
        env.pop(key, None)
    result = subprocess.run(
        ["bash", str(CONFIGS / "cluster/slurm.sbatch"), str(CONFIGS / "smoke/boring.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
         "--trainer.default_root_dir", str(tmp_path / "runs"),
         "--trainer.callbacks+=tests.cli.rank_report.RankReport", "--run-name", "two_ranks"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("task*.log")))
    assert result.returncode == 0, result.stderr[-2000:] + logs[-3000:]
    run_dir = tmp_path / "runs/two_ranks"  # <default_root_dir>/<--run-name>
    reports = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["global_rank"] == rank and report["world_size"] == 2, report
        assert report["environment"] == "SLURMEnvironment", report
        assert report["rank_sum"] == 3.0, report  # 1 + 2: one process group of both
        assert report["global_step"] == 4, report
    assert "--ckpt_path last:" in logs  # the first start found nothing to resume
    assert logs.count("run finished:") == 1  # the summary, from rank 0 only


def test_torchrun_script_runs_multimodal_fit():
    script = (CONFIGS / "cluster/torchrun.sh").read_text()
    result = subprocess.run(["bash", "-n", str(CONFIGS / "cluster/torchrun.sh")])
    assert result.returncode == 0
    assert "-m multimodal fit --config" in script and "--ckpt_path last" in script


def _build(config: str, *overrides: str) -> LightningCLI:
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return LightningCLI(
            run=False,
            args=["--config", str(CONFIGS / config), "--trainer.logger", "false", *overrides],
            save_config_callback=None,
        )


def _parameters(cli: LightningCLI) -> int:
    return sum(p.numel() for p in cli.model.parameters())


def test_reference_configs_build(demo_shards, tmp_path):
    from text.tokenizer import train_tokenizer

    clip = _build(
        "clip/vit_b32_laion.yaml",
        "--data.init_args.train_urls", str(demo_shards / "train"),
        "--data.init_args.val_urls", str(demo_shards / "val"),
    )  # fmt: skip
    model = clip.model.model
    assert model.image_tower.config.image_size == 224 and model.image_tower.config.patch_size == 32
    assert model.text_tower.config.transformer.n_layers == 12
    train = clip.datamodule.configs["train"]
    assert train.batch_size == 256 and train.resampled
    assert clip.trainer.precision == "bf16-mixed" and clip.model.optim.warmup_steps == 2000
    assert 150e6 < _parameters(clip) < 152e6  # OpenAI's ViT-B/32: 151.3M
    del clip, model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a tiny corpus for the tokenizer\n" * 20)
    train_tokenizer([corpus], kind="bpe", vocab_size=300).save(tmp_path / "bpe")
    gpt = _build(
        "text/gpt2_124m.yaml",
        "--data.init_args.train_files", f"[{corpus}]",
        "--data.init_args.val_files", f"[{corpus}]",
        "--data.init_args.tokenizer", str(tmp_path / "bpe"),
    )  # fmt: skip
    config = gpt.model.model.config
    assert (config.transformer.dim, config.transformer.n_layers, config.transformer.n_heads) == (
        768, 12, 12,
    )  # fmt: skip
    assert config.transformer.max_positions == 1024
    # GPT-2 small: 124.4M with 50,257 ids; the padded 50,304 ids add 48 x 768
    assert _parameters(gpt) == 124_439_808 + (50_304 - 50_257) * 768
