"""`multimodal demo`: the whole platform in one command on the bundled digits.

Writes the demo shards (and the demo tokenizer) to `<out>/shards/<variant>` unless they are
there, trains a small CLIP on them (with the zero-shot accuracy and retrieval recall on the
validation split in the progress bar), then evaluates it on the test split:
zero-shot classification of the digits with the two prompt templates held out of training,
and image-text retrieval. Both go into one report, `<out>/report/report.html` (with
metrics.json and summary.md).

The default variant, "instances", draws each digit in a colour, size, corner and background
that its unique caption names (`multimodal.data.instances`) and trains
`configs/clip/digits_instances.yaml`: image->text retrieval then has one right caption per
image. `--variant digits` trains `configs/clip/digits.yaml` on the plain scans, whose captions
name only the digit (instance-level retrieval is then low by construction).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from unittest import mock

import multimodal

CONFIGS = {
    "instances": Path("clip") / "digits_instances.yaml",
    "digits": Path("clip") / "digits.yaml",
}
VARIANT = "instances"  # the default
DATA_DIR = "shards"  # under --out, one folder per variant
SPLITS = ("train", "val", "test")


def config_path(variant: str = VARIANT) -> Path:
    """The variant's config (under configs/) of the repository the package is installed
    from."""
    config = CONFIGS[variant]
    path = Path(multimodal.__file__).resolve().parents[1] / "configs" / config
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo's config {path} is missing: `multimodal demo` runs from a checkout of the "
            "repository (pip install -e .), where configs/ sits next to the multimodal package"
        )
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal demo",
        description=(
            "Write the bundled digits as shards, train a small CLIP on them "
            f"(configs/{CONFIGS[VARIANT].as_posix()}) and write a zero-shot + retrieval report."
        ),
    )
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output (runs/demo)")
    parser.add_argument(
        "--epochs", type=int, default=None, metavar="N", help="training epochs (the config's)"
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, metavar="N", help="data loader workers (2)"
    )
    parser.add_argument(
        "--limit-train-batches",
        type=int,
        default=None,
        metavar="N",
        help="train on N batches an epoch (quick checks)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--variant",
        choices=sorted(CONFIGS),
        default=VARIANT,
        help="instances (default): each digit in a colour, size, corner and background named "
        "by a unique caption; digits: the plain scans, captions that name only the digit",
    )
    parser.epilog = (
        "Any other --model.*, --data.* or --trainer.* argument overrides the config, as in "
        "`multimodal fit` (e.g. --trainer.precision 32)."
    )
    return parser


OVERRIDE_PREFIXES = ("--model.", "--data.", "--trainer.", "--seed_everything")


def write_data(root: Path, progress: bool = True, variant: str = VARIANT) -> Path:
    """The variant's shards and tokenizer in `root` (written unless every split is there)."""
    from multimodal.data import demo as plain
    from multimodal.data import instances
    from multimodal.data.demo import TOKENIZER_DIR, write_demo_shards

    if variant == "instances":
        pattern, splits = f"{instances.PREFIX}-*.tar", instances.SPLITS  # with "probe"
    else:
        pattern, splits = f"{plain.PREFIX}-*.tar", SPLITS
    present = all(any((root / split).glob(pattern)) for split in splits)
    if present and (root / TOKENIZER_DIR).is_dir():
        print(f"demo data: {root} (already written)")
        return root
    write_demo_shards(root, variant=variant, overwrite=True, progress=progress)
    print(f"demo data: written to {root}")
    return root


def demo_precision(overrides: list[str], config: Path) -> list[str]:
    """`--trainer.precision 32-true` (said on stdout) when the config trains in bf16, this CPU
    computes bf16 in software and neither the command line nor MULTIMODAL_PRECISION chose a
    precision: bf16-mixed would make the demo several times slower there. [] otherwise."""
    import torch
    import yaml

    from multimodal.short_runs import precision_from_env
    from multimodal.train.cpu_precision import BF16_FLAGS, cpu_has_native_bf16

    configured = str((yaml.safe_load(config.read_text()).get("trainer") or {}).get("precision"))
    chosen = any(a.startswith("--trainer.precision") for a in overrides)
    if "bf16" not in configured or chosen or precision_from_env() or torch.cuda.is_available():
        return []
    if cpu_has_native_bf16() is not False:
        return []
    print(
        f"demo: this CPU has no native bf16 ({' or '.join(BF16_FLAGS)}): training in 32-true "
        "instead of the config's bf16-mixed (--trainer.precision bf16-mixed to insist)"
    )
    return ["--trainer.precision", "32-true"]


