"""`multimodal zeroshot` and `multimodal retrieval`: evaluate a trained checkpoint (or an
open_clip model) on image-text shards and write a report (metrics.json, summary.md,
report.html)."""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import sys
import tarfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from multimodal.checkpoint_check import check_torch_file
from multimodal.eval import class_names as names
from multimodal.eval.evaluate import CAPTIONS, eval_loader, run_retrieval, run_zeroshot
from multimodal.eval.loading import LoadedModel, load_model
from multimodal.eval.report import Report, flatten_metrics, format_value, write_report
from multimodal.eval.zeroshot import PRECISIONS


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a `multimodal fit` checkpoint (.ckpt), or with --open-clip a local state dict",
    )
    group.add_argument(
        "--config",
        metavar="YAML",
        help="the fit config of the checkpoint (default: the config.yaml saved with the run)",
    )
    group.add_argument(
        "--open-clip", metavar="NAME", help="an open_clip architecture (e.g. ViT-B-32)"
    )
    group.add_argument(
        "--pretrained", metavar="TAG", help="open_clip pretrained weights (downloaded)"
    )


def _data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument(
        "--data", required=True, metavar="SHARDS", help="shards: a folder, brace pattern or list"
    )
    parser.add_argument("--out", default=out, metavar="DIR", help=f"report folder ({out})")
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images or texts a batch (256)"
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, metavar="N", help="data loader workers (2)"
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="autocast dtype of the forward passes (fp32: none)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:1, cpu... (cuda when available)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *fields: str) -> None:
    for field in fields:
        if getattr(args, field) < 1:
            flag = "--" + field.replace("_", "-")
            parser.error(f"{flag}={getattr(args, field)} must be >= 1")
    if args.num_workers < 0:
        parser.error(f"--num-workers={args.num_workers} must be >= 0")


def zeroshot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal zeroshot",
        description=(
            "Zero-shot classification of labelled image shards: top-1, top-5 and mean "
            "per-class recall, per-class accuracy, confusion matrix and example images, "
            "written to DIR/metrics.json, summary.md and report.html."
        ),
    )
    _model_arguments(parser)
    _data_arguments(parser, "reports/zeroshot")
    parser.add_argument(
        "--classes",
        required=True,
        metavar="NAME|FILE",
        help=f"class names in label order: {', '.join(names.BUILTINS)} or a .txt/.json file",
    )
    parser.add_argument(
        "--templates",
        metavar="NAME|FILE",
        help=(
            f"prompt templates: {', '.join(names.BUILTIN_TEMPLATES)} or a .txt/.json file "
            "(default: those of --classes when it is a built-in name)"
        ),
    )
    parser.add_argument(
        "--examples", type=int, default=16, metavar="N", help="example images in the report (16)"
    )
    return parser


def retrieval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal retrieval",
        description=(
            "Image -> text and text -> image retrieval among every image and caption of the "
            "shards: Recall@K, mean and median rank, Recall@K curves and example queries, "
            "written to DIR/metrics.json, summary.md and report.html."
        ),
    )
    _model_arguments(parser)
    _data_arguments(parser, "reports/retrieval")
    parser.add_argument(
        "--captions",
        choices=list(CAPTIONS),
        default="all",
        help="all: every caption of an image (txt and json captions); txt: its main one",
    )
    parser.add_argument(
        "--max-memory-mib",
        type=int,
        default=512,
        metavar="MIB",
        help="memory for one block of the similarity matrix (512)",
    )
    parser.add_argument(
        "--examples", type=int, default=4, metavar="N", help="example queries a direction (4)"
    )
    return parser


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LoadedModel:
    if args.open_clip is None and args.checkpoint is None:
        parser.error("pass --checkpoint RUN.ckpt (with --config) or --open-clip NAME")
    if args.open_clip is None:  # a text file or random bytes: say so before torch reads it
        check_torch_file(args.checkpoint)
    return load_model(
        args.checkpoint,
        config=args.config,
        open_clip=args.open_clip,
        pretrained=args.pretrained,
        device=args.device,
    )


