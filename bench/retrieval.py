"""Image-text retrieval metrics computed in blocks (multimodal.eval.retrieval) vs the usual
full-matrix evaluation: one (N_t, N_i) matmul, torch.topk(k=10) in both directions and the
ranks computed from the full matrix. Prints times, peak extra memory and ratios measured in the
same run; never a timed test.

    python bench/retrieval.py [--sizes 20000,100000] [--dim 512] [--repeats 3] [--quick]

N x N means N images and N texts, one caption each (text i describes image i), unit fp32
features with texts = normalise(image + noise) so the ranks are not trivial. The reference runs
only for N <= --reference-max (its score matrix alone is 4 N^2 bytes: 40 GB at N = 100k).

Peak extra memory is the rise of the process's resident set over the features (VmHWM, reset
through /proc/self/clear_refs just before the call, minus VmRSS then), measured in a fresh
subprocess per case: torch's CPU allocations are invisible to tracemalloc. Time: the first call
(the one whose memory is measured) and repeats - 1 more, median. "ranks differing" counts the
queries (both directions) whose rank differs from the reference's (0 when the comparisons are
exact; see multimodal.eval.retrieval on the tie tolerance).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from fresh_process import peak_memory, run_in_fresh_process

from multimodal.eval.retrieval import auto_chunk_size, retrieval_metrics

KS = (1, 5, 10)


def make_features(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    noise = torch.randn(n, dim, generator=generator) * 5 / math.sqrt(dim)  # cos ~0.2
    texts = F.normalize(images + noise, dim=-1)
    return images, texts, torch.arange(n)


def reference(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor) -> dict:
    """Full-matrix evaluation, with the same pessimistic tie rule as ours (and the same int32
    counting, so that the comparison is about the blocking, not the reduction kernels)."""
    phases = {}
    start = time.perf_counter()
    scores = texts @ images.T  # (N_t, N_i)
    phases["matmul_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores.topk(10, dim=1)  # text -> image top 10
    scores.T.topk(10, dim=1)  # image -> text top 10
    phases["topk_s"] = time.perf_counter() - start
    start = time.perf_counter()
    correct = scores.gather(1, text_image[:, None])  # (N_t, 1)
    text_rank = (scores >= correct).sum(1, dtype=torch.int32)  # the correct image counts as 1
    best = torch.full((images.shape[0],), -math.inf).scatter_reduce(
        0, text_image, correct[:, 0], reduce="amax"
    )
    column = (scores >= best[None, :]).sum(0, dtype=torch.int32)
    own = torch.zeros(images.shape[0], dtype=torch.int32).index_add_(
        0, text_image, (correct[:, 0] >= best[text_image]).int()
    )
    image_rank = column - own + 1
    phases["ranks_s"] = time.perf_counter() - start
    recall = {
        f"{name}@{k}": (ranks <= k).double().mean().item()
        for name, ranks in (("i2t", image_rank), ("t2i", text_rank))
        for k in KS
    }
    ranks = {"i2t": image_rank.tolist(), "t2i": text_rank.tolist()}
    return {"recall": recall, "phases": phases, "ranks": ranks}


def ours(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, budget: int) -> dict:
    result = retrieval_metrics(images, texts, text_image, ks=KS, max_memory_bytes=budget)
    recall = {
        f"{name}@{k}": direction.recall[k]
        for name, direction in (("i2t", result.image_to_text), ("t2i", result.text_to_image))
        for k in KS
    }
    ranks = {"i2t": result.image_to_text.ranks.tolist(), "t2i": result.text_to_image.ranks.tolist()}
    return {"recall": recall, "phases": {}, "ranks": ranks, "tolerance": result.tie_tolerance}


def measure(case: str, n: int, dim: int, repeats: int, budget: int) -> dict:
    """Run in a fresh process: peak extra memory and time of the first call, then repeats."""
    images, texts, text_image = make_features(n, dim)
    torch.randn(256, dim) @ torch.randn(dim, 256)  # start the thread pool outside the measure
    fn = (
        (lambda: ours(images, texts, text_image, budget))
        if case == "ours"
        else (lambda: reference(images, texts, text_image))
    )
    with torch.no_grad():
        with peak_memory() as peak:
            start = time.perf_counter()
            out = fn()
            times = [time.perf_counter() - start]
        for _ in range(repeats - 1):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"s": statistics.median(times), "mib": peak["mib"], **out}


def run_case(case: str, n: int, dim: int, repeats: int, budget: int) -> dict:
    return run_in_fresh_process("retrieval", case, n, dim, repeats, budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated N (N x N)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (N <= 20k)")
    parser.add_argument("--reference-max", type=int, default=20000)
    parser.add_argument("--max-memory-mib", type=int, default=512, help="ours: block budget")
    parser.add_argument("--quick", action="store_true", help="sizes 4000,10000, one repeat")
    args = parser.parse_args()
    sizes = [4000, 10000] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    budget = args.max_memory_mib * 2**20
    chunk = auto_chunk_size(args.dim, 4, budget)
    print(
        f"retrieval metrics, N images x N texts, D={args.dim}, fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    print(f"ours: blocks of at most {chunk} x {chunk} (budget {args.max_memory_mib} MiB)")
    print(
        f"{'N':>7} {'ours s':>8} {'ref s':>8} {'time':>6} {'ours MiB':>9} {'ref MiB':>8} "
        f"{'ref matmul/topk/ranks s':>24}  ranks differing, max |recall diff|"
    )
    for n in sizes:
        mine = run_case("ours", n, args.dim, repeats if n <= 20000 else 1, budget)
        line = f"{n:>7} {mine['s']:>8.2f} "
        if n <= args.reference_max:
            ref = run_case("reference", n, args.dim, repeats, budget)
            phases = "/".join(f"{ref['phases'][p]:.2f}" for p in ("matmul_s", "topk_s", "ranks_s"))
            differ = sum(
                a != b
                for d in ("i2t", "t2i")
                for a, b in zip(mine["ranks"][d], ref["ranks"][d], strict=True)
            )
            recall_gap = max(abs(mine["recall"][k] - v) for k, v in ref["recall"].items())
            line += (
                f"{ref['s']:>8.2f} {mine['s'] / ref['s']:>6.2f} {mine['mib']:>9.0f} "
                f"{ref['mib']:>8.0f} {phases:>24}  {differ:>5} / {2 * n} {recall_gap:>9.1e}"
            )
        else:
            line += f"{'-':>8} {'-':>6} {mine['mib']:>9.0f} {'-':>8} {'-':>24}"
        print(line, flush=True)
        print(
            "        ours: recall "
            + ", ".join(f"{k} {v:.3f}" for k, v in mine["recall"].items())
            + f"; tie tolerance used {mine['tolerance']:.1e}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
