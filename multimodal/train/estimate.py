"""Preflight estimate of a training config: parameters, memory per device under DDP and FSDP2,
activations and FLOPs per sample, the largest batch that fits, and the step time at an assumed
MFU, without allocating the model.

The task is built from the config as `multimodal fit` builds it (LightningCLI, no Trainer) on
the meta device, then turned into fake tensors (`FakeTensorMode`: shapes and dtypes, no
memory) for one training step at two small batch sizes, made from one real sample of the
datamodule. Activation memory is what autograd saves for backward (each storage once, the
parameters left out; autocast's low-precision weight copies included), so it follows the
precision's autocast policy on CPU; FLOPs come from `FlopCounterMode` on the same step. Both
are linear in the batch (a CLIP loss's B x B logits are not, and are small).

Memory per device, AdamW: two states per trainable parameter (fp32, or the parameters' dtype
under "-true" precisions) and one more, transient, in its foreach step. DDP keeps the
parameters, gradients, optimiser state and, with more than one process, gradient buckets of
the size of the gradients (Lightning's default `gradient_as_bucket_view=False`). FSDP2
shards parameters, gradients and optimiser state over the world and adds the unsharded
working set: the parameters outside repeated blocks, and two of the largest blocks (the one
computing and the one prefetched) with their gradients. The peak adds the activations of the
batch to all of these, an upper bound: gradients fill while activations are freed.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torchmetrics import Metric

from multimodal.train.flop_count import flop_counter
from multimodal.train.peak_flops import PEAK_FLOPS, calibrated_cpu_peak, compute_dtype, table_peak

ADAM_STATES = 2
MEASURE_BATCHES = (2, 4)
GiB = 2**30
STRATEGIES = ("DDP", "FSDP2")


@dataclass
class StepMeasure:
    """Activation bytes saved for backward and FLOPs of one training step at `batch_size`."""

    batch_size: int
    activation_bytes: int
    flops: int


@dataclass
class Estimate:
    """What `estimate_config` found; the memory figures are bytes per device."""

    towers: dict[str, int]  # parameters per top-level module
    n_params: int
    n_trainable: int
    largest_block: int  # parameters of the largest repeated block (an FSDP2 unit)
    outside_blocks: int  # parameters outside any repeated block (the FSDP2 root unit)
    precision: str
    world_size: int
    batch_size: int  # per device, from the config
    activation_fixed: float  # bytes that do not grow with the batch
    activation_per_sample: float
    batch_bytes_per_sample: float  # the input batch itself
    flops_per_sample: float
    measures: list[StepMeasure] = field(default_factory=list)

    @property
    def param_bytes(self) -> int:
        """Bytes of one parameter: fp32 master weights unless the precision is "-true"."""
        return torch.finfo(self.param_dtype).bits // 8

    @property
    def param_dtype(self) -> torch.dtype:
        return compute_dtype(self.precision) if "true" in self.precision else torch.float32

    def states(self) -> dict[str, float]:
        """Unsharded bytes of parameters, gradients, optimiser state and the optimiser step's
        temporaries (foreach AdamW: the square root of the second moments)."""
        return {
            "parameters": self.n_params * self.param_bytes,
            "gradients": self.n_trainable * self.param_bytes,
            "optimizer": ADAM_STATES * self.n_trainable * self.param_bytes,
            "optimizer step": self.n_trainable * self.param_bytes,
        }

    def ddp_states(self) -> dict[str, float]:
        states = self.states()
        if self.world_size > 1:
            states["gradient buckets"] = states["gradients"]
        return states

    def fsdp_states(self) -> dict[str, float]:
        states = {k: v / self.world_size for k, v in self.states().items()}
        compute = torch.finfo(compute_dtype(self.precision)).bits // 8
        unit = 2 * self.largest_block * (compute + self.param_bytes)  # params + grads
        states["unsharded working set"] = self.outside_blocks * compute + unit
        return states

    def activations(self, batch_size: int) -> float:
        per_sample = self.activation_per_sample + self.batch_bytes_per_sample
        return self.activation_fixed + per_sample * batch_size

    def peak(self, strategy: str, batch_size: int) -> float:
        """Peak training bytes per device under "DDP" or "FSDP2" at `batch_size` per device."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {list(STRATEGIES)}")
        states = self.ddp_states() if strategy == "DDP" else self.fsdp_states()
        return sum(states.values()) + self.activations(batch_size)

    def largest_batch(self, strategy: str, memory: float) -> int:
        """The largest batch per device whose peak fits in `memory` bytes (0: none does)."""
        free = memory - self.peak(strategy, 0)
        per_sample = self.activation_per_sample + self.batch_bytes_per_sample
        return max(0, math.floor(free / per_sample)) if per_sample > 0 else 0


