"""The training system around the tasks: gradient accumulation, FSDP2, activation
checkpointing, compile, throughput and preflight estimates."""

from multimodal.train.accumulation import Embedded, GradCacheResult, grad_cache
from multimodal.train.checkpointing import apply_activation_checkpointing
from multimodal.train.compile import CompileOptions, CompileTimer, compile_blocks
from multimodal.train.fsdp import FSDP2Strategy, FSDPOptions, shard_model
from multimodal.train.prepare import BlockOptions, prepare_task
from multimodal.train.throughput import ThroughputMonitor

__all__ = [
    "BlockOptions",
    "CompileOptions",
    "CompileTimer",
    "FSDP2Strategy",
    "FSDPOptions",
    "apply_activation_checkpointing",
    "compile_blocks",
    "prepare_task",
    "shard_model",
    "Embedded",
    "GradCacheResult",
    "grad_cache",
    "ThroughputMonitor",
]
