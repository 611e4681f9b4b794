"""`multimodal shards`: write webdataset shards from the demo digits, an image folder with a
captions file, or a torchvision classification dataset already on disk."""

from __future__ import annotations

import argparse
import itertools
import re
from collections.abc import Mapping

from multimodal.data.instances import PROBE_RENDERS, TRAIN_RENDERS
from multimodal.data.shards import (
    CLASSIFICATION_TEMPLATES,
    WriteSummary,
    format_summaries,
    samples_from_classification,
    samples_from_image_folder,
    write_shards,
)

DEMO_VARIANTS = ("digits", "instances")  # multimodal.data.demo.VARIANTS, without its imports
# torchvision datasets with a `train=` flag and `.classes`
TORCHVISION_DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from `1073741824`, `512M`, `1G` or `64k` (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1073741824, 512M or 1G")
    return int(match[1]) * _UNITS[match[2].lower()]


def _limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-samples", type=int, default=10000, metavar="N", help="most samples per shard (10000)"
    )
    parser.add_argument(
        "--max-bytes",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="most bytes per shard: 1G, 512M (1G)",
    )


def _common(parser: argparse.ArgumentParser, prefix: str | None) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="root folder of the shards")
    if prefix is not None:
        parser.add_argument("--prefix", default=prefix, help=f"shard name prefix ({prefix})")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fractions(parser: argparse.ArgumentParser, val: float, test: float) -> None:
    for split, default in (("val", val), ("test", test)):
        parser.add_argument(
            f"--{split}-fraction",
            type=float,
            default=default,
            metavar="F",
            help=f"share of the inputs for {split}, by a seeded split of their index ({default})",
        )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (0)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal shards",
        description=(
            "Write webdataset shards (tar: jpg/png + txt + json + cls) in DIR/train, DIR/val and "
            "DIR/test, atomically, with a summary of what was written and skipped."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the bundled digits with captions, held-out prompts and VQA pairs",
        description=(
            "Write the 1,797 bundled digits (train/val/test 70/15/15) as PNG shards. "
            "--variant instances draws each digit in a colour, size, position and background "
            "that its caption names (unique captions: instance-level retrieval), and its "
            f"training scans {TRAIN_RENDERS} times each; its probe/ split draws the "
            f"validation scans {PROBE_RENDERS} times afresh (data for linear probes)."
        ),
    )
    _common(demo, prefix=None)
    demo.add_argument(
        "--variant",
        choices=DEMO_VARIANTS,
        default=DEMO_VARIANTS[0],
        help="digits: dark on white, captions name the digit; instances: coloured, placed and "
        "sized at random, captions name all of it (digits)",
    )
    demo.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="image side (digits: 32, instances: 32)",
    )
    demo.add_argument(
        "--samples-per-shard", type=int, default=256, metavar="N", help="samples per shard (256)"
    )
    demo.add_argument("--seed", type=int, default=0, help="split and caption choice (0)")

    folder = commands.add_parser(
        "folder",
        help="image files and a CSV (image,caption) or JSONL captions file",
        description=(
            "Write image files with their captions. CSV: columns image,caption, one row per "
            'caption. JSONL: {"image": PATH, "caption": TEXT} or "captions": [...]. Paths are '
            "relative to --images. Missing, unreadable and uncaptioned images are skipped and "
            "listed."
        ),
    )
    folder.add_argument("--images", required=True, metavar="DIR", help="folder of the images")
    folder.add_argument("--captions", required=True, metavar="FILE", help=".csv or .jsonl file")
    _common(folder, prefix="images")
    _limits(folder)
    _fractions(folder, val=0.0, test=0.0)  # no fractions: everything in DIR/train

    torchvision = commands.add_parser(
        "torchvision",
        help="a torchvision classification dataset already downloaded (CIFAR10, MNIST, ...)",
        description=(
            "Write a torchvision dataset from --root (nothing is downloaded): its train set to "
            "DIR/train and DIR/val (--val-fraction), its test set to DIR/test. Captions come "
            "from prompt templates with the class names."
        ),
    )
    torchvision.add_argument(
        "--dataset",
        required=True,
        choices=TORCHVISION_DATASETS,
        metavar="NAME",
        help=f"one of {', '.join(TORCHVISION_DATASETS)}",
    )
    torchvision.add_argument("--root", required=True, metavar="DIR", help="the dataset's root")
    torchvision.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help="caption template with {} for the class name, repeatable "
        f"(default: {' | '.join(CLASSIFICATION_TEMPLATES)})",
    )
    _common(torchvision, prefix=None)
    _limits(torchvision)
    torchvision.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F", help="of the train set (0.1)"
    )
    torchvision.add_argument("--seed", type=int, default=0, help="seed of the split (0)")

    unpack = commands.add_parser(
        "unpack",
        help="shards -> a class-per-folder image tree (ImageFolder layout)",
        description=(
            "Write each labelled image of the shards to OUT/<class>/<key>.<ext>, unchanged; "
            "the class is the json's class_name (spaces as _) or its label / cls number. "
            "Samples without an image or a class are skipped and counted."
        ),
    )
    unpack.add_argument("shards", metavar="SHARDS", help="a shard folder, brace pattern or glob")
    unpack.add_argument("--out", required=True, metavar="DIR", help="the tree's root (new)")
    unpack.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def class_name_of(name: str) -> str:
    """A torchvision class name as caption text: `0 - zero` -> `zero`, `maple_tree` ->
    `maple tree`."""
    return re.sub(r"^\d+\s*-\s*", "", name).replace("_", " ").strip()