def train(out: Path, data: Path, args: argparse.Namespace, config: Path):
    """The LightningCLI of the demo `config` (paths, epochs and workers overridden) after
    fitting; zero-shot accuracy and retrieval recall on the validation split are logged every
    epoch."""
    from lightning.pytorch.cli import LightningCLI

    from multimodal.eval.callback import ZeroShotRetrievalCallback
    from multimodal.short_runs import short_run_overrides

    overrides = [
        "--config", str(config),
        "--data.init_args.train_urls", str(data / "train"),
        "--data.init_args.val_urls", str(data / "val"),
        "--data.init_args.num_workers", str(args.num_workers),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", str(not args.no_progress).lower(),
    ]  # fmt: skip
    if args.epochs is not None:
        overrides += ["--trainer.max_epochs", str(args.epochs)]
    if args.limit_train_batches is not None:
        overrides += ["--trainer.limit_train_batches", str(args.limit_train_batches)]
    overrides += demo_precision(args.overrides, config)
    overrides += short_run_overrides()  # MULTIMODAL_MAX_STEPS / _PRECISION, for the tests
    overrides += args.overrides
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # `demo ...` is not LightningCLI's
        cli = LightningCLI(run=False, args=overrides, save_config_kwargs={"overwrite": True})
    # the held-out templates ("digits") and retrieval (270 captions) on the validation split
    callback = ZeroShotRetrievalCallback("digits", retrieval=True)
    cli.trainer.callbacks.insert(0, callback)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """`multimodal demo ...`; returns the exit status."""
    from multimodal.eval import class_names as names
    from multimodal.eval.commands import print_report
    from multimodal.eval.evaluate import eval_loader, run_retrieval, run_zeroshot
    from multimodal.eval.loading import LoadedModel
    from multimodal.eval.report import Report, Text, write_report

    parser = _parser()
    args, overrides = parser.parse_known_args(list(argv) if argv is not None else None)
    flags = [a for a in overrides if a.startswith("-")]
    unknown = [a for a in flags if not a.startswith(OVERRIDE_PREFIXES)]
    if unknown or (overrides and not overrides[0].startswith(OVERRIDE_PREFIXES)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides[:1])}")
    args.overrides = overrides
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs={args.epochs} must be >= 1")
    progress = not args.no_progress
    out = Path(args.out)
    config = config_path(args.variant)  # fail before writing anything
    start = time.perf_counter()
    data = write_data(out / DATA_DIR / args.variant, progress, args.variant)
    cli = train(out, data, args, config)
    trained = time.perf_counter() - start

    datamodule, model = cli.datamodule, cli.model.model
    description = f"CLIP of {config.name}, {cli.trainer.current_epoch} epochs"
    loaded = LoadedModel.from_datamodule(model.eval(), datamodule, description)
    loaders = partial(eval_loader, str(data / "test"), loaded, num_workers=args.num_workers)
    zeroshot = run_zeroshot(
        loaded, loaders, names.class_names("digits"), names.templates("digits"), progress=progress
    )
    retrieval = run_retrieval(loaded, loaders, progress=progress)
    n_texts = retrieval.metrics["n_texts"]
    note = (
        "Each test image has one caption naming its digit, colour, size, position and "
        "background, and no two images share a caption: Recall@1 counts only the image's "
        f"own caption, among {n_texts} (chance: {1 / n_texts:.4f})."
        if args.variant == "instances"
        else "The digits' captions name only the digit: about 27 test images share each "
        "caption, and identical captions of other images tie with an image's own (ties count "
        "against the model). Instance-level Recall@K is therefore low at small K even for a "
        "model that matches every caption to the right digit (`--variant instances` gives "
        "every image its own caption)."
    )
    retrieval.sections[0].blocks.insert(0, Text(note))
    checkpoint = getattr(cli.trainer.checkpoint_callback, "last_model_path", "") or getattr(
        cli.trainer.checkpoint_callback, "best_model_path", ""
    )
    report = Report(
        title="multimodal demo: CLIP on the bundled digits"
        + (", coloured and placed at random" if args.variant == "instances" else ""),
        metrics={"zeroshot": zeroshot.metrics, "retrieval": retrieval.metrics},
        sections=zeroshot.sections + retrieval.sections,
        meta={
            "model": loaded.description,
            "config": str(config),
            "checkpoint": checkpoint or "none",
            "data": str(data / "test"),
            "zero-shot templates": "; ".join(str(t) for t in names.templates("digits"))
            + " (held out of training)",
            "training time (s)": round(trained, 1),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    )
    paths = write_report(report, out / "report")
    print_report(report.metrics, paths)
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return 0
