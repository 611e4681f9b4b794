"""Runs several `multimodal` command lines in one process (one interpreter start instead of
one a case) and writes, for each, its exit status and everything it printed:
`python -m tests.cli.run_cases CASES.json RESULTS.json`, CASES a list of argv lists."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from multimodal.cli import main


def run_case(argv: list[str]) -> dict:
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
