"""`multimodal benchmark` (a suite with embedding caching) vs the same cells run as separate
`multimodal zeroshot` / `multimodal retrieval` commands, and a rerun with one new model vs the
full suite. Prints times and ratios measured in the same run; never a timed test.

    python bench/suite.py [--per-class 58] [--batch-size 64] [--quick]

Models: 4 randomly initialised tiny CLIPs of configs/clip/digits.yaml (1 layer, width 32;
seeds 0-3) saved as fit checkpoints. Data, written here from scikit-learn's digits (other scans
in each): shards (captions and labels), an ImageFolder tree and a CSV (captions and labels),
--per-class images a class each (58, the default: all the digits, 3 x 580 of 1,797 scans).
The suite: zero-shot on the three, retrieval on the shards and the CSV (5 cells a model).

- separate: the 15 cells of 3 models as 15 in-process calls of zeroshot_main / retrieval_main
  (each loads its model, embeds its data and writes its report, as a user running them would).
- suite: `benchmark_main` on the 3 models into a fresh folder (each model loaded once, each
  dataset embedded once a model, one report). Goal: <= 0.5x separate.
- rerun: `benchmark_main` on the 4 models into the same folder (only the new model's cells
  run). Goal: <= 0.4x suite.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.data.digits import DIGIT_NAMES, load_digit_images  # noqa: E402
from multimodal.data.shards import encode_png, write_shards  # noqa: E402
from multimodal.eval.benchmark import benchmark_main  # noqa: E402
from multimodal.eval.commands import retrieval_main, zeroshot_main  # noqa: E402
from multimodal.eval.loading import instantiate_model_and_data  # noqa: E402

TINY = {"dim": 32, "n_heads": 2, "n_layers": 1}


def tiny_config() -> dict:
    """configs/clip/digits.yaml with 1-layer, 32-wide towers."""
    config = yaml.safe_load((ROOT / "configs/clip/digits.yaml").read_text())
    clip = config["model"]["init_args"]["model"]["init_args"]
    clip["embed_dim"] = 32
    clip["image_tower"]["init_args"]["config"].update(TINY)
    clip["text_tower"]["init_args"]["config"]["transformer"].update(TINY)
    return config


def write_models(root: Path, n: int) -> tuple[list[str], str]:
    """n randomly initialised checkpoints (seeds 0..n-1) in the fit checkpoint format, and
    their config."""
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    checkpoints = []
    for seed in range(n):
        torch.manual_seed(seed)
        task, _ = instantiate_model_and_data(config)
        path = root / f"model{seed}.ckpt"
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
        checkpoints.append(str(path))
    return checkpoints, str(config)


def captions(label: int) -> list[str]:
    return [f"a photo of the number {DIGIT_NAMES[label]}", f"a handwritten {label}"]


def write_data(root: Path, per_class: int) -> dict[str, str]:
    """Shards, an ImageFolder tree and a CSV of different digit scans, per_class a class."""
    images, labels = load_digit_images(32)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    if 3 * per_class > min(len(index) for index in by_class):
        raise SystemExit(f"--per-class {per_class}: the digits have too few scans (max 58)")
    samples, rows = [], []
    for label, index in enumerate(by_class):
        for j in range(per_class):
            shard_image = images[index[j]]
            samples.append(
                {
                    "__key__": f"{label}-{j:04d}",
                    "png": encode_png(Image.fromarray(shard_image)),
                    "txt": captions(label)[0],
                    "json": {"label": label, "class_name": DIGIT_NAMES[label],
                             "captions": captions(label)},
                }
            )  # fmt: skip
            folder = root / "tree" / DIGIT_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index[per_class + j]]).save(folder / f"{j:04d}.png")
            (root / "csv").mkdir(exist_ok=True)
            name = f"{label}-{j:04d}.png"
            Image.fromarray(images[index[2 * per_class + j]]).save(root / "csv" / name)
            for caption in captions(label):
                rows.append(
                    {"image": name, "label": label, "class_name": DIGIT_NAMES[label],
                     "caption": caption}
                )  # fmt: skip
    order = np.random.default_rng(0).permutation(len(samples))  # classes mixed in each shard
    write_shards([samples[i] for i in order], root / "shards", prefix="digits", progress=False)
    with open(root / "csv" / "data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label", "class_name", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return {
        "shards": str(root / "shards"),
        "tree": f"imagefolder:{root / 'tree'}",
        "table": f"csv:{root / 'csv' / 'data.csv'}",
    }


CELLS = (("shards", "zeroshot"), ("shards", "retrieval"), ("tree", "zeroshot"),
         ("table", "zeroshot"), ("table", "retrieval"))  # fmt: skip


def write_suite(root: Path, data: dict[str, str]) -> Path:
    tasks = [{"dataset": data[name], "name": name, "task": task} for name, task in CELLS]
    file = root / "suite.yaml"
    file.write_text(yaml.safe_dump({"tasks": tasks}))
    return file


def timed(function, argv: list[str]) -> float:
    start = time.perf_counter()
    with open(os.devnull, "w") as sink, redirect_stdout(sink):
        status = function(argv)
    if status != 0:
        raise SystemExit(f"{function.__name__} {' '.join(argv)} exited with {status}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--per-class", type=int, default=58, help="images a class a dataset (58: all the digits)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images a batch (64)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader workers (0)")
    parser.add_argument("--quick", action="store_true", help="4 images a class (a smoke run)")
    args = parser.parse_args()
    per_class = 4 if args.quick else args.per_class
    common = ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
              "--no-progress"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        root = Path(tmp)
        checkpoints, config = write_models(root, 4)
        data = write_data(root, per_class)
        suite = write_suite(root, data)
        print(f"3 datasets x {10 * per_class} images, 5 cells a model, tiny CLIPs (width 32)")

        separate = 0.0
        for m, checkpoint in enumerate(checkpoints[:3]):
            for name, task in CELLS:
                function = zeroshot_main if task == "zeroshot" else retrieval_main
                argv = ["--checkpoint", checkpoint, "--config", config, "--data", data[name],
                        "--out", str(root / "single" / f"{m}-{name}-{task}"), *common]  # fmt: skip
                separate += timed(function, argv)

        out = root / "bench"
        suite_argv = ["--tasks", str(suite), "--out", str(out), *common]
        full = timed(
            benchmark_main,
            ["--models", *checkpoints[:3], "--configs", *[config] * 3, *suite_argv],
        )
        rerun = timed(
            benchmark_main, ["--models", *checkpoints, "--configs", *[config] * 4, *suite_argv]
        )
    print(f"separate commands (15 cells): {separate:8.2f} s")
    print(f"suite (3 models, 15 cells):    {full:7.2f} s   {full / separate:.2f}x separate", end="")
    print(" (goal <= 0.5x)")
    print(f"rerun (+1 model, 5 new cells): {rerun:7.2f} s   {rerun / full:.2f}x suite", end="")
    print(" (goal <= 0.4x)")


if __name__ == "__main__":
    main()
