"""Short runs from the environment: `MULTIMODAL_MAX_STEPS=N` caps every `fit` / `validate` /
`test` / `predict` (and `multimodal demo`) at N optimizer steps and N batches per evaluation
loop (validating once, at step N), and `MULTIMODAL_PRECISION=P` runs them at Trainer
precision P, without touching the command line.

They exist so that the README's commands and the configs can be run verbatim by tests
(tests/test_readme.py) in seconds instead of hours, also on CPUs where the configs' bf16-mixed
is emulated and slow. They change only Trainer settings, never a model or the data, and say so
on stderr whenever they apply. An explicit `--trainer.precision` on the command line wins over
`MULTIMODAL_PRECISION`; `MULTIMODAL_MAX_STEPS` is a cap and wins over the command line.
"""

from __future__ import annotations

import os
import sys

ENV = "MULTIMODAL_MAX_STEPS"
PRECISION_ENV = "MULTIMODAL_PRECISION"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_LIMITS = ("limit_val_batches", "limit_test_batches", "limit_predict_batches")


def max_steps_from_env() -> int | None:
    """N from `MULTIMODAL_MAX_STEPS` (None when unset or empty); anything but an integer >= 1
    is a ValueError naming the variable."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise ValueError(f"{ENV}={text!r} must be an integer >= 1 (or unset)")
    return steps


def precision_from_env() -> str | None:
    """P from `MULTIMODAL_PRECISION` (None when unset or empty)."""
    return os.environ.get(PRECISION_ENV, "").strip() or None


def max_steps_overrides() -> list[str]:
    """The Trainer arguments that cap a run at `MULTIMODAL_MAX_STEPS` ([] when unset)."""
    steps = max_steps_from_env()
    if steps is None:
        return []
    args = ["--trainer.max_steps", str(steps)]
    for limit in _LIMITS:
        args += [f"--trainer.{limit}", str(steps)]
    # validate once at step N (not only at an epoch's end, which a short run never reaches),
    # so that the run's best checkpoint and validation code exist too
    args += [
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.check_val_every_n_epoch",
        "null",
    ]
    print(f"{ENV}={steps}: {' '.join(args)}", file=sys.stderr)
    return args


def precision_overrides() -> list[str]:
    """`--trainer.precision P` of `MULTIMODAL_PRECISION` ([] when unset)."""
    precision = precision_from_env()
    if precision is None:
        return []
    print(f"{PRECISION_ENV}={precision}: --trainer.precision {precision}", file=sys.stderr)
    return ["--trainer.precision", precision]


def short_run_overrides() -> list[str]:
    """`precision_overrides()` + `max_steps_overrides()`."""
    return precision_overrides() + max_steps_overrides()


def with_short_run_overrides(argv: list[str] | None) -> list[str] | None:
    """`argv` (None: sys.argv[1:]) with the environment's Trainer arguments when it runs a
    LightningCLI subcommand; `argv` unchanged otherwise (or when both variables are unset)."""
    if max_steps_from_env() is None and precision_from_env() is None:
        return argv
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a in SUBCOMMANDS for a in args) or {"-h", "--help"} & set(args):
        return argv
    # the precision goes before the user's own --trainer.* arguments, so an explicit
    # --trainer.precision still wins (the last value counts); the step cap goes last: it caps
    first = next((i for i, a in enumerate(args) if a.startswith("--trainer.")), len(args))
    return [*args[:first], *precision_overrides(), *args[first:], *max_steps_overrides()]
