"""Forward + backward time of vision.ViT vs timm's VisionTransformer with the same config and
weights, measured in the same run (interleaved, median of repeats); never a timed test.

    python bench/vit.py [--models vit_tiny_patch16_224 vit_small_patch16_224] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

from vision import ViT


def step_time(
    loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module, dtype: torch.dtype | None
) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn()
    loss.backward()
    return time.perf_counter() - start


def compare(name: str, batch: int, dtype: torch.dtype | None, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).train()
    ours = ViT.from_timm(reference).train()
    images = torch.randn(batch, 3, *reference.patch_embed.img_size)

    def timm_loss() -> torch.Tensor:
        features = reference.forward_features(images)
        return reference.forward_head(features, pre_logits=True).float().pow(2).mean()

    def our_loss() -> torch.Tensor:
        return ours(images).pooled.float().pow(2).mean()

    for _ in range(2):  # warm-up
        step_time(our_loss, ours, dtype)
        step_time(timm_loss, reference, dtype)
    ours_t, timm_t = [], []
    for _ in range(repeats):  # interleaved so that drifts in machine speed hit both alike
        ours_t.append(step_time(our_loss, ours, dtype))
        timm_t.append(step_time(timm_loss, reference, dtype))
    return statistics.median(ours_t), statistics.median(timm_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(
        f"ViT forward+backward, batch {args.batch}, CPU, torch {torch.__version__}, "
        f"timm {timm.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<24} {'precision':<10} {'ours s':>8} {'timm s':>8} {'ours/timm':>10}")
    for name in args.models:
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            ours, reference = compare(name, args.batch, dtype, args.repeats)
            print(
                f"{name:<24} {label:<10} {ours:>8.3f} {reference:>8.3f} {ours / reference:>10.3f}"
            )


if __name__ == "__main__":
    main()
