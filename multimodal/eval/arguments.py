"""Command-line arguments that the evaluation, benchmark, attention and export commands share:
the checkpoint to load and how to run over data (batch size, loader workers, autocast,
device, progress bars), spelt one way everywhere."""

from __future__ import annotations

import argparse

import torch

from multimodal.eval.zeroshot import PRECISIONS

CONFIG_HELP = "the fit config of the checkpoint (default: the config.yaml saved with the run)"


def checkpoint_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    required: bool = True,
    help: str = "a `multimodal fit` checkpoint",  # noqa: A002 (argparse's own word)
) -> None:
    """`--checkpoint FILE` and `--config YAML`."""
    parser.add_argument("--checkpoint", required=required, metavar="FILE", help=help)
    parser.add_argument("--config", metavar="YAML", help=CONFIG_HELP)


def device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device`: cuda when available, else cpu."""
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:1, cpu... (cuda when available)",
    )


def run_arguments(
    parser: argparse.ArgumentParser, *, batch_size: int, items: str = "images or texts"
) -> None:
    """`--batch-size`, `--num-workers`, `--precision`, `--device` and `--no-progress`."""
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        metavar="N",
        help=f"{items} a batch ({batch_size})",
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
    device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
