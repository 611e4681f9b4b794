"""The training system around the tasks: gradient accumulation, FSDP2, activation
checkpointing, compile, throughput and preflight estimates."""

from multimodal.train.throughput import ThroughputMonitor

__all__ = ["ThroughputMonitor"]
