"""Greedy generation with the KV cache vs recomputing the whole sequence every step, for a
randomly initialised DecoderLM, measured in the same run; never a timed test.

    python bench/generation.py [--dtype fp32|bf16] [--position learned|rope] [--repeats 3]

Prints generated tokens/s of both and their ratio, then the time per step as the context
grows: with the cache a step feeds one token, so it stays roughly flat; without it a step
recomputes every token so far, so it grows with the length. Totals are medians over repeats,
step times medians over the steps of a range in all repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multimodal.layers import TransformerConfig
from text import DecoderLM, TextConfig
from text.generation import GenerationConfig, generate

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_model(position: str) -> DecoderLM:
    stack = TransformerConfig(
        dim=384, n_layers=6, n_heads=6, causal=True, position=position, max_positions=512
    )
    return DecoderLM(TextConfig(vocab_size=8000, transformer=stack)).eval()


def timed_generate(
    model: DecoderLM, prompts: torch.Tensor, config: GenerationConfig, dtype: torch.dtype | None
) -> tuple[float, list[float], torch.Tensor]:
    """Total seconds, seconds per generated token (token 1 includes the prompt's prefill)
    and the tokens. A step is the time between the ends of consecutive model calls: the
    forward pass plus picking and appending the token."""
    ends: list[float] = []
    hook = model.register_forward_hook(lambda *_: ends.append(time.perf_counter()))
    try:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            start = time.perf_counter()
            out = generate(model, prompts, config=config)
            total = time.perf_counter() - start
    finally:
        hook.remove()
    steps = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    return total, steps, out.sequences


def buckets(new_tokens: int) -> list[tuple[int, int]]:
    """Token ranges (1-based, inclusive) after the first: 2-32, 33-64, 65-128, 129-256, ..."""
    edges = [1, 32]
    while edges[-1] < new_tokens:
        edges.append(2 * edges[-1])
    edges[-1] = new_tokens
    return [(a + 1, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--position", choices=["learned", "rope"], default="learned")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.position)
    dtype = DTYPES[args.dtype]
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt))
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"greedy generation, DecoderLM 6 x 384, 6 heads, {args.position} positions, "
        f"vocab 8000 ({n_params:.1f}M parameters), batch {args.batch}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, CPU {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for use_cache in (True, False):  # one warm-up on a short run
        config = GenerationConfig(max_new_tokens=8, use_cache=use_cache)
        timed_generate(model, prompts, config, dtype)
    totals: dict[bool, list[float]] = {True: [], False: []}
    steps: dict[bool, list[list[float]]] = {True: [], False: []}
    tokens: dict[bool, torch.Tensor] = {}
    for _ in range(args.repeats):  # interleaved so that drifts in machine speed hit both alike
        for use_cache in (True, False):
            config = GenerationConfig(max_new_tokens=args.new_tokens, use_cache=use_cache)
            total, step, tokens[use_cache] = timed_generate(model, prompts, config, dtype)
            totals[use_cache].append(total)
            steps[use_cache].append(step)
    generated = args.batch * args.new_tokens
    rate = {c: generated / statistics.median(totals[c]) for c in (True, False)}
    print(f"{'':<10} {'total s':>8} {'tokens/s':>9}")
    for use_cache, label in ((True, "cache"), (False, "no cache")):
        median = statistics.median(totals[use_cache])
        print(f"{label:<10} {median:>8.2f} {rate[use_cache]:>9.1f}")
    print(f"speed-up of the cache: {rate[True] / rate[False]:.1f}x (target >= 5x)")
    differ = (tokens[True] != tokens[False]).any(dim=0).nonzero()
    n_same = args.new_tokens if len(differ) == 0 else int(differ[0])
    note = "" if n_same == args.new_tokens else " (rounding flipped a near-tie, then they diverge)"
    print(f"tokens equal with and without the cache: the first {n_same} of {args.new_tokens}{note}")

    def ms(use_cache: bool, first: int, last: int) -> float:
        """Median step time of tokens first..last over all repeats (robust to the spikes of
        a shared machine, where a mean is not)."""
        return 1000 * statistics.median(t for s in steps[use_cache] for t in s[first - 1 : last])

    print("\nms per step (one token for each row of the batch) as the context grows, median")
    print(f"{'tokens':<11} {'context':>8} {'cache':>8} {'no cache':>9} {'ratio':>6}")
    rows = [(1, 1), *buckets(args.new_tokens)]
    for first, last in rows:
        label = "1 (prefill)" if first == last == 1 else f"{first}-{last}"
        context = f"{args.prompt + first - 1}-{args.prompt + last - 1}"
        cached, full = ms(True, first, last), ms(False, first, last)
        print(f"{label:<11} {context:>8} {cached:>8.2f} {full:>9.2f} {full / cached:>6.1f}")
    (a, b), (c, d) = rows[1], rows[-1]
    print(
        f"last / first bucket: cache {ms(True, c, d) / ms(True, a, b):.2f}x, "
        f"no cache {ms(False, c, d) / ms(False, a, b):.2f}x"
    )


if __name__ == "__main__":
    main()