def parse_memory(text: str) -> float:
    """Bytes of "80GB" (10^9), "80GiB" (2^30), "512MiB", or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--device-memory={text!r}: expected a size such as 80GB or 141GiB")
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    return float(number) * (1024 if binary else 1000) ** power


class _ConfigOnlyCLI(LightningCLI):
    """LightningCLI that builds the model and data of a config but no Trainer (a Trainer
    would claim devices, or fail to on this machine, for flags such as --trainer.devices 8)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        return None


# datamodule arguments that make reading the one sample the estimate needs cheap
SMALL_DATA = {"batch_size": 2, "shuffle_buffer": 1, "num_workers": 0}


@dataclass
class Built:
    """What a config builds: the task on the meta device, a datamodule reading small batches,
    the trainer's arguments and the config's batch size per device (None if it has none)."""

    task: LightningModule
    datamodule: Any
    trainer: dict[str, Any]
    batch_size: int | None


def build_from_config(args: list[str]) -> Built:
    """The task (meta device) and data of `fit`'s arguments; the datamodule is built again
    with SMALL_DATA arguments where it takes them, so that one batch is quick to read."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _ConfigOnlyCLI(
            run=False, args=args, save_config_callback=None, parser_kwargs={"prog": "estimate"}
        )
        datamodule, batch_size = cli.datamodule, None
        data_args = cli.config["data"]["init_args"] if "data" in cli.config else None
        if data_args is not None:
            batch_size = data_args.get("batch_size")
            small = {k: v for k, v in SMALL_DATA.items() if k in data_args}
            if small:
                config = cli.config.clone()
                for key, value in small.items():
                    config["data"]["init_args"][key] = value
                datamodule = cli.parser.instantiate_classes(config)["data"]
    return Built(cli.model, datamodule, dict(cli.config["trainer"]), batch_size)


def world_size(trainer: dict[str, Any]) -> int:
    """Processes of a `--trainer.devices` / `--trainer.num_nodes` pair ("auto": 1 device)."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str):
        devices = devices.strip()
        devices = len(devices.split(",")) if "," in devices else devices
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and not devices.lstrip("-").isdigit():
        count = 1
    else:
        count = max(int(devices), 1)  # -1 = all devices: unknown here, 1
    return count * int(trainer.get("num_nodes") or 1)


def tower_parameters(task: nn.Module) -> dict[str, int]:
    """Parameters per top-level module (towers, projections, heads): grouped by the first part
    of their names, or by the first two when one child holds them all (`task.model`)."""
    named = list(task.named_parameters())
    tops = {name.split(".")[0] for name, _ in named}
    depth = 2 if len(tops) == 1 else 1
    groups: dict[str, int] = {}
    for name, param in named:
        key = ".".join(name.split(".")[:depth])
        groups[key] = groups.get(key, 0) + param.numel()
    return groups


def block_parameters(task: nn.Module) -> tuple[int, int]:
    """(parameters of the largest module inside an nn.ModuleList, parameters in none)."""
    largest, in_blocks = 0, set()
    for module in task.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                params = list(block.parameters())
                largest = max(largest, sum(p.numel() for p in params))
                in_blocks.update(id(p) for p in params)
    outside = sum(p.numel() for p in task.parameters() if id(p) not in in_blocks)
    return largest, outside


def one_batch(datamodule: Any) -> Any:
    """The first training batch of the datamodule (the estimate's input shapes)."""
    try:
        datamodule.setup("fit")
        return next(iter(datamodule.train_dataloader()))
    except (OSError, ValueError, StopIteration) as error:
        raise ValueError(
            f"the estimate reads one training batch for its shapes, and the data gave none "
            f"({type(error).__name__}: {error}); point the config's data at a few samples, e.g. "
            f"--data.init_args.train_urls DIR (any images of the right kind: they are resized)"
        ) from error


