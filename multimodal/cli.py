"""The `multimodal` command.

`fit`, `validate`, `test` and `predict` are LightningCLI's: a model is any LightningModule
(`--model path.to.Task` or `class_path` in a YAML config), data any LightningDataModule, and
every Trainer flag is available (`--trainer.precision bf16-mixed`, `--trainer.devices 2`).
The platform's own commands (`demo`, `tokenizer`, `shards`, `zeroshot`, `retrieval`) are
dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable
from typing import NamedTuple

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI


class HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the command list in the epilog kept one per line."""


class Command(NamedTuple):
    help: str
    run: Callable[[list[str]], int]


def demo(args: list[str]) -> int:
    """`multimodal demo`: digits shards -> a small CLIP -> zero-shot and retrieval report."""
    from multimodal.demo import main as demo_main

    return demo_main(args)


def tokenizer(args: list[str]) -> int:
    """`multimodal tokenizer train ...`: train and save a WordPiece or byte-level BPE tokenizer."""
    from text.tokenizer_cli import main as tokenizer_main

    return tokenizer_main(args)


def shards(args: list[str]) -> int:
    """`multimodal shards demo|folder|torchvision ...`: write webdataset shards."""
    from multimodal.data.shards_cli import main as shards_main

    return shards_main(args)


def zeroshot(args: list[str]) -> int:
    """`multimodal zeroshot ...`: zero-shot classification report of a checkpoint."""
    from multimodal.eval.commands import zeroshot_main

    return zeroshot_main(args)


def retrieval(args: list[str]) -> int:
    """`multimodal retrieval ...`: image-text retrieval report of a checkpoint."""
    from multimodal.eval.commands import retrieval_main

    return retrieval_main(args)


COMMANDS: dict[str, Command] = {
    "demo": Command("train a small CLIP on the bundled digits and write its report", demo),
    "tokenizer": Command("train a WordPiece or byte-level BPE tokenizer on text files", tokenizer),
    "shards": Command(
        "write webdataset shards: demo digits, captioned image folders, torchvision", shards
    ),
    "zeroshot": Command("zero-shot classification report of a checkpoint on shards", zeroshot),
    "retrieval": Command("image-text retrieval report of a checkpoint on shards", retrieval),
}


def _epilog() -> str:
    lines = [f"  {name:<10} {command.help}" for name, command in COMMANDS.items()]
    return "platform commands (run `multimodal COMMAND --help`):\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m multimodal`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        sys.exit(COMMANDS[args[0]].run(args[1:]))
    from multimodal.short_runs import with_short_run_overrides  # MULTIMODAL_MAX_STEPS

    argv = with_short_run_overrides(argv)
    LightningCLI(
        args=argv,
        parser_kwargs={
            "prog": "multimodal",
            "description": "Train and evaluate vision, text and vision-language transformers.",
            "epilog": _epilog(),
            "formatter_class": HelpFormatter,
        },
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
