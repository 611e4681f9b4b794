"""What the benchmarks that measure memory share: each case runs in a fresh process (nothing
allocated before it), and its peak extra resident memory is read from /proc/self/status.

torch's CPU allocations are invisible to tracemalloc, so the peak is the rise of VmHWM (reset
through /proc/self/clear_refs just before the call) over VmRSS at that moment (Linux only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """`with peak_memory() as peak: ...` -> peak["mib"]: the peak resident memory the block
    added, in MiB."""
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    peak: dict[str, float] = {}
    yield peak
    peak["mib"] = (status_kib("VmHWM") - base) / 1024


def run_in_fresh_process(module: str, *args: object) -> dict:
    """`bench/<module>.py`'s `measure(*args)` in a new Python process; its JSON result."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(BENCH)!r}); import {module}; "
        f"print(json.dumps({module}.measure(*{args!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
