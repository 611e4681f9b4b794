"""Whether this CPU computes bf16 natively, and the notice when a bf16 run will be slow.

CPUs with AVX512-BF16 or AMX (Intel Sapphire Rapids and later, AMD Zen 4 and later) run bf16
matrix products several times faster than fp32, so `bf16-mixed` is the fast setting on them,
as on GPUs. CPUs without them (AVX2-only x86, e.g. older EPYC and Xeon) emulate bf16: there
`bf16-mixed` trains the digits CLIP about 17x slower than `32-true`. Nothing here changes a
run's precision; it tells the user.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """True / False on x86 Linux (from the CPU flags), None where it cannot be told."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in BF16_FLAGS)
    return None


def slow_bf16_notice(precision: object) -> str | None:
    """A one-line notice when `precision` is a bf16 setting and this CPU lacks native bf16
    (None otherwise)."""
    if not str(precision).startswith("bf16") or cpu_has_native_bf16() is not False:
        return None
    return (
        f"notice: precision {precision} on a CPU without native bf16 ({' or '.join(BF16_FLAGS)}"
        " absent): it runs several times slower than fp32 here; "
        "--trainer.precision 32-true is faster on this machine"
    )