def _torchvision_samples(args: argparse.Namespace):
    import torchvision.datasets

    cls = getattr(torchvision.datasets, args.dataset)
    try:
        train = cls(args.root, train=True, download=False)
        test = cls(args.root, train=False, download=False)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"--dataset {args.dataset} was not found under --root {args.root} ({error}). This "
            f"command downloads nothing: fetch it first, e.g. in Python "
            f"torchvision.datasets.{args.dataset}({args.root!r}, download=True)"
        ) from None
    names = [class_name_of(c) for c in train.classes]
    templates = args.template or CLASSIFICATION_TEMPLATES
    key = args.dataset.lower()
    return len(train) + len(test), itertools.chain(
        samples_from_classification(
            train,
            names,
            templates,
            key_prefix=f"{key}-train",
            val_fraction=args.val_fraction,
            seed=args.seed,
            split=None if args.val_fraction else "train",
        ),
        samples_from_classification(test, names, templates, key_prefix=f"{key}-test", split="test"),
    )


def _run(args: argparse.Namespace) -> Mapping[str, WriteSummary]:
    progress = not args.no_progress
    if args.command == "demo":
        from multimodal.data.demo import write_demo_shards

        return write_demo_shards(
            args.out,
            variant=args.variant,
            image_size=args.image_size,
            samples_per_shard=args.samples_per_shard,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=progress,
        )
    if args.command == "folder":
        samples = samples_from_image_folder(
            args.images,
            args.captions,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            split=None if args.val_fraction or args.test_fraction else "train",
        )
        total = None
        prefix = args.prefix
    else:
        total, samples = _torchvision_samples(args)
        prefix = args.dataset.lower()
    return write_shards(
        samples,
        args.out,
        prefix=prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        overwrite=args.overwrite,
        progress=progress,
        total=total,
    )


def _unpack(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from multimodal.data.unpack import unpack_shards

    try:
        summary = unpack_shards(args.shards, args.out, progress=not args.no_progress)
    except (ValueError, FileExistsError, OSError) as error:
        parser.error(str(error))
    print("\n".join(summary.lines(args.out)))
    return 0 if summary.images else 1


def main(argv: list[str]) -> int:
    """Parse `argv` (the arguments after `shards`), write, print the summary.

    Returns 0, or 1 when no sample could be written; bad arguments exit with status 2.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "unpack":
        return _unpack(parser, args)
    try:
        summaries = _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        parser.error(str(error))
    print(format_summaries(summaries))
    if not any(s.samples for s in summaries.values()):
        print("multimodal shards: no sample was written")
        return 1
    return 0
