"""`multimodal estimate`: the estimated peak training memory against a measured run, and the
report of a ViT-B/16 CLIP built without allocating it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from multimodal.train.estimate import Estimate, estimate_config, parse_memory, world_size
from tests.helpers import CONFIGS, ROOT

# Trains configs/clip/digits.yaml for two steps in a fresh process and prints its peak
# training memory: the RSS high-water mark since training started (reset then, so whatever
# the setup allocated and freed before does not count) over the RSS at that moment, plus the
# parameters (allocated before). fp32 because CPU bf16 matmuls are slow on CPUs without native
# bf16; the config's bf16-mixed agrees as well (ratio 1.02).
MEASURE = """
import re, resource, sys
import lightning.pytorch as pl
from tests.helpers import cli_from_config

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def high_water_mark():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

class AtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark to the current RSS
        self.rss = rss_now()

root = sys.argv[1]
cli = cli_from_config(
    "clip/digits.yaml", "--data.init_args.train_urls", root + "/train",
    "--data.init_args.val_urls", root + "/val", "--data.init_args.num_workers", "0",
    "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
    "--trainer.precision", "32-true",
)
start = AtStart()
cli.trainer.callbacks.append(start)
cli.trainer.fit(cli.model, cli.datamodule)
params = sum(p.numel() * p.element_size() for p in cli.model.parameters())
print("PEAK", high_water_mark() - start.rss + params)
"""

# `multimodal estimate` of the ViT-B/16 CLIP in this process, printing its RSS growth
ESTIMATE_VIT_B16 = """
import resource, sys
from multimodal.cli import COMMANDS
import multimodal.train.estimate  # the imports, before the baseline

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
code = COMMANDS["estimate"].run(sys.argv[1:])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RSS_GROWTH", after - before)
sys.exit(code)
"""


def python(code: str, *args: str) -> str:
    # glibc keeps freed heap memory mapped, so the RSS high-water mark would count memory freed
    # and not reused; a fixed mmap threshold returns every large block when it is freed, and
    # the mark follows the live memory, as a GPU allocator's peak does
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_digits_clip_peak_memory_matches_a_measured_run(demo_shards):
    data = ["--data.init_args.train_urls", f"{demo_shards}/train",
            "--data.init_args.val_urls", f"{demo_shards}/val",
            "--trainer.precision", "32-true"]  # fmt: skip
    est = estimate_config(["--config", str(CONFIGS / "clip/digits.yaml"), *data])
    assert est.batch_size == 64 and est.world_size == 1
    assert est.n_params == est.n_trainable == sum(est.towers.values())
    measured = int(python(MEASURE, str(demo_shards)).split("PEAK")[-1])
    estimated = est.peak("DDP", est.batch_size)
    assert estimated == pytest.approx(measured, rel=0.25), (estimated / 2**20, measured / 2**20)


def test_vit_b16_report_without_allocating_the_model(demo_shards):
    out = python(
        ESTIMATE_VIT_B16, "--config", str(CONFIGS / "clip/vit_b16.yaml"),
        "--data.init_args.train_urls", f"{demo_shards}/train",
        "--trainer.devices", "4", "--trainer.num_nodes", "2", "--device", "h100",
    )  # fmt: skip
    for section in ("parameters", "model.image_tower", "model.text_tower", "DDP", "FSDP2",
                    "activations", "flops", "largest batch per device", "step time at MFU 40%",
                    "world size 8"):  # fmt: skip
        assert section in out, out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert float(total.split()[1]) == pytest.approx(149.6, abs=0.2)  # open_clip ViT-B-16, M
    # the fp32 parameters alone are 600 MB: the estimate stays far below
    assert int(out.split("RSS_GROWTH")[-1]) < 250 * 2**20


def test_memory_model_per_strategy():
    est = Estimate(
        towers={"model": 1000}, n_params=1000, n_trainable=1000, largest_block=100,
        outside_blocks=200, precision="bf16-mixed", world_size=4, batch_size=8,
        activation_fixed=500.0, activation_per_sample=100.0, batch_bytes_per_sample=10.0,
        flops_per_sample=1e9,
    )  # fmt: skip
    # fp32 parameters, gradients, 2 Adam states, 1 step temporary, gradient buckets under DDP
    assert est.peak("DDP", 8) == 4000 * 5 + 4000 + 500 + 110 * 8
    # sharded over 4; working set: the root in bf16 + two blocks' bf16 params and fp32 grads
    assert est.peak("FSDP2", 8) == 4000 * 5 / 4 + (200 * 2 + 2 * 100 * 6) + 500 + 110 * 8
    assert est.largest_batch("DDP", est.peak("DDP", 8) + 109) == 8
    assert est.largest_batch("DDP", est.peak("DDP", 8) + 110) == 9


def test_memory_sizes_and_world_size():
    assert parse_memory("80GB") == 80e9
    assert parse_memory("141GiB") == 141 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="device-memory"):
        parse_memory("eighty")
    assert world_size({"devices": 8, "num_nodes": 2}) == 16
    assert world_size({"devices": "0,1,2", "num_nodes": 1}) == 3
    assert world_size({"devices": [0, 1], "num_nodes": 3}) == 6
    assert world_size({"devices": "auto"}) == 1


def test_gpt_estimate_counts_tied_weights_once_and_skips_metrics():
    """A causal LM task (torchmetrics accuracy in its step, a tied embedding): parameters as
    the real model counts them, FLOPs per sample as 6 x matmul weights x tokens + attention."""
    from tests.helpers import cli_from_config

    est = estimate_config(["--config", str(CONFIGS / "text/gpt_reverse.yaml")])
    real = cli_from_config("text/gpt_reverse.yaml").model
    assert est.n_params == sum(p.numel() for p in real.parameters())
    assert "model.lm_head" not in est.towers  # tied to model.embed
    assert est.flops_per_sample > 6 * sum(p.numel() for p in real.parameters() if p.dim() == 2)