def _meta(args: argparse.Namespace, loaded: LoadedModel, **extra: Any) -> dict[str, Any]:
    return {
        "model": loaded.description,
        "data": args.data,
        **extra,
        "precision": args.precision,
        "device": args.device,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def print_report(metrics: dict[str, Any], paths: dict[str, Path]) -> None:
    """The flattened metrics, one a line, and where the report was written."""
    for name, value in flatten_metrics(metrics):
        print(f"{name:<40} {format_value(value)}")
    print(f"report: {paths['html']}")


EXIT_BAD_INPUT = 2  # as argparse and `multimodal fit` for errors in the user's input


def _fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _check_class_list(name: str) -> None:
    """ValueError for a --classes that is neither a built-in list nor a .txt/.json file,
    naming the nearest built-in."""
    if name in names.BUILTINS or Path(name).suffix in (".txt", ".json"):
        return
    close = difflib.get_close_matches(name, names.BUILTINS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown class list --classes {name!r}{hint} (built-in: {', '.join(names.BUILTINS)}, "
        "or a .txt / .json file)"
    )


SHARD_CLASS_SAMPLES = 512  # samples of the first shard whose class names are checked


def shard_class_names(urls: str, limit: int = SHARD_CLASS_SAMPLES) -> dict[int, str]:
    """label -> class name of the samples whose json carries both (`label`, `class_name`),
    read from the first local shard (at most `limit` samples); {} for remote shards."""
    from multimodal.data.pipeline import expand_urls

    shards = expand_urls(urls)
    if not shards or "://" in shards[0] or shards[0].startswith("pipe:"):
        return {}
    found: dict[int, str] = {}
    with tarfile.open(shards[0]) as tar:
        for seen, member in enumerate(m for m in tar if m.name.endswith(".json")):
            if seen >= limit:
                break
            file = tar.extractfile(member)
            try:
                meta = json.loads(file.read()) if file is not None else None
            except ValueError:
                continue  # the reader skips and counts broken samples
            if not isinstance(meta, dict):
                continue
            label, name = meta.get("label"), meta.get("class_name")
            if isinstance(label, int) and isinstance(name, str):
                found.setdefault(label, name)
    return found


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def check_classes_match_shards(classes: Sequence[str], given: str, urls: str) -> None:
    """ValueError when the shards name their classes and the class list disagrees: a label
    beyond the list, or another name at a label (e.g. --classes cifar10 on the digits)."""
    for label, name in sorted(shard_class_names(urls).items()):
        if label >= len(classes):
            raise ValueError(
                f"--classes {given} has {len(classes)} classes but the shards {urls} have "
                f"label {label} ({name!r})"
            )
        if _normalise(classes[label]) != _normalise(name):
            raise ValueError(
                f"--classes {given} does not match the shards {urls}: label {label} is "
                f"{classes[label]!r} in the list but {name!r} in the shards"
            )


def zeroshot_main(argv: Sequence[str]) -> int:
    """`multimodal zeroshot ...`; returns the exit status."""
    parser = zeroshot_parser()
    args = parser.parse_args(list(argv))
    _positive(parser, args, "batch_size")
    try:
        _check_class_list(args.classes)
        if args.templates is None and not (
            args.classes in names.BUILTIN_TEMPLATES or args.classes.endswith(".json")
        ):
            parser.error(f"--classes {args.classes} has no templates of its own: pass --templates")
        templates_name = args.templates or args.classes
        classes = names.class_names(args.classes)
        templates = names.templates(templates_name)
        check_classes_match_shards(classes, args.classes, args.data)
        loaded = _load(parser, args)
        loaders = partial(
            eval_loader, args.data, loaded, batch_size=args.batch_size, num_workers=args.num_workers
        )
        run = run_zeroshot(
            loaded, loaders, classes, templates,
            precision=args.precision, text_batch_size=args.batch_size,
            n_examples=args.examples, progress=not args.no_progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        return _fail(parser.prog, error)
    report = Report(
        title="Zero-shot classification",
        metrics={"zeroshot": run.metrics},
        sections=run.sections,
        meta=_meta(args, loaded, classes=args.classes, templates=templates_name),
    )
    print_report(report.metrics, write_report(report, args.out))
    return 0


def retrieval_main(argv: Sequence[str]) -> int:
    """`multimodal retrieval ...`; returns the exit status."""
    parser = retrieval_parser()
    args = parser.parse_args(list(argv))
    _positive(parser, args, "batch_size", "max_memory_mib")
    try:
        loaded = _load(parser, args)
        loaders = partial(
            eval_loader, args.data, loaded, batch_size=args.batch_size, num_workers=args.num_workers
        )
        run = run_retrieval(
            loaded, loaders,
            captions=args.captions, precision=args.precision, batch_size=args.batch_size,
            max_memory_bytes=args.max_memory_mib * 2**20, n_examples=args.examples,
            progress=not args.no_progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        return _fail(parser.prog, error)
    report = Report(
        title="Image-text retrieval",
        metrics={"retrieval": run.metrics},
        sections=run.sections,
        meta=_meta(args, loaded, captions=args.captions),
    )
    print_report(report.metrics, write_report(report, args.out))
    return 0
