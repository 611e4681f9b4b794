"""The `multimodal` command.

`fit`, `validate`, `test` and `predict` are LightningCLI's: a model is any LightningModule
(`--model path.to.Task` or `class_path` in a YAML config), data any LightningDataModule, and
every Trainer flag is available (`--trainer.precision bf16-mixed`, `--trainer.devices 2`).
The platform's own commands (`demo`, `tokenizer`, `shards`, `zeroshot`, `retrieval`) are
dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from multimodal.checkpoint_check import check_lightning_checkpoint
from multimodal.console import LineProgressBar, one_line, quiet_third_party, stdout_is_terminal
from multimodal.runs import (
    LAST,
    RunFolder,
    RunLogger,
    WallClock,
    check_fresh_start,
    check_run_name,
    default_run_name,
    resume_path,
    summary_lines,
)


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


def benchmark(args: list[str]) -> int:
    """`multimodal benchmark ...`: every (model, dataset, task) cell of a suite, one report."""
    from multimodal.eval.benchmark import benchmark_main

    return benchmark_main(args)


def caption_eval(args: list[str]) -> int:
    """`multimodal caption-eval ...`: a captioner checkpoint's captions scored on references."""
    from multimodal.eval.caption_eval import caption_eval_main

    return caption_eval_main(args)


def vqa_eval(args: list[str]) -> int:
    """`multimodal vqa-eval ...`: VQA accuracy of a checkpoint by question and answer type."""
    from multimodal.eval.vqa_eval import vqa_eval_main

    return vqa_eval_main(args)


def attention(args: list[str]) -> int:
    """`multimodal attention ...`: attention rollout and cross-attention overlays of images."""
    from multimodal.inspect.commands import main as attention_main

    return attention_main(args)


def export(args: list[str]) -> int:
    """`multimodal export ...`: a checkpoint's embedding towers to ONNX or torch.export."""
    from multimodal.export.commands import export_main

    return export_main(args)


def quantize(args: list[str]) -> int:
    """`multimodal quantize ...`: a checkpoint to int8 for the CPU, zero-shot before/after."""
    from multimodal.export.commands import quantize_main

    return quantize_main(args)


def estimate(args: list[str]) -> int:
    """`multimodal estimate --config X ...`: memory, FLOPs and step time of a config, preflight."""
    from multimodal.train.estimate import main as estimate_main

    return estimate_main(args)


COMMANDS: dict[str, Command] = {
    "demo": Command("train a small CLIP on the bundled digits and write its report", demo),
    "tokenizer": Command("train a WordPiece or byte-level BPE tokenizer on text files", tokenizer),
    "shards": Command(
        "write webdataset shards: demo digits, captioned image folders, torchvision", shards
    ),
    "zeroshot": Command("zero-shot classification report of a checkpoint on shards", zeroshot),
    "retrieval": Command("image-text retrieval report of a checkpoint on shards", retrieval),
    "benchmark": Command(
        "a suite of models x datasets: leaderboard, results.jsonl, cached embeddings", benchmark
    ),
    "caption-eval": Command(
        "captioning report of a checkpoint: BLEU, ROUGE-L, CIDEr-D, examples", caption_eval
    ),
    "vqa-eval": Command("VQA accuracy report of a checkpoint by question/answer type", vqa_eval),
    "attention": Command("attention maps of a checkpoint over images: overlays, HTML", attention),
    "export": Command("export a checkpoint's image/text embedding to ONNX or .pt2", export),
    "quantize": Command("int8 CPU model of a checkpoint, with zero-shot before/after", quantize),
    "estimate": Command(
        "memory per device, FLOPs and step time of a config, without allocating it", estimate
    ),
}


def _epilog() -> str:
    lines = [f"  {name:<13} {command.help}" for name, command in COMMANDS.items()]
    return "platform commands (run `multimodal COMMAND --help`):\n" + "\n".join(lines)


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DEBUG_FLAG = "--debug"
EXIT_BAD_INPUT = 2


class PlatformParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are the message and a pointer to --help instead of
    a usage dump of every option."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {one_line(message)}  (`{prog} --help` lists the options)\n"
        )
        sys.exit(EXIT_BAD_INPUT)


