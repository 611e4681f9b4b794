"""Contrastive-correct accumulation (multimodal.train.grad_cache, what `accumulate: K` runs):
one CLIP training step on K micro-batches of B, trained as one batch of K x B, against the
step on that batch at once. Prints peak extra memory, step time and their ratios, measured in
the same run; never a timed test.

    python bench/accumulation.py [--batch 256] [--accumulate 4] [--image-size 224]
                                 [--repeats 3] [--threads N] [--clock wall|cpu]

The model is bench/clip_step.py's (README): 224 px (or --image-size), patch 32, width 256,
6 layers; text context 77, width 256, 4 layers; 21.5 M parameters. A step: forward, CLIP loss,
backward, AdamW, zero_grad, fp32. Each case runs in a fresh process (nothing allocated before
it): memory is the peak extra resident memory (VmHWM over VmRSS just before it,
bench/fresh_process.py) of the step after a warm-up step; times are medians of repeats in a
third process, both steps interleaved on one model. Both memory processes build the same
model and batch, so their first losses agree (printed): the accumulated step IS the
big-batch step. On a machine shared with other work, `--threads 1 --clock cpu` (process CPU
time of one thread) is nearly blind to it.
"""

from __future__ import annotations

import argparse
import statistics

import clip_step
import torch
from clip_step import CLOCKS, TEXT, build_ours, captions
from fresh_process import peak_memory, run_in_fresh_process

from multimodal.models.losses import clip_loss
from multimodal.train import Embedded, grad_cache
from text import load_tokenizer


def make_step(batch: int, accumulate: int, image_size: int, threads: int, clock: str):
    """A step function -> (seconds, loss) on `batch` samples split into `accumulate`
    micro-batches (1: the whole batch at once), and one for the whole batch, on one model."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    clip_step.IMAGE = {**clip_step.IMAGE, "image_size": image_size}  # what build_ours reads
    model = build_ours().train()
    images = torch.randn(batch, 3, image_size, image_size)
    tokens = load_tokenizer("clip").batch_encode(
        captions(batch), max_length=TEXT["context_length"], padding="max_length"
    )
    inputs = (images, tokens.input_ids, tokens.attention_mask)
    micro_batches = list(zip(*(x.chunk(accumulate) for x in inputs), strict=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def embed(micro: tuple[torch.Tensor, ...]) -> Embedded:
        out = model(*micro)
        return Embedded((out.image_features, out.text_features), (out.logit_scale,))

    def loss_fn(features: tuple[torch.Tensor, ...], shared: tuple[torch.Tensor, ...]):
        return clip_loss(features[0], features[1], shared[0])

    def step(k: int) -> tuple[float, float]:
        start = CLOCKS[clock]()
        if k == 1:
            out = embed(inputs)
            loss = loss_fn(out.features, out.shared)
            loss.backward()
        else:
            loss = grad_cache(micro_batches, embed, loss_fn).loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return CLOCKS[clock]() - start, float(loss)

    return step


def measure(what: str, batch: int, accumulate: int, image_size: int, *rest) -> dict:
    """In a fresh process. "memory": the peak extra memory (MiB) of a step after a warm-up
    step (AdamW allocates its state) and the first loss. "time": median seconds of the big
    batch's step and the accumulated one, interleaved so that drifts hit both."""
    if what == "memory":
        (threads,) = rest
        step = make_step(batch, accumulate, image_size, threads, "wall")
        _, loss = step(accumulate)
        with peak_memory() as peak:
            step(accumulate)
        return {"peak_mib": peak["mib"], "loss": loss}
    repeats, threads, clock = rest
    step = make_step(batch, accumulate, image_size, threads, clock)
    step(1), step(accumulate)  # warm-up
    times: dict[int, list[float]] = {1: [], accumulate: []}
    for _ in range(repeats):
        for k in times:
            times[k].append(step(k)[0])
    return {"big_s": statistics.median(times[1]), "acc_s": statistics.median(times[accumulate])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="the big batch, K x B")
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    args = parser.parse_args()
    k, n, size = args.accumulate, args.batch, args.image_size
    print(
        f"CLIP step (fwd + loss + bwd + AdamW), clip_step's model at {size} px, fp32, "
        f"CPU, {args.threads} threads, {args.clock} clock, torch {torch.__version__}"
    )
    big = run_in_fresh_process("accumulation", "memory", n, 1, size, args.threads)
    acc = run_in_fresh_process("accumulation", "memory", n, k, size, args.threads)
    times = run_in_fresh_process(
        "accumulation", "time", n, k, size, args.repeats, args.threads, args.clock
    )
    print(f"{'step':<28} {'peak extra MiB':>15} {'step s':>8} {'first loss':>11}")
    for label, r, t in (
        (f"one batch of {n}", big, times["big_s"]),
        (f"accumulate {k} x {n // k}", acc, times["acc_s"]),
    ):
        print(f"{label:<28} {r['peak_mib']:>15.0f} {t:>8.2f} {r['loss']:>11.5f}")
    memory, speed = acc["peak_mib"] / big["peak_mib"], times["acc_s"] / times["big_s"]
    print(
        f"accumulated / big batch: memory {memory:.2f}x (goal <= 0.5x), "
        f"time {speed:.2f}x (goal <= 1.3x); |loss difference| {abs(acc['loss'] - big['loss']):.1e}"
    )


if __name__ == "__main__":
    main()
