"""Short runs from the environment: `MULTIMODAL_MAX_STEPS=N` caps every `fit` / `validate` /
`test` / `predict` (and `multimodal demo`) at N optimizer steps and N batches per evaluation
loop, without touching the command line.

It exists so that the README's commands can be run verbatim by a test (tests/test_readme.py)
in seconds instead of hours. It changes only Trainer limits, never a model or the data, and
says so on stderr whenever it applies.
"""

from __future__ import annotations

import os
import sys

ENV = "MULTIMODAL_MAX_STEPS"
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


def short_run_overrides() -> list[str]:
    """The Trainer arguments that cap a run at `MULTIMODAL_MAX_STEPS` ([] when unset)."""
    steps = max_steps_from_env()
    if steps is None:
        return []
    args = ["--trainer.max_steps", str(steps)]
    for limit in _LIMITS:
        args += [f"--trainer.{limit}", str(steps)]
    print(f"{ENV}={steps}: {' '.join(args)}", file=sys.stderr)
    return args


def with_short_run_overrides(argv: list[str] | None) -> list[str] | None:
    """`argv` (None: sys.argv[1:]) with `short_run_overrides()` appended when it runs a
    LightningCLI subcommand; `argv` unchanged otherwise (or when the variable is unset)."""
    if not os.environ.get(ENV, "").strip():
        return argv
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a in SUBCOMMANDS for a in args) or {"-h", "--help"} & set(args):
        return argv
    return [*args, *short_run_overrides()]
