"""Causal attention of multimodal.layers vs a naive softmax(QK^T/sqrt(d) + mask)V, and
sliding-window vs full causal attention. Prints times, peak memory and ratios measured in the
same run; never a timed test.

    python bench/attention.py [--dtype fp32|bf16] [--repeats 5]

Peak memory is the rise of the process's resident set (VmHWM, reset through
/proc/self/clear_refs) over the inputs, measured in a fresh subprocess per case.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from fresh_process import peak_memory, run_in_fresh_process

from multimodal.layers import attend, banded_attend

HEADS, HEAD_DIM = 8, 64
LENGTHS = (512, 1024, 2048, 4096)
WINDOW = 256
WINDOW_LENGTHS = (1024, 2048, 4096, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v


CASES = {
    "ours": lambda q, k, v: attend(q, k, v, is_causal=True)[0],
    "naive": naive_causal,
    "window": lambda q, k, v: banded_attend(q, k, v, window=WINDOW, causal=True),
}


def measure(case: str, n: int, dtype: str, repeats: int) -> dict:
    """Run in a fresh process: peak memory of the first call, then the median time."""
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, dtype=DTYPES[dtype]) for _ in range(3))
    fn = CASES[case]
    with torch.no_grad():
        with peak_memory() as peak:
            fn(q, k, v)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "mib": peak["mib"]}


def run_case(case: str, n: int, dtype: str, repeats: int) -> dict:
    return run_in_fresh_process("attention", case, n, dtype, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"causal attention, batch 1, {HEADS} heads x {HEAD_DIM}, {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'n':>6} {'ours ms':>9} {'naive ms':>9} {'time':>6} "
        f"{'ours MiB':>9} {'naive MiB':>10} {'memory':>7}"
    )
    results = {}
    for n in LENGTHS:
        ours = run_case("ours", n, args.dtype, args.repeats)
        naive = run_case("naive", n, args.dtype, args.repeats)
        results[n] = (ours, naive)
        print(
            f"{n:>6} {ours['ms']:>9.1f} {naive['ms']:>9.1f} {ours['ms'] / naive['ms']:>6.2f} "
            f"{ours['mib']:>9.1f} {naive['mib']:>10.1f} {ours['mib'] / naive['mib']:>7.3f}"
        )
    (o1, n1), (o4, n4) = results[1024], results[4096]
    print(
        f"peak memory n=4096 / n=1024: ours {o4['mib'] / o1['mib']:.1f}x (linear: 4), "
        f"naive {n4['mib'] / n1['mib']:.1f}x (quadratic: 16)"
    )
    print(f"\nsliding window w={WINDOW} (banded) vs full causal (SDPA)")
    print(f"{'n':>6} {'window ms':>10} {'causal ms':>10} {'time':>6} {'window MiB':>11}")
    window_ms = {}
    for n in WINDOW_LENGTHS:
        window = run_case("window", n, args.dtype, args.repeats)
        full = results[n][0] if n in results else run_case("ours", n, args.dtype, args.repeats)
        window_ms[n] = window["ms"]
        print(
            f"{n:>6} {window['ms']:>10.1f} {full['ms']:>10.1f} {window['ms'] / full['ms']:>6.2f} "
            f"{window['mib']:>11.1f}"
        )
    growth = window_ms[WINDOW_LENGTHS[-1]] / window_ms[WINDOW_LENGTHS[-2]]
    print(
        f"window time n={WINDOW_LENGTHS[-1]} / n={WINDOW_LENGTHS[-2]}: {growth:.2f}x "
        "(n*w: 2, n*n: 4)"
    )


if __name__ == "__main__":
    main()
