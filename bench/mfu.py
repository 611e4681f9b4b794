"""Model FLOPs utilisation of one training step (forward, loss, backward, AdamW step,
zero_grad) of a CLIP ViT-B/16 at 224 px and a GPT-2-small-class decoder (124 M, 1024 tokens),
against the device's peak; never a timed test.

    python bench/mfu.py [--steps 6] [--device auto|cpu|cuda] [--compile]

FLOPs per step are counted once with `FlopCounterMode` (multimodal.train.flop_count), the
step time is the median of `--steps` steps after two warm-up steps. The peak is the table of
`multimodal.train.peak_flops` on A100/H100/H200 (and, measured in the same run, the best
large bf16 matmul, so MFU also reads as a fraction of what this GPU reaches), or on CPU a
matmul calibration of the same run; "vs matmul" is against a matmul timed right after each
case (on a shared machine, the same load). Goals on H100-class GPUs: >= 40% for CLIP, >= 45% for
GPT (bf16-mixed). On CPU the full models take minutes a step: the CPU run uses reduced
models (fewer layers, smaller images / sequences, tiny batches) in fp32, and says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.models.losses import clip_loss
from multimodal.train.flop_count import flop_counter
from multimodal.train.peak_flops import device_peak_flops, measure_matmul_flops
from text import DecoderLM, TextConfig, TextEncoder
from vision import ViT, ViTConfig

GOALS = {"clip": 0.40, "gpt": 0.45}


@dataclass
class Case:
    name: str
    description: str
    model: nn.Module
    batch: Callable[[torch.device], tuple[Tensor, ...]]
    loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


def clip_case(full: bool) -> Case:
    size, layers, batch = (224, 12, 256) if full else (112, 2, 4)
    image = ViT(ViTConfig(image_size=size, patch_size=16, dim=768, n_layers=layers, n_heads=12,
                          pre_norm=True, patch_bias=False, norm_eps=1e-5))  # fmt: skip
    text_layers = 12 if full else 2
    transformer = TransformerConfig(dim=512, n_layers=text_layers, n_heads=8, causal=True,
                                    position="learned", max_positions=77)  # fmt: skip
    text = TextEncoder(TextConfig(vocab_size=49408, transformer=transformer), pool="eot")
    model = CLIP(image, text, embed_dim=512)

    def make(device: torch.device) -> tuple[Tensor, ...]:
        images = torch.randn(batch, 3, size, size, device=device)
        ids = torch.randint(1, 49407, (batch, 77), device=device)
        return images, ids, torch.ones(batch, 77, dtype=torch.bool, device=device)

    def loss(m: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        out = m(*b)
        return clip_loss(out.image_features.float(), out.text_features.float(), out.logit_scale)

    what = f"CLIP ViT-B/16 {size} px, {layers}+{text_layers} layers, batch {batch}"
    return Case("clip", what, model, make, loss)


def gpt_case(full: bool) -> Case:
    layers, seq, batch = (12, 1024, 16) if full else (2, 256, 2)
    transformer = TransformerConfig(dim=768, n_layers=layers, n_heads=12, causal=True,
                                    position="learned", max_positions=1024)  # fmt: skip
    model = DecoderLM(TextConfig(vocab_size=50304, transformer=transformer))

    def make(device: torch.device) -> tuple[Tensor, ...]:
        return (torch.randint(0, 50304, (batch, seq + 1), device=device),)

    def loss(m: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        (ids,) = b
        logits = m(ids[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    what = f"GPT 768 wide, {layers} layers, {seq} tokens, batch {batch}"
    return Case("gpt", what, model, make, loss)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, device: torch.device, dtype: torch.dtype | None, steps: int,
             compile_model: bool) -> tuple[float, float]:  # fmt: skip
    """(median step seconds, FLOPs per step) of `case` on `device`."""
    model = case.model.to(device)
    step_model = torch.compile(model) if compile_model else model
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    batch = case.batch(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step() -> None:
        with autocast:
            loss = case.loss(step_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with flop_counter() as counter, autocast:  # eager: the counter sees every op
        loss = case.loss(model, batch)
    with flop_counter() as backward_counter:
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    flops = counter.get_total_flops() + backward_counter.get_total_flops()
    return statistics.median(times), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    full = device.type == "cuda"
    dtype = torch.bfloat16 if full else None  # CPU: fp32 (bf16 matmuls are slow on most CPUs)
    compute = dtype or torch.float32
    peak = device_peak_flops(device, compute)
    label = torch.cuda.get_device_name(device) if full else "CPU (calibrated matmul peak)"
    print(f"device: {label}, {'bf16-mixed' if full else 'fp32'}, threads {torch.get_num_threads()}")
    if not full:
        print("CPU: reduced models (the full ones take minutes a step here); MFU vs the matmul")
        print("calibration of this run, not comparable to the GPU goals")
    if peak:
        print(f"peak: {peak / 1e12:.3f} TFLOP/s")
    print(f"{'case':<52}{'step ms':>10}{'TFLOP/s':>10}{'MFU':>8}{'vs matmul':>11}{'goal':>7}")
    for make in (clip_case, gpt_case):
        torch.manual_seed(0)
        case = make(full)
        seconds, flops = run_case(case, device, dtype, args.steps, args.compile)
        # the best matmul measured right after the case: the same machine load
        reference = measure_matmul_flops(compute, 8192 if full else 2048, device)
        achieved = flops / seconds
        mfu = f"{achieved / peak:8.1%}" if peak else f"{'-':>8}"
        goal = f"{GOALS[case.name]:7.0%}" if full else f"{'-':>7}"
        print(f"{case.description:<52}{seconds * 1e3:10.1f}{achieved / 1e12:10.3f}{mfu}"
              f"{achieved / reference:11.1%}{goal}")  # fmt: skip
        del case
        if full:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
