"""`multimodal zeroshot` and `multimodal retrieval`: evaluate a trained checkpoint (or an
open_clip model) on image-text data and write a report (metrics.json, summary.md,
report.html). `--data` takes shards or a data spec (`imagefolder:DIR`,
`torchvision:CIFAR10:ROOT`, `csv:FILE`, `jsonl:FILE`; `multimodal.eval.datasets`); zero-shot
takes its class names from the data when it names them, and `--linear-probe TRAIN_DATA` /
`--knn K` report a linear probe and k-NN on the frozen image features next to zero-shot."""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import re
import sys
import tarfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from multimodal.checkpoint_check import check_torch_file
from multimodal.eval import class_names as names
from multimodal.eval.arguments import checkpoint_arguments, run_arguments
from multimodal.eval.datasets import EXPECTED_SPEC, ImageSamples, open_samples, parse_spec
from multimodal.eval.evaluate import CAPTIONS, eval_loader, run_probes, run_retrieval, run_zeroshot
from multimodal.eval.generation_eval import file_sha256, package_versions
from multimodal.eval.loading import LoadedModel, load_model
from multimodal.eval.metric_notes import explain
from multimodal.eval.report import Report, flatten_metrics, format_value, write_report


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    checkpoint_arguments(
        group,
        required=False,
        help="a `multimodal fit` checkpoint (.ckpt), or with --open-clip a local state dict",
    )
    group.add_argument(
        "--open-clip", metavar="NAME", help="an open_clip architecture (e.g. ViT-B-32)"
    )
    group.add_argument(
        "--pretrained", metavar="TAG", help="open_clip pretrained weights (downloaded)"
    )


