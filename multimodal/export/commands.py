"""`multimodal export` and `multimodal quantize`: a `multimodal fit` checkpoint, loaded as the
evaluation commands load it (`multimodal.eval.loading.load_model`), exported to ONNX / .pt2 or
quantized to int8, with the check that the result matches (max abs diff, zero-shot top-1)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from multimodal.checkpoint_check import check_torch_file
from multimodal.eval import class_names as names
from multimodal.eval.arguments import checkpoint_arguments
from multimodal.eval.loading import LoadedModel, load_model
from multimodal.export.export import FORMATS, export_towers
from multimodal.export.quantize import (
    METHOD,
    load_quantized,
    quantize_int8,
    save_quantized,
    size_bytes,
)
from multimodal.tasks.loading import RUN_CONFIG, find_run_config, read_config_file

EXIT_BAD_INPUT = 2  # as argparse and the evaluation commands
EXIT_MISMATCH = 1  # the exported file does not match the eager model
TOLERANCE = 1e-4  # fp32 export vs eager, max abs diff of unit-norm embeddings
INT8_MIN_COSINE = 0.99  # an --int8 file vs eager, per embedding
TOWER_CHOICES = {
    "image": ("image",),
    "text": ("text",),
    "both": ("image", "text"),
    "joint": ("joint",),
}


def _fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load(args: argparse.Namespace) -> LoadedModel:
    check_torch_file(args.checkpoint)  # a text file or random bytes: say so before torch reads it
    return load_model(args.checkpoint, config=args.config, device="cpu")


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal export",
        description=(
            "Export the image and/or text embedding of a trained CLIP with a dynamic batch "
            "dimension: torch.export (.pt2) or ONNX (needs `pip install 'multimodal[export]'`). "
            "Writes DIR/<tower>.<format> and DIR/manifest.json (inputs, normalisation, context "
            "length, tokenizer) and checks each file against the eager model."
        ),
    )
    checkpoint_arguments(parser)
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="pt2 or onnx")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--tower",
        choices=list(TOWER_CHOICES),
        default="both",
        help="image, text, both (one file each; default) or joint (one file, both embeddings)",
    )
    parser.add_argument(
        "--check-batch", type=int, default=3, metavar="N", help="batch of the check (3)"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help=(
            "with --format onnx: also write <tower>.int8.onnx, quantized by ONNX Runtime's "
            "dynamic int8 quantization for CPU serving, checked by its cosine to eager"
        ),
    )
    return parser


def export_main(argv: Sequence[str]) -> int:
    """`multimodal export ...`; returns the exit status (1 when a file differs from eager by
    more than 1e-4, or an --int8 file's cosine to eager is below 0.99)."""
    parser = export_parser()
    args = parser.parse_args(list(argv))
    if args.check_batch < 1:
        parser.error(f"--check-batch={args.check_batch} must be >= 1")
    if args.int8 and args.format != "onnx":
        parser.error("--int8 needs --format onnx (ONNX Runtime's int8 quantization)")
    try:
        loaded = _load(args)
        manifest = export_towers(
            loaded,
            args.out,
            format=args.format,
            towers=TOWER_CHOICES[args.tower],
            check_batch=args.check_batch,
            int8=args.int8,
        )
    except (ValueError, FileNotFoundError, ImportError) as error:
        return _fail(parser.prog, error)
    status = 0
    for file in manifest.files:
        if file.quantized is None:
            ok = file.max_abs_diff <= TOLERANCE
            verdict = "ok" if ok else f"MISMATCH (> {TOLERANCE:g})"
            check = f"max abs diff vs eager {file.max_abs_diff:.3g}"
        else:
            ok = file.min_cosine >= INT8_MIN_COSINE
            verdict = "ok" if ok else f"MISMATCH (< {INT8_MIN_COSINE:g})"
            check = f"min cosine to eager {file.min_cosine:.5f}"
        status = status if ok else EXIT_MISMATCH
        print(
            f"{file.tower:<6} {Path(args.out) / file.file}  {check} at batch "
            f"{file.check_batch}: {verdict}"
        )
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return status


def quantize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal quantize",
        description=(
            "Post-training int8 quantization of a trained CLIP for CPU inference (dynamic int8 "
            "Linear layers, torch.ao). Writes FILE (loadable weights-only); with --data and "
            "--classes also a zero-shot report of the model before and after (REPORT/"
            "metrics.json, summary.md, report.html)."
        ),
    )
    checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="the int8 model file")
    group = parser.add_argument_group("zero-shot check (optional)")
    group.add_argument("--data", metavar="SHARDS", help="labelled shards to evaluate on")
    group.add_argument(
        "--classes",
        metavar="NAME|FILE",
        help=f"class names in label order: {', '.join(names.BUILTINS)} or a .txt/.json file",
    )
    group.add_argument(
        "--templates",
        metavar="NAME|FILE",
        help="prompt templates (default: those of --classes when it is a built-in name)",
    )
    group.add_argument(
        "--report", metavar="DIR", help="report folder (default: FILE without suffix + _report)"
    )
    group.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images or texts a batch (256)"
    )
    group.add_argument(
        "--num-workers", type=int, default=2, metavar="N", help="data loader workers (2)"
    )
    group.add_argument("--examples", type=int, default=0, metavar="N", help="example images (0)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_config(checkpoint: str | os.PathLike, config: str | os.PathLike | None) -> dict[str, Any]:
    """The fit config (model and data sections) that `load_model` rebuilds `checkpoint` from:
    `config`, else the config.yaml saved with the run."""
    if config is None:
        config = find_run_config(checkpoint)
        if config is None:
            raise FileNotFoundError(
                f"no config for checkpoint {str(checkpoint)!r}: pass --config (the fit config); "
                f"looked for {RUN_CONFIG} in the run folder {Path(checkpoint).parent.parent}"
            )
    return read_config_file(config, "model", "data")


def _zeroshot_report(
    args: argparse.Namespace, before: LoadedModel, after: LoadedModel, sizes: tuple[int, int]
) -> int:
    """Zero-shot top-1 of both models on --data, in one report; prints the metrics."""
    from multimodal.eval.commands import check_classes_match_shards, print_report
    from multimodal.eval.evaluate import eval_loader, run_zeroshot
    from multimodal.eval.report import Report, Section, write_report

    templates_name = args.templates or args.classes
    classes = names.class_names(args.classes)
    templates = names.templates(templates_name)
    check_classes_match_shards(classes, args.classes, args.data)
    runs = {}
    for name, loaded in (("fp32", before), ("int8", after)):
        loaders = partial(
            eval_loader, args.data, loaded, batch_size=args.batch_size, num_workers=args.num_workers
        )
        runs[name] = run_zeroshot(
            loaded, loaders, classes, templates,
            text_batch_size=args.batch_size, n_examples=args.examples,
            progress=not args.no_progress,
        )  # fmt: skip
    top1 = {name: run.metrics["top1"] for name, run in runs.items()}
    metrics = {
        "fp32": runs["fp32"].metrics,
        "int8": runs["int8"].metrics,
        "top1_change_points": 100 * (top1["int8"] - top1["fp32"]),
        "size_mib": {"fp32": sizes[0] / 2**20, "int8": sizes[1] / 2**20},
    }
    sections = [
        Section(f"int8: {section.title}", section.blocks) for section in runs["int8"].sections
    ]
    report = Report(
        title="Int8 quantization: zero-shot classification before and after",
        metrics=metrics,
        sections=sections,
        meta={
            "model": before.description,
            "int8 file": args.out,
            "method": METHOD,
            "data": args.data,
            "classes": args.classes,
            "templates": templates_name,
            "device": "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    )
    out = args.report or str(Path(args.out).with_suffix("")) + "_report"
    print_report(report.metrics, write_report(report, out))
    return 0


def quantize_main(argv: Sequence[str]) -> int:
    """`multimodal quantize ...`; returns the exit status."""
    parser = quantize_parser()
    args = parser.parse_args(list(argv))
    if (args.data is None) != (args.classes is None):
        parser.error("the zero-shot check needs both --data and --classes")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    own_templates = args.classes in names.BUILTIN_TEMPLATES or str(args.classes).endswith(".json")
    if args.classes is not None and args.templates is None and not own_templates:
        parser.error(f"--classes {args.classes} has no templates of its own: pass --templates")
    try:
        config = run_config(args.checkpoint, args.config)
        loaded = _load(args)
        int8 = quantize_int8(loaded.model)
        path = save_quantized(int8, config, args.out, source=loaded.description)
        sizes = (size_bytes(loaded.model), size_bytes(int8))
        print(
            f"int8 model: {path} ({sizes[0] / 2**20:.1f} MiB of fp32 weights -> "
            f"{sizes[1] / 2**20:.1f} MiB)"
        )
        if args.data is None:
            return 0
        return _zeroshot_report(args, loaded, load_quantized(path), sizes)
    except (ValueError, FileNotFoundError) as error:
        return _fail(parser.prog, error)
