"""LoRA against full fine-tuning of a ViT-B/16-class CLIP (224 px, 12-layer ViT of width 768;
12-layer text tower of width 512, context 77; 149.6 M parameters) at batch 32: trainable
parameters, peak training memory and step time, measured in the same run; never a timed test.

    python bench/adapt.py [--batch 32] [--rank 8] [--precision bf16-mixed|32-true]
                          [--layers 12] [--repeats 3] [--threads N]

A step: forward under the precision's autocast, CLIP loss, backward, AdamW over the trainable
parameters, zero_grad. LoRA is `multimodal.adapt` as `adapt: {lora: {rank: 8, targets: [qkv,
proj, fc1, fc2]}, train_also: [logit_scale]}` applies it: every attention and MLP Linear of
both towers, the base frozen. Memory: each case in a fresh process, the peak resident memory
added from before the model is built to after two steps (parameters, gradients, AdamW state,
activations; bench/fresh_process.py). Time: the median of `--repeats` steps after a warm-up
step, in the same fresh process. The default precision is bf16-mixed where the CPU computes
bf16 natively, 32-true elsewhere (emulated bf16 is several times slower than fp32).
`--layers 4` gives a quick run of the same widths.

glibc raises its mmap threshold each time a large block is freed, after which activations of
the next steps come from the heap and stay resident when freed: the resident peak then counts
memory no tensor holds (measured at full size: LoRA 8,690 MiB with the dynamic threshold,
5,165 MiB with it fixed). The cases run with `MALLOC_MMAP_THRESHOLD_` fixed at
`--mmap-threshold` bytes (glibc's initial 128 KiB) so that the peak follows the live tensors;
`--mmap-threshold 0` keeps glibc's dynamic behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from fresh_process import peak_memory, run_in_fresh_process

from multimodal.adapt import AdaptConfig, LoRAConfig, apply_adaptation
from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.models.losses import clip_loss
from multimodal.train.cpu_precision import cpu_has_native_bf16
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig

CONTEXT, VOCAB = 77, 49408


def build_clip(layers: int) -> CLIP:
    """open_clip's ViT-B-16 shapes with `layers` blocks per tower."""
    image = ViT(ViTConfig(image_size=224, patch_size=16, dim=768, n_layers=layers, n_heads=12))
    transformer = TransformerConfig(
        dim=512, n_layers=layers, n_heads=8, causal=True, position="learned",
        max_positions=CONTEXT,
    )  # fmt: skip
    text = TextEncoder(TextConfig(vocab_size=VOCAB, transformer=transformer), pool="eot")
    return CLIP(image, text, embed_dim=512)


def measure(case: str, batch: int, rank: int, precision: str, layers: int, repeats: int,
            threads: int) -> dict:  # fmt: skip
    """In a fresh process: trainable / total parameters, peak MiB and median step seconds of
    `case` ("full" or "lora")."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1, VOCAB, (batch, CONTEXT))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision.startswith("bf16")
        else contextlib.nullcontext()
    )
    times = []
    with peak_memory() as peak:
        model = build_clip(layers).train()
        if case == "lora":
            lora = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=["qkv", "proj", "fc1", "fc2"])
            apply_adaptation(model, AdaptConfig(lora=lora, train_also=["logit_scale"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
        for _ in range(repeats + 1):  # the first step allocates AdamW's state: a warm-up
            start = time.perf_counter()
            with autocast:
                out = model(images, ids)
                loss = clip_loss(out.image_features, out.text_features, out.logit_scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return {
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in model.parameters()),
        "peak_mib": peak["mib"],
        "step_s": statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    native = cpu_has_native_bf16() is not False
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--precision", choices=["bf16-mixed", "32-true"],
        default="bf16-mixed" if native else "32-true",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=12, help="blocks per tower (12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--mmap-threshold", type=int, default=128 * 1024, metavar="BYTES",
        help="glibc MALLOC_MMAP_THRESHOLD_ of the measured processes (0: glibc's dynamic one)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.mmap_threshold > 0:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # the fresh processes'
    allocator = f"mmap threshold {args.mmap_threshold or 'dynamic'}"
    print(
        f"CLIP ViT-B/16-class ({args.layers} layers per tower), 224 px, batch {args.batch}, "
        f"{args.precision}, CPU, {args.threads} threads, {allocator}, torch {torch.__version__}"
    )
    common = (args.batch, args.rank, args.precision, args.layers, args.repeats, args.threads)
    results = {case: run_in_fresh_process("adapt", case, *common) for case in ("full", "lora")}
    print(f"{'case':<24} {'trainable':>12} {'share':>7} {'peak MiB':>9} {'step s':>7}")
    for case, r in results.items():
        label = "full fine-tuning" if case == "full" else f"LoRA r={args.rank}"
        share = 100 * r["trainable"] / r["total"]
        print(
            f"{label:<24} {r['trainable']:>12,} {share:>6.2f}% {r['peak_mib']:>9.0f} "
            f"{r['step_s']:>7.2f}"
        )
    full, lora = results["full"], results["lora"]
    print(
        f"LoRA / full: peak memory {lora['peak_mib'] / full['peak_mib']:.2f}x (goal <= 0.6x), "
        f"step time {lora['step_s'] / full['step_s']:.2f}x (goal <= 0.8x)"
    )


if __name__ == "__main__":
    main()