class PlatformCLI(LightningCLI):
    """LightningCLI with the platform's run folders (`multimodal.runs`): `--run-name`, one
    folder a run, `--ckpt_path last` resuming it, checkpoint files checked before torch reads
    them, single-line progress when stdout is not a terminal, a warning when CPU processes
    outnumber the cores, and a summary at the end of `fit`.

    Args:
        started: receives the run folder as soon as it is known, so that the caller can remove
            it when the start fails.
        args, kwargs: LightningCLI's.
    """

    def __init__(self, *args: Any, started: list[RunFolder] | None = None, **kwargs: Any) -> None:
        self.clock = WallClock()
        self.started = started if started is not None else []
        self.run_dir: Path | None = None
        self.resume_from: str | None = None
        kwargs.setdefault("parser_class", PlatformParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run-name",
            "--run_name",
            default=None,
            help="the run's folder under trainer.default_root_dir (default: the config's name); "
            "the same name is the same folder: --ckpt_path last resumes it",
        )
        parser.add_argument(
            "--predict_out",
            "--predict-out",
            default=None,
            help="predict only: the output folder (default: the run folder's predictions/)",
        )

    def _parse_ckpt_path(self) -> None:
        # before LightningCLI reads --ckpt_path (torch.load): place the run, check the file
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            self._place_run(subcommand, config)
            given = config.get("ckpt_path")
            config.ckpt_path = self.resume_from
            try:
                super()._parse_ckpt_path()
            finally:
                config.ckpt_path = given

    def _place_run(self, subcommand: str, config: Any) -> None:
        trainer = config.get("trainer") or {}
        model = config.get("model")
        model_class = model.get("class_path") if hasattr(model, "get") else None
        name = config.get("run_name") or default_run_name(config.get("config"), model_class)
        root = Path(trainer.get("default_root_dir") or "runs")
        self.run_dir = root / check_run_name(name)
        self.started.append(RunFolder(self.run_dir))
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == LAST and subcommand == "fit":
            found = resume_path(self.run_dir)
            if found is None:
                rank_zero_info(f"--ckpt_path last: {self.run_dir} has no checkpoint yet, starting")
            self.resume_from = str(found) if found else None
            return
        if ckpt_path is None or ckpt_path in ("best", LAST, "hpc") or "://" in str(ckpt_path):
            self.resume_from = ckpt_path
            if subcommand == "fit" and ckpt_path is None:
                check_fresh_start(self.run_dir)
            return
        check_lightning_checkpoint(ckpt_path)
        self.resume_from = str(ckpt_path)

    def before_instantiate_classes(self) -> None:
        given = self.config[self.subcommand].get("predict_out") if self.subcommand else None
        if given is not None and self.subcommand != "predict":
            self.parser.error(
                f"--predict_out is an option of `multimodal predict`, not {self.subcommand}"
            )
        # a resumed (or evaluated) checkpoint replaces every weight: init_from is not read
        model = self.config[self.subcommand].get("model") if self.subcommand else None
        init_args = model.get("init_args") if hasattr(model, "get") else None
        if self.resume_from is not None and hasattr(init_args, "init_from"):
            init_args.init_from = None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.run_dir is not None:
            kwargs.setdefault("default_root_dir", str(self.run_dir))
            if trainer_config.get("logger") in (None, True):
                version = "" if self.subcommand in (None, "fit") else self.subcommand
                kwargs["logger"] = RunLogger(self.run_dir, version)
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") in (None, True)
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if wants_bar and not has_bar and not stdout_is_terminal():
            kwargs["callbacks"] = [*callbacks, LineProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs:
            kwargs["ckpt_path"] = self.resume_from
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer has them: none kept in memory
        return kwargs

    def before_predict(self) -> None:
        from multimodal.export.predict import ensure_writer

        ensure_writer(self.trainer, self.config.predict.get("predict_out"))

    def before_fit(self) -> None:
        warn_if_processes_exceed_cores(self.trainer)
        # said when training starts: a run that fails in its set-up prints its error alone
        self.trainer.callbacks.append(EmulatedBf16Notice())

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print("\n".join(summary_lines(self.trainer, self.run_dir, self.clock.seconds())))


def warn_if_processes_exceed_cores(trainer: Trainer) -> None:
    """One warning (from the launching process) when more CPU processes than cores train."""
    from lightning.pytorch.accelerators import CPUAccelerator

    if not isinstance(trainer.accelerator, CPUAccelerator) or not trainer.is_global_zero:
        return
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a process Lightning launched
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and trainer.num_devices > cores:
        print(
            f"warning: --trainer.devices {trainer.num_devices} starts {trainer.num_devices} "
            f"processes on {cores} CPU cores: each gets less than a core, so the run is slower "
            f"than with --trainer.devices {cores}",
            file=sys.stderr,
        )


class EmulatedBf16Notice(Callback):
    """One notice (from rank 0) when training starts on CPU in bf16 and this CPU computes bf16
    in software (several times slower than fp32)."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator

        from multimodal.train.cpu_precision import slow_bf16_notice

        if not isinstance(trainer.accelerator, CPUAccelerator) or not trainer.is_global_zero:
            return
        notice = slow_bf16_notice(trainer.precision)
        if notice:
            print(notice, file=sys.stderr)


def _unknown_command(name: str) -> str:
    known = [*LIGHTNING_COMMANDS, *COMMANDS]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f": did you mean `multimodal {close[0]}`?" if close else ""
    return f"multimodal: error: unknown command {name!r}{hint} (commands: {', '.join(known)})"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m multimodal`.

    Errors in the user's input (a config value, a missing file, a bad checkpoint) end in one
    line naming it and exit status 2; `--debug` shows the traceback instead.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    quiet_third_party()
    # the arguments below are sys.argv's less --debug (plus MULTIMODAL_MAX_STEPS's): both kept,
    # since Lightning's DDP launcher restarts this command from sys.argv
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if args and args[0] in COMMANDS:
        sys.exit(COMMANDS[args[0]].run(args[1:]))
    if args and not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        print(_unknown_command(args[0]), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    from multimodal.short_runs import with_short_run_overrides  # MULTIMODAL_MAX_STEPS

    started: list[RunFolder] = []
    try:
        PlatformCLI(
            args=with_short_run_overrides(args),
            parser_kwargs={
                "prog": "multimodal",
                "description": "Train and evaluate vision, text and vision-language transformers.",
                "epilog": _epilog(),
                "formatter_class": HelpFormatter,
            },
            save_config_kwargs={"overwrite": True},
            started=started,
        )
    except (ValueError, OSError) as error:
        for folder in started:
            if rank_zero_only.rank == 0:
                folder.remove_if_unused()
        if debug:
            raise
        command = args[0] if args and args[0] in LIGHTNING_COMMANDS else ""
        print(
            f"multimodal {command}: error: {one_line(error)}  ({DEBUG_FLAG} shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