def batch_size_of(batch: Any) -> int:
    tensors = _tensors(batch)
    if not tensors:
        raise ValueError("the training batch holds no tensors")
    return len(tensors[0])


def _tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


def resize_batch(batch: Any, size: int, rows: int, convert) -> Any:
    """`batch` (of `rows` samples) as `size` copies of its first sample, tensors converted."""
    if isinstance(batch, Tensor):
        if batch.dim() and len(batch) == rows:
            return convert(batch[:1]).repeat(size, *[1] * (batch.dim() - 1))
        return convert(batch)
    if isinstance(batch, dict):
        return type(batch)({k: resize_batch(v, size, rows, convert) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if len(batch) == rows and not any(isinstance(v, Tensor) for v in batch):
            return type(batch)([batch[0]] * size)  # per-sample strings, lists
        return type(batch)(resize_batch(v, size, rows, convert) for v in batch)
    return batch


def _autocast(precision: str):
    if precision.endswith("-mixed"):
        return torch.autocast("cpu", dtype=compute_dtype(precision))
    return nullcontext()


@contextmanager
def saved_activations(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Bytes of every storage autograd saves for backward (once each), `exclude`d left out."""
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in exclude:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def to_fake(task: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """`task` (on the meta device) with fake CPU tensors in place, tied parameters (a tied
    embedding and output projection) still tied: `to_empty` gives each owner its own."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in task.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    with mode:
        task.to_empty(device="cpu")
    for (first, first_name), *others in owners.values():
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]
    return task


@contextmanager
def metrics_skipped(task: nn.Module) -> Iterator[None]:
    """torchmetrics metrics called in the step return 0 instead: they select entries by value
    (data-dependent shapes, which fake tensors cannot have) and hold no training memory."""
    metrics = [m for m in task.modules() if isinstance(m, Metric)]
    for metric in metrics:
        metric.forward = lambda *args, **kwargs: torch.zeros(())
    try:
        yield
    finally:
        for metric in metrics:
            del metric.forward


def measure_step(
    task: LightningModule, batch: Any, precision: str, sizes: tuple[int, ...]
) -> list[StepMeasure]:
    """Saved activations and FLOPs of the task's training step (forward + backward) on fake
    tensors at each batch size in `sizes`; `task`, on the meta device, becomes fake in place."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    rows = batch_size_of(batch)
    if precision.endswith("-true"):
        task = task.to(compute_dtype(precision))  # still on the meta device
    fake = to_fake(task, mode)
    params = {p.untyped_storage()._cdata for p in fake.parameters()}
    fake.train()
    results = []
    for size in sizes:
        step_batch = resize_batch(batch, size, rows, lambda t: mode.from_tensor(t))
        with (
            mode,
            metrics_skipped(fake),
            saved_activations(params) as saved,
            flop_counter() as counter,
        ):
            with _autocast(precision), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # self.log without a Trainer
                out = fake.training_step(step_batch, 0)
            loss = out["loss"] if isinstance(out, dict) else out
            activation = sum(saved.values())
            loss.backward()
        for param in fake.parameters():
            param.grad = None
        results.append(StepMeasure(size, activation, counter.get_total_flops()))
    return results


def estimate_config(args: list[str], sizes: tuple[int, int] = MEASURE_BATCHES) -> Estimate:
    """The estimate of a config and `fit`-style overrides (`--config X --trainer.devices 8`)."""
    built = build_from_config(args)
    task, trainer = built.task, built.trainer
    batch = one_batch(built.datamodule)
    precision = str(trainer.get("precision") or "32-true")
    small, large = measure_step(task, batch, precision, sizes)
    slope = (large.activation_bytes - small.activation_bytes) / (
        large.batch_size - small.batch_size
    )
    flops_slope = (large.flops - small.flops) / (large.batch_size - small.batch_size)
    rows = batch_size_of(batch)
    largest_block, outside = block_parameters(task)
    return Estimate(
        towers=tower_parameters(task),
        n_params=sum(p.numel() for p in task.parameters()),
        n_trainable=sum(p.numel() for p in task.parameters() if p.requires_grad),
        largest_block=largest_block,
        outside_blocks=outside,
        precision=precision,
        world_size=world_size(trainer),
        batch_size=built.batch_size or rows,
        activation_fixed=max(0.0, small.activation_bytes - slope * small.batch_size),
        activation_per_sample=slope,
        batch_bytes_per_sample=sum(t.nbytes for t in _tensors(batch)) / rows,
        flops_per_sample=flops_slope,
        measures=[small, large],
    )


def peak_for(device: str, precision: str) -> float:
    """Peak FLOP/s of one device of kind `device` ("cpu": calibrated here)."""
    dtype = compute_dtype(precision)
    return calibrated_cpu_peak(dtype) if device == "cpu" else table_peak(device, dtype)


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e6:10.2f} M"


def report(est: Estimate, memory: float, mfu: float, device: str) -> str:
    """The estimate as the text `multimodal estimate` prints."""
    lines = ["parameters"]
    lines += [f"  {name:<32}{_count(n)}" for name, n in est.towers.items()]
    lines += [
        f"  {'total':<32}{_count(est.n_params)}  ({_count(est.n_trainable).strip()} trainable)"
    ]
    lines.append(
        f"\nmemory per device: world size {est.world_size}, precision {est.precision}, "
        f"batch {est.batch_size} per device, AdamW"
    )
    b = est.batch_size
    for strategy, states in zip(STRATEGIES, (est.ddp_states(), est.fsdp_states()), strict=True):
        lines.append(f"  {strategy}")
        lines += [f"    {name:<28}{_gib(n)}" for name, n in states.items()]
        lines.append(f"    {f'activations (batch {b})':<28}{_gib(est.activations(b))}")
        lines.append(f"    {'peak':<28}{_gib(est.peak(strategy, b))}")
    lines.append("\nactivations (saved for backward, measured on fake tensors)")
    lines.append(f"  {'per sample':<30}{_mib(est.activation_per_sample)}")
    lines.append(f"  {'fixed (autocast weight copies)':<30}{_mib(est.activation_fixed)}")
    lines.append(f"  {'input batch per sample':<30}{_mib(est.batch_bytes_per_sample)}")
    lines.append("\nflops (forward + backward)")
    lines.append(f"  {'per sample':<30}{est.flops_per_sample / 1e9:10.2f} GFLOP")
    lines.append(
        f"  {'per step (batch ' + str(b) + ')':<30}{est.flops_per_sample * b / 1e12:10.3f} TFLOP"
    )
    lines.append(f"\nlargest batch per device in {memory / 1e9:.0f} GB ({memory / GiB:.1f} GiB)")
    largest = {s: est.largest_batch(s, memory) for s in STRATEGIES}
    lines += [f"  {s:<30}{n:10d}" for s, n in largest.items()]
    peak = peak_for(device, est.precision)
    lines.append(
        f"\nstep time at MFU {mfu:.0%} on {device} ({peak / 1e12:.1f} TFLOP/s peak "
        f"in {est.precision})"
    )
    for label, size in (("config batch", b), *((f"largest {s}", n) for s, n in largest.items())):
        if size:
            seconds = est.flops_per_sample * size / (mfu * peak)
            lines.append(f"  {f'{label} ({size})':<30}{seconds * 1e3:10.1f} ms")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`multimodal estimate --config X [fit flags] [--device-memory 80GB --mfu 0.4 --device
    h100]`: print the estimate."""
    parser = argparse.ArgumentParser(
        prog="multimodal estimate",
        description="Preflight estimate of a training config: parameters per tower, memory per "
        "device for DDP and FSDP2, activations and FLOPs per sample, the largest batch that "
        "fits and the step time at an assumed MFU, without allocating the model. Every "
        "`multimodal fit` flag is accepted (--config, --trainer.devices, --trainer.num_nodes, "
        "--trainer.precision, --model..., --data...); one training batch is read from the data.",
    )
    parser.add_argument("--device-memory", default="80GB", help="memory of one device (80GB)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the step time")
    parser.add_argument(
        "--device", default="h100", choices=[*sorted(PEAK_FLOPS), "cpu"], help="peak FLOP/s"
    )
    own, rest = parser.parse_known_args(argv)
    if not 0 < own.mfu <= 1:
        parser.error(f"--mfu={own.mfu} must be in (0, 1]")
    try:
        memory = parse_memory(own.device_memory)
        print(report(estimate_config(rest), memory, own.mfu, own.device))
    except ValueError as error:
        print(f"multimodal estimate: error: {error}", file=sys.stderr)
        return 2
    return 0
