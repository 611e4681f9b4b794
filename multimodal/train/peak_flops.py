"""Peak FLOP/s of a device: a table of dense tensor-core peaks for the data-centre GPUs we
train on, and a short matmul calibration on CPU (no published figure fits every CPU). Model
FLOPs utilisation (MFU) is achieved FLOP/s divided by this peak."""

from __future__ import annotations

import time
from functools import cache

import torch

# Dense (no sparsity) peak FLOP/s from NVIDIA's data sheets. "fp32" is the CUDA-core rate;
# "tf32" applies to fp32 matmuls when torch allows TF32 (float32_matmul_precision != "highest").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "h100": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "h100-pcie": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision ("bf16-mixed", "16-true", 32)."""
    text = str(precision or "32")
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    if text.startswith("64"):
        return torch.float64
    return torch.float32


def gpu_kind(device_name: str) -> str | None:
    """The PEAK_FLOPS key of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100")."""
    name = device_name.lower()
    if "h200" in name:
        return "h200"
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else "h100"
    if "a100" in name:
        return "a100"
    return None


def table_peak(kind: str, dtype: torch.dtype) -> float:
    """Peak FLOP/s of a PEAK_FLOPS device for matmuls in `dtype` (fp32 -> TF32 when allowed)."""
    if kind not in PEAK_FLOPS:
        raise ValueError(f"device={kind!r} must be one of {sorted(PEAK_FLOPS)} or 'cpu'")
    name = DTYPE_NAMES.get(dtype, "fp32")
    if name == "fp32" and torch.get_float32_matmul_precision() != "highest":
        name = "tf32"
    return PEAK_FLOPS[kind][name]


def measure_matmul_flops(
    dtype: torch.dtype = torch.float32, size: int = 1024, device: str | torch.device = "cpu"
) -> float:
    """FLOP/s of square `size` matmuls in `dtype` on `device` now: the best of three ~50 ms
    rounds, after a warm-up."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 0.05:
            a @ b
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        best = min(best, elapsed / n)
    return 2 * size**3 / best


@cache
def calibrated_cpu_peak(dtype: torch.dtype = torch.float32) -> float:
    """This process's CPU peak in `dtype` with the current torch thread count, measured once
    per process on square matmuls: 1024 wide in fp32 (smaller ones underrate a CPU 2-3x),
    256 or 512 in 16-bit dtypes (slow without AMX: 1024 would take seconds)."""
    if torch.finfo(dtype).bits > 16:
        return measure_matmul_flops(dtype, 1024)
    a = torch.randn(256, 256, dtype=dtype)
    a @ a  # warm-up
    start = time.perf_counter()
    a @ a
    fast = time.perf_counter() - start < 0.005
    return measure_matmul_flops(dtype, 512 if fast else 256)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` in `dtype`: the table for known GPUs, a calibration on CPU,
    None for other devices (MFU is then not reported)."""
    if device.type == "cpu":
        return calibrated_cpu_peak(dtype)
    if device.type == "cuda":
        kind = gpu_kind(torch.cuda.get_device_name(device))
        return None if kind is None else table_peak(kind, dtype)
    return None