def _data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help=f"shards (a folder, brace pattern or list) or a data spec: {EXPECTED_SPEC}",
    )
    parser.add_argument("--out", default=out, metavar="DIR", help=f"report folder ({out})")
    run_arguments(parser, batch_size=256)


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
        metavar="NAME|FILE",
        help=(
            f"class names in label order: {', '.join(names.BUILTINS)} or a .txt/.json file "
            "(default: the names the data gives: folder names, class_name, torchvision classes)"
        ),
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
    parser.add_argument(
        "--attention",
        action="store_true",
        help="add the attention rollout of the example images (models with a vision.ViT tower)",
    )
    probes = parser.add_argument_group("linear probe and k-NN (optional)")
    probes.add_argument(
        "--linear-probe",
        metavar="TRAIN_DATA",
        help=(
            "labelled training data (shards or a data spec): report a linear probe on the frozen "
            "image features (logistic regression, L2 strength chosen on a validation split)"
        ),
    )
    probes.add_argument(
        "--knn",
        type=int,
        metavar="K",
        help="also report K-nearest-neighbour top-1 (cosine) with the --linear-probe data",
    )
    probes.add_argument(
        "--knn-shots",
        type=int,
        metavar="N",
        help="k-NN with N random training images a class (few-shot; default: all)",
    )
    probes.add_argument(
        "--probe-seed",
        type=int,
        default=0,
        metavar="SEED",
        help="seed of the validation split (or folds) and the few-shot draw (0)",
    )
    probes.add_argument(
        "--probe-folds",
        type=int,
        metavar="K",
        help=(
            "choose the probe's L2 strength by stratified K-fold cross-validation instead of "
            "one 20%% validation split (for a few hundred training images, where one split "
            "is too noisy to choose it)"
        ),
    )
    probes.add_argument(
        "--probe-repeats",
        type=int,
        default=1,
        metavar="R",
        help="repeat the --probe-folds cross-validation R times, reshuffled (1)",
    )
    probes.add_argument(
        "--probe-group-pattern",
        metavar="REGEX",
        help=(
            "training images whose sample keys are equal once the first match of REGEX is "
            "removed are one group, never split between the probe's fit and validation parts "
            r"(e.g. --probe-group-pattern='-r\d+$' for the demo's renderings of one scan: "
            "near-copies in validation would make every L2 strength look as if it generalised)"
        ),
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
    parser.add_argument(
        "--rerank-itm",
        type=int,
        metavar="K",
        help=(
            "also re-order each query's top K by the model's image-text matching head (a "
            "checkpoint trained with ContrastivePretraining(itm_head=...)); the recall before "
            "and after is reported (retrieval/... and retrieval_itm/...)"
        ),
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
    """The report's meta data (shown at its top and kept in metrics.json under "meta"): the
    model, its checkpoint's SHA-256, the data, `extra` (classes, templates...), precision,
    device, date and package versions."""
    weights = {}
    if args.checkpoint is not None and Path(args.checkpoint).exists():
        weights["checkpoint_sha256"] = file_sha256(args.checkpoint)
    elif args.pretrained is not None:
        weights["pretrained"] = args.pretrained
    return {
        "model": loaded.description,
        **weights,
        "data": args.data,
        **extra,
        "precision": args.precision,
        "device": args.device,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": package_versions(),
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


Data = str | ImageSamples  # shards (their URLs) or opened samples


def open_data(text: str) -> Data:
    """The shard URLs of a shards spec, else the samples of the spec, opened once (listing
    files, reading a CSV) so that every pass of an evaluation reuses them."""
    spec = parse_spec(text)
    return spec.path if spec.kind == "shards" else open_samples(spec)


def data_class_map(data: Data) -> dict[int, str]:
    """label -> class name for the labels the data names (shards: their first shard)."""
    return shard_class_names(data) if isinstance(data, str) else data.class_map


def check_class_names(classes: Sequence[str], what: str, data: Data) -> None:
    """ValueError when the data names its classes and `classes` (described by `what`)
    disagrees: a label beyond the list, or another name at a label."""
    if isinstance(data, str):
        where, short, have = f"the shards {data}", "the shards", "have"
    else:
        where, short, have = f"the data {data.spec}", "the data", "has"
    for label, name in sorted(data_class_map(data).items()):
        if label >= len(classes):
            raise ValueError(
                f"{what} has {len(classes)} classes but {where} {have} label {label} ({name!r})"
            )
        if _normalise(classes[label]) != _normalise(name):
            raise ValueError(
                f"{what} does not match {where}: label {label} is {classes[label]!r} in the "
                f"list but {name!r} in {short}"
            )


def check_classes_match_shards(classes: Sequence[str], given: str, urls: str | Data) -> None:
    """ValueError when the data (shards, a data spec or opened samples) names its classes and
    the class list disagrees: a label beyond the list, or another name at a label (e.g.
    --classes cifar10 on the digits)."""
    data = urls if isinstance(urls, ImageSamples) else open_data(urls)
    check_class_names(classes, f"--classes {given}", data)


def data_classes(data: Data, given: str) -> tuple[str, ...]:
    """Every class name of the data in label order; ValueError when it names only some (or
    none) of its labels."""
    found = data_class_map(data)
    if not found or sorted(found) != list(range(len(found))):
        named = f"names labels {sorted(found)[:10]}" if found else "names no classes"
        raise ValueError(f"--data {given} {named}: pass --classes (a name list in label order)")
    return tuple(found[i] for i in range(len(found)))


def matching_templates(classes: Sequence[str]) -> str | None:
    """The built-in class list holding the same names (any order), whose templates fit them;
    None if there is none."""
    wanted = sorted(_normalise(c) for c in classes)
    for name in names.BUILTIN_TEMPLATES:
        if name not in names.BUILTINS or (name == "imagenet" and len(classes) != 1000):
            continue  # open_clip's ImageNet list is only read when the count fits
        if sorted(_normalise(c) for c in names.class_names(name)) == wanted:
            return name
    return None


def _resolve_classes(
    parser: argparse.ArgumentParser, args: argparse.Namespace, data: Data
) -> tuple[tuple[str, ...], str, str]:
    """(class names, what they are for the report, templates name or file): --classes,
    checked against the data, or the data's own names with templates of the built-in list
    holding the same names unless --templates is given."""
    if args.classes is not None:
        _check_class_list(args.classes)
        if args.templates is None and not (
            args.classes in names.BUILTIN_TEMPLATES or args.classes.endswith(".json")
        ):
            parser.error(f"--classes {args.classes} has no templates of its own: pass --templates")
        classes = names.class_names(args.classes)
        check_classes_match_shards(classes, args.classes, data)
        return classes, args.classes, args.templates or args.classes
    classes = data_classes(data, args.data)
    templates_name = args.templates or matching_templates(classes)
    if templates_name is None:
        parser.error(
            f"the class names of --data {args.data} ({', '.join(classes[:3])}, ...) are no "
            "built-in list's: pass --templates"
        )
    return classes, f"from the data ({len(classes)} classes)", templates_name


def _check_probe_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.knn is not None and args.linear_probe is None:
        parser.error("--knn needs labelled training images: pass --linear-probe TRAIN_DATA")
    if args.knn_shots is not None and args.knn is None:
        parser.error("--knn-shots needs --knn K")
    if args.probe_folds is not None and args.linear_probe is None:
        parser.error("--probe-folds needs labelled training images: pass --linear-probe TRAIN_DATA")
    if args.probe_group_pattern is not None:
        if args.linear_probe is None:
            parser.error("--probe-group-pattern needs --linear-probe TRAIN_DATA")
        try:
            re.compile(args.probe_group_pattern)
        except re.error as error:
            parser.error(f"--probe-group-pattern {args.probe_group_pattern!r}: {error}")
    if args.probe_repeats != 1 and args.probe_folds is None:
        parser.error("--probe-repeats needs --probe-folds K")
    if args.probe_folds is not None and args.probe_folds < 2:
        parser.error(f"--probe-folds={args.probe_folds} must be >= 2")
    for flag, value in (
        ("--knn", args.knn),
        ("--knn-shots", args.knn_shots),
        ("--probe-repeats", args.probe_repeats),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag}={value} must be >= 1")


def zeroshot_main(argv: Sequence[str]) -> int:
    """`multimodal zeroshot ...`; returns the exit status."""
    parser = zeroshot_parser()
    args = parser.parse_args(list(argv))
    _positive(parser, args, "batch_size")
    _check_probe_arguments(parser, args)
    try:
        data = open_data(args.data)
        classes, classes_name, templates_name = _resolve_classes(parser, args, data)
        templates = names.templates(templates_name)
        train = None
        if args.linear_probe is not None:
            train = open_data(args.linear_probe)
            check_class_names(classes, f"the classes ({classes_name})", train)
        loaded = _load(parser, args)
        loaders = partial(
            eval_loader, data, loaded, batch_size=args.batch_size, num_workers=args.num_workers
        )
        run = run_zeroshot(
            loaded, loaders, classes, templates,
            precision=args.precision, text_batch_size=args.batch_size,
            n_examples=args.examples, progress=not args.no_progress,
            attention=args.attention,
        )  # fmt: skip
        metrics: dict[str, Any] = {"zeroshot": run.metrics}
        sections = list(run.sections)
        if train is not None:
            probes = run_probes(
                loaded,
                partial(
                    eval_loader, train, loaded, batch_size=args.batch_size,
                    num_workers=args.num_workers,
                ),
                loaders,
                len(classes),
                zeroshot_top1=run.metrics["top1"], zeroshot_classifier=run.result.classifier,
                knn_k=args.knn, knn_shots=args.knn_shots, seed=args.probe_seed,
                folds=args.probe_folds, repeats=args.probe_repeats,
                group_pattern=args.probe_group_pattern,
                precision=args.precision, progress=not args.no_progress,
            )  # fmt: skip
            metrics.update(probes.metrics)
            sections.insert(0, probes.section)
    except (ValueError, FileNotFoundError) as error:
        return _fail(parser.prog, error)
    probe_meta = {} if train is None else {"linear probe data": args.linear_probe}
    report = Report(
        title="Zero-shot classification",
        metrics=metrics,
        sections=sections,
        meta=_meta(args, loaded, classes=classes_name, templates=templates_name, **probe_meta),
        explanations=explain(metrics),
    )
    print_report(report.metrics, write_report(report, args.out, meta_in_json=True))
    return 0


def retrieval_main(argv: Sequence[str]) -> int:
    """`multimodal retrieval ...`; returns the exit status."""
    parser = retrieval_parser()
    args = parser.parse_args(list(argv))
    _positive(parser, args, "batch_size", "max_memory_mib")
    if args.rerank_itm is not None and args.rerank_itm < 1:
        parser.error(f"--rerank-itm={args.rerank_itm} must be >= 1")
    try:
        data = open_data(args.data)
        loaded = _load(parser, args)
        loaders = partial(
            eval_loader, data, loaded, batch_size=args.batch_size, num_workers=args.num_workers
        )
        run = run_retrieval(
            loaded, loaders,
            captions=args.captions, precision=args.precision, batch_size=args.batch_size,
            max_memory_bytes=args.max_memory_mib * 2**20, n_examples=args.examples,
            progress=not args.no_progress, rerank_itm=args.rerank_itm,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        return _fail(parser.prog, error)
    metrics: dict[str, Any] = {"retrieval": run.metrics}
    if run.itm_metrics is not None:
        metrics["retrieval_itm"] = run.itm_metrics
    caveats = {f"retrieval/{name}": text for name, text in run.caveats.items()}
    report = Report(
        title="Image-text retrieval",
        metrics=metrics,
        sections=run.sections,
        meta=_meta(args, loaded, captions=args.captions),
        explanations=explain(metrics, caveats),
    )
    print_report(report.metrics, write_report(report, args.out, meta_in_json=True))
    return 0
