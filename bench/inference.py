"""CPU inference of a CLIP image embedding (ViT-B/16 at 224 px as configs/clip/vit_b16.yaml,
projection, L2 norm): eager fp32 vs int8 (`multimodal.export.quantize`) vs ONNX Runtime (the
`multimodal export` ONNX graph) vs ONNX Runtime int8 (its `--int8` file), images/s and
ratios against eager fp32 measured in the same run (interleaved, median of repeats); never a
timed test. Needs the `export` extra for ONNX.

    python bench/inference.py            # ViT-B/16, 224 px, batch 32 (a few minutes on 2 cores)
    python bench/inference.py --small    # a 4-layer 192-wide ViT at 112 px, batch 8 (seconds)

Goals (issue 14): int8 >= 1.5x eager fp32, ONNX Runtime >= 1.2x (the int8 ONNX file has none).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from multimodal.export.export import ImageEmbedder, quantize_onnx, save_onnx
from multimodal.export.quantize import quantize_int8
from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig

GOALS = {"int8": 1.5, "onnxruntime": 1.2}  # ort int8: no goal, reported beside them


def vit_b16(small: bool) -> ViTConfig:
    """configs/clip/vit_b16.yaml's image tower, or a small one of the same kind."""
    if small:
        return ViTConfig(image_size=112, patch_size=16, dim=192, n_layers=4, n_heads=3,
                         pool="token", pre_norm=True, patch_bias=False, norm_eps=1e-5)  # fmt: skip
    return ViTConfig(image_size=224, patch_size=16, dim=768, n_layers=12, n_heads=12,
                     pool="token", pre_norm=True, patch_bias=False, norm_eps=1e-5)  # fmt: skip


def image_embedder(small: bool) -> ImageEmbedder:
    """A CLIP's image embedding; the text tower is a stub (it is not run)."""
    text = TextEncoder(
        TextConfig(vocab_size=16, transformer=TransformerConfig(dim=32, n_layers=1, n_heads=2))
    )
    embed_dim = 128 if small else 512
    return ImageEmbedder(CLIP(ViT(vit_b16(small)), text, embed_dim=embed_dim)).eval()


def onnx_runner(path: Path) -> Callable:
    """An ONNX Runtime session of the image file at `path` with as many threads as torch."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # idle ORT threads spin by default, which would steal the cores from the torch variants
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def seconds(run: Callable, images: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        run(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a small ViT at 112 px, batch 8")
    parser.add_argument("--batch", type=int, help="images a batch (32; --small: 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per variant (5)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    args = parser.parse_args()
    batch = args.batch or (8 if args.small else 32)
    torch.manual_seed(0)
    fp32 = image_embedder(args.small)
    size = fp32.model.image_tower.config.image_size
    images = torch.randn(batch, 3, size, size)
    variants: dict[str, Callable] = {"eager fp32": fp32, "int8": quantize_int8(fp32)}
    with tempfile.TemporaryDirectory() as folder:
        if not args.no_onnx:
            # exported as `multimodal export --format onnx --int8` does
            path = save_onnx(fp32, {"images": images[:2]}, Path(folder) / "image.onnx")
            variants["onnxruntime"] = onnx_runner(path)
            int8_path = quantize_onnx(path, Path(folder) / "image.int8.onnx")
            variants["ort int8"] = onnx_runner(int8_path)
        with torch.inference_mode():
            reference = fp32(images)
            for name, run in variants.items():  # warm-up, and how close each one is
                out = run(images)
                cosine = F.cosine_similarity(out.float(), reference).min().item()
                diff = (out.float() - reference).abs().max().item()
                print(f"{name:<12} min cosine vs fp32 {cosine:.5f}, max abs diff {diff:.2e}")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in tqdm(range(args.repeats), desc="timing", leave=False):
            for name, run in variants.items():  # interleaved: drifts in speed hit all alike
                times[name].append(seconds(run, images))
    print(
        f"\nCLIP image embedding, ViT {'small 112 px' if args.small else 'B/16 224 px'}, "
        f"batch {batch}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'variant':<12} {'s/batch':>8} {'images/s':>9} {'vs fp32':>8}  goal")
    base = statistics.median(times["eager fp32"])
    for name, values in times.items():
        median = statistics.median(values)
        goal = f">= {GOALS[name]}x" if name in GOALS else ""
        print(f"{name:<12} {median:>8.3f} {batch / median:>9.1f} {base / median:>7.2f}x  {goal}")


if __name__ == "__main__":
    main()
