"""`FlopCounterMode` that also counts the CPU fused attention kernels, which torch's
FLOP table lacks (it has the CUDA flash / efficient / cuDNN ones): without them attention
would count zero FLOPs on CPU."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode counting matmuls, convolutions and attention on any device."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
