"""`make demo`'s figures: `multimodal demo` run as the Makefile runs it (the instance-level
digits, the shipped config, every epoch), then held to issue 16's bar (image->text and
text->image R@1 >= 0.3 on the test split, zero-shot top-1 >= 0.90), and its checkpoint
evaluated again by `multimodal zeroshot` with linear probes on its probe split (the command's
zero-shot equals the demo's; the zero-shot-prior probe at least zero-shot's top-1).

One demo run (about 3.5 minutes on an idle 2-core machine) serves both tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal.eval.commands import zeroshot_main
from multimodal.short_runs import ENV as MAX_STEPS_ENV
from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_figures")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The output folder of `multimodal demo --out DIR` (what `make demo` runs, in full)."""
    out = tmp_path_factory.mktemp("demo") / "runs"
    env = {k: v for k, v in os.environ.items() if k != MAX_STEPS_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "multimodal", "demo", "--out", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout[-1500:])
    return out


def test_make_demo_retrieves_instances_and_classifies_zero_shot(demo_run):
    metrics = json.loads((demo_run / "report" / "metrics.json").read_text())
    retrieval, zeroshot = metrics["retrieval"], metrics["zeroshot"]
    assert retrieval["n_images"] == retrieval["n_texts"] == 270  # one caption an image
    assert retrieval["image_to_text/recall@1"] >= 0.3
    assert retrieval["text_to_image/recall@1"] >= 0.3
    assert zeroshot["n_samples"] == 270 and zeroshot["top1"] >= 0.90


def test_probes_of_the_demo_clip_against_its_zero_shot(demo_run, tmp_path):
    """`multimodal zeroshot` on the demo's last checkpoint scores what the demo reported, and
    the linear probe with the zero-shot prior, trained on the demo's probe split (each of the
    270 validation scans, which the CLIP never trained on, drawn 8 times; the renderings of one
    scan kept on one side of the validation split), scores at least zero-shot's top-1 (issue
    15); the plain probe is reported beside it and stays within 5 points of zero-shot.

    Measured (270 test images, probe minus zero-shot in images, C by 5-fold grouped
    cross-validation, three seeds each, twelve demo CLIPs): the prior probe never below 0
    (36 of 36; the CLIP trained as `make demo` trains it: +1, 0, 0); the plain probe -2, -1,
    -2 on one CLIP. The demo run is now repeatable (zero-shot 0.9259 in any folder here:
    prior +2, plain +2); three runs of earlier versions, whose captions were drawn by the
    shards' paths (zero-shot 0.9222, 0.9407, 0.9444): prior +2, +2, +1; plain +4, -3, -8
    (-3.0 points): the plain probe learns the classes again
    from 2,160 labelled images and can fall below a zero-shot head that is already good, which
    is why the prior is the probe held to zero-shot. With one 20% split (54 scans) the prior
    probe fell to -1 on two of 21; on the training renderings (memorised: zero-shot 0.997 on
    them) -1, -1, -1, 0, 0."""
    (checkpoint,) = demo_run.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    shards = demo_run / "shards" / "instances"
    out = tmp_path / "report"
    argv = [
        "--checkpoint", str(checkpoint), "--data", str(shards / "test"), "--classes", "digits",
        "--linear-probe", str(shards / "probe"), r"--probe-group-pattern=-r\d+$",
        "--probe-folds", "5",
        "--out", str(out), "--examples", "0", "--no-progress",
    ]  # fmt: skip
    assert zeroshot_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    demo = json.loads((demo_run / "report" / "metrics.json").read_text())
    zeroshot = metrics["zeroshot"]["top1"]
    assert zeroshot == pytest.approx(demo["zeroshot"]["top1"], abs=1e-9)
    plain = metrics["linear_probe"]["top1"]
    prior = metrics["linear_probe_zeroshot_prior"]["top1"]
    print(
        f"zero-shot {zeroshot:.4f}, linear probe {plain:.4f}, with the zero-shot prior {prior:.4f}"
    )
    sizes = metrics["linear_probe_zeroshot_prior"]
    # 5-fold cross-validation scores each probe sample once, then refits C on all of them
    assert sizes["n_train"] == sizes["n_val"] == 2_160 and sizes["n_test"] == 270
    assert sizes["cv_folds"] == 5 and sizes["n_groups"] == 270  # the validation scans
    assert prior >= zeroshot, (prior, zeroshot)
    assert 100 * (plain - zeroshot) >= -PLAIN_POINTS, (plain, zeroshot)


PLAIN_POINTS = 5.0  # 13.5 of 270 test images; the worst measured: -8 (-3.0 points)
