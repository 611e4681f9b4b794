"""Runs several `multimodal` command lines in one process (one interpreter start instead of
one a case) and writes, for each, its exit status and everything it printed:
`python -m tests.cli.run_cases CASES.json RESULTS.json`, CASES a list of argv lists;
`run_cases(cases, cwd)` does it from a test."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cases(cases: list[list[str]], cwd: Path) -> list[dict]:
    """Each case's `argv`, exit `status` (an int, or "uncaught" with the traceback in stderr),
    `stdout` and `stderr`, from one subprocess in `cwd` (stdout not a TTY)."""
    (cwd / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run(
        [sys.executable, "-m", "tests.cli.run_cases", "cases.json", "results.json"],
        cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((cwd / "results.json").read_text())


def run_case(argv: list[str]) -> dict:
    from multimodal.cli import main

    out, err = io.StringIO(), io.StringIO()
    status: int | str = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what a user would see as a traceback
            status = "uncaught"
            err.write(traceback.format_exc())
    return {"argv": argv, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        cases = json.load(file)
    results = [run_case(argv) for argv in cases]
    with open(sys.argv[2], "w") as file:
        json.dump(results, file, indent=1)
