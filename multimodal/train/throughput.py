"""Throughput and model FLOPs utilisation (MFU) of a training run, logged as it trains.

Written here rather than with Lightning's `ThroughputMonitor`: that one needs a
`flops_per_batch` attribute on every task, counts one kind of token, logs from rank 0 only
(the global figures are rank 0's times the world size), has no data-wait measure and no peak
for CPUs or for some H200 names. This callback counts the FLOPs itself, once, on the first
training step (`torch.utils.flop_counter.FlopCounterMode`, forward + backward), and reduces
each rank's figures across ranks at every logging step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from timm.layers import PatchEmbed as TimmPatchEmbed
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from multimodal.train.flop_count import flop_counter
from multimodal.train.peak_flops import compute_dtype, device_peak_flops
from vision.patch_embed import PatchEmbed

# (ids, mask) key pairs whose real tokens count as text tokens
TEXT_KEYS = (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask"))
IMAGE_KEYS = ("images", "pixel_values")


def find_patch_size(model: nn.Module) -> tuple[int, int] | None:
    """(height, width) of the image patches of the first patch embedding in `model` (ours or
    timm's), None for models without one (text models, CNNs)."""
    for module in model.modules():
        if isinstance(module, PatchEmbed):
            return module.patch_size, module.patch_size
        if isinstance(module, TimmPatchEmbed):
            height, width = module.patch_size
            return int(height), int(width)
    return None


@dataclass
class BatchCounts:
    """What one batch holds: samples, image patches, and real text tokens (a 0-d tensor on
    the batch's device, so that counting it does not wait for the device)."""

    samples: int
    image_tokens: int
    text_tokens: Tensor | int


def _images_of(batch: Any) -> Tensor | None:
    if isinstance(batch, dict):
        return next((batch[k] for k in IMAGE_KEYS if isinstance(batch.get(k), Tensor)), None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0] if batch[0].dim() == 4 else None
    return None


def count_batch(batch: Any, patch_size: tuple[int, int] | None) -> BatchCounts:
    """Samples, image tokens (patches of every image) and text tokens (ones of the attention
    masks, or every id without a mask) of a dict batch, an `(inputs, labels)` tuple or a
    tensor; the sample count is the first dimension of the images or the first tensor."""
    images = _images_of(batch)
    text_tokens: Tensor | int = 0
    if isinstance(batch, dict):
        for ids_key, mask_key in TEXT_KEYS:
            mask, ids = batch.get(mask_key), batch.get(ids_key)
            if isinstance(mask, Tensor):
                text_tokens = text_tokens + mask.sum()
            elif isinstance(ids, Tensor):
                text_tokens = text_tokens + ids.numel()
        first = images if images is not None else batch.get("input_ids")
        if first is None:
            first = next((v for v in batch.values() if isinstance(v, Tensor)), None)
    elif isinstance(batch, (tuple, list)):
        first = next((v for v in batch if isinstance(v, Tensor)), None)
        if first is not None and images is None and not first.is_floating_point():
            text_tokens = first.numel()  # (ids, labels) tuples
    else:
        first = batch if isinstance(batch, Tensor) else None
    samples = 0 if first is None else len(first)
    image_tokens = 0
    if images is not None and patch_size is not None:
        height, width = images.shape[-2:]
        image_tokens = samples * (height // patch_size[0]) * (width // patch_size[1])
    return BatchCounts(samples, image_tokens, text_tokens)


class ThroughputMonitor(Callback):
    """Logs training throughput every `log_every_n_steps` optimizer steps.

    Keys (`throughput/...` summed or averaged over ranks, `throughput/device/...` this rank's):
    `samples_per_sec`, `image_tokens_per_sec` (patches), `text_tokens_per_sec` (real tokens
    from the attention masks), `tflops_per_sec`, `mfu` (achieved / peak FLOP/s), `step_time`
    (seconds per optimizer step, batch end to batch end), `data_wait` (the fraction of that
    time between a batch end and the next batch start: loading and host-to-device copy).
    Rates are over the window since the last log; the first step of every epoch and
    validation runs are left out. Keys that do not apply (no images, unknown peak) are not
    logged.

    FLOPs are counted once, on the first training batch, as forward + backward FLOPs per
    sample (recomputation under activation checkpointing counts too), and assumed the same
    for later batches. The peak is `peak_flops` when given, else the table of
    `multimodal.train.peak_flops` for A100/H100/H200 or a matmul calibration on CPU, in the
    dtype of the Trainer's precision.

    Args:
        peak_flops: peak FLOP/s of one device, overriding the table and the calibration.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        super().__init__()
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops={peak_flops} must be > 0")
        self.peak_flops = peak_flops
        self.flops_per_sample: float | None = None
        self.metrics: dict[str, float] = {}  # the last logged values
        self._peak: float | None = None
        self._patch_size: tuple[int, int] | None = None
        self._counter: FlopCounterMode | None = None
        self._counted_samples = 0
        self._prev_end: float | None = None
        self._batch_start = 0.0
        self._step_before = 0
        self._val_start = 0.0
        self._reset_window()

    def _reset_window(self) -> None:
        self._steps = 0
        self._time = 0.0
        self._wait = 0.0
        self._samples = 0
        self._image_tokens = 0
        self._text_tokens: Tensor | int = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._patch_size = find_patch_size(pl_module)
        dtype = compute_dtype(trainer.precision)
        self._peak = self.peak_flops or device_peak_flops(trainer.strategy.root_device, dtype)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prev_end = None  # the loader restarts: not a step of the steady state

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()
        self._step_before = trainer.global_step
        if self.flops_per_sample is None and self._counter is None:
            self._counter = flop_counter()
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counts = count_batch(batch, self._patch_size)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            flops = self._counter.get_total_flops()
            self._counter = None
            self.flops_per_sample = flops / max(counts.samples, 1)
        stepped = trainer.global_step > self._step_before
        # the Trainer's own test of whether this step goes to the loggers, as Lightning's
        # ThroughputMonitor reads it; the same on every rank, so the reduction below is too
        emit = stepped and trainer._logger_connector.should_update_logs
        if emit and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # time finished work only
        now = time.perf_counter()
        if self._prev_end is not None:
            self._steps += int(stepped)  # optimizer steps: micro-batches accumulate
            self._time += now - self._prev_end
            self._wait += self._batch_start - self._prev_end
            self._samples += counts.samples
            self._image_tokens += counts.image_tokens
            self._text_tokens = self._text_tokens + counts.text_tokens
        self._prev_end = now
        if emit and self._steps:  # ranks count the same steps: all log or none does
            self._log(trainer, pl_module)
            self._reset_window()

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = max(self._time, 1e-9)
        text_tokens = float(self._text_tokens)  # one device sync per window
        local = {
            "samples_per_sec": self._samples / elapsed,
            "image_tokens_per_sec": self._image_tokens / elapsed,
            "text_tokens_per_sec": text_tokens / elapsed,
            "tflops_per_sec": (self.flops_per_sample or 0.0) * self._samples / elapsed / 1e12,
            "step_time": elapsed / self._steps,
            "data_wait": self._wait / elapsed,
        }
        values = torch.tensor(list(local.values()), dtype=torch.float64)
        world = trainer.world_size
        if world > 1:
            device = trainer.strategy.root_device
            values = trainer.strategy.reduce(values.to(device), reduce_op="sum").cpu()
        total = dict(zip(local, values.tolist(), strict=True))
        for name in ("step_time", "data_wait"):  # means over ranks; the rates add up
            total[name] /= world
        keep = {"step_time", "data_wait", "samples_per_sec"}
        if self._image_tokens:
            keep.add("image_tokens_per_sec")
        if text_tokens:
            keep.add("text_tokens_per_sec")
        if self.flops_per_sample:
            keep.add("tflops_per_sec")
            if self._peak:
                local["mfu"] = local["tflops_per_sec"] * 1e12 / self._peak
                total["mfu"] = total["tflops_per_sec"] * 1e12 / (self._peak * world)
                keep.add("mfu")
        metrics = {f"throughput/{k}": v for k, v in total.items() if k in keep}
        metrics |= {f"throughput/device/{k}": v for k, v in local.items() if k in keep}
        self.metrics = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._prev_end is not None:  # leave the validation run out of the next step
            self._prev_end += time.perf_counter() - self._val_start

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
