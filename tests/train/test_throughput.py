"""ThroughputMonitor: FLOPs counted against the 6 x params x tokens (+ attention) rule,
the documented keys logged for dict and tuple batches, rates consistent with the batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from multimodal.layers import TransformerConfig
from multimodal.tasks import CausalLM, ImageClassifier
from multimodal.train import ThroughputMonitor
from multimodal.train.peak_flops import PEAK_FLOPS, calibrated_cpu_peak, gpu_kind
from multimodal.train.throughput import count_batch
from tests.helpers import quiet_trainer
from text import DecoderLM, TextConfig
from vision import ViT, ViTConfig

KEYS = ("samples_per_sec", "tflops_per_sec", "mfu", "step_time", "data_wait")
SEQ, DIM, LAYERS = 128, 64, 2


def fit(task, loader, callback: ThroughputMonitor, steps: int = 4) -> dict[str, float]:
    trainer = quiet_trainer(
        max_steps=steps, log_every_n_steps=1, precision="32-true", callbacks=[callback]
    )
    trainer.fit(task, loader)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def lm_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    ids = torch.randint(0, 128, (n, SEQ))
    rows = [{"input_ids": i, "attention_mask": torch.ones(SEQ, dtype=torch.bool), "labels": i}
            for i in ids]  # fmt: skip
    return DataLoader(rows, batch_size=batch_size)


def test_gpt_flops_are_six_n_t_plus_attention_and_keys_are_logged():
    transformer = TransformerConfig(
        dim=DIM, n_layers=LAYERS, n_heads=4, causal=True, position="rope", max_positions=SEQ
    )
    model = DecoderLM(TextConfig(vocab_size=128, transformer=transformer))
    callback = ThroughputMonitor()
    metrics = fit(CausalLM(model), lm_loader(), callback)

    # matmul weights (the tied embedding counts once: it is the output projection's matmul)
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    attention = 12 * LAYERS * SEQ * DIM  # per token: QK^T and AV, forward + backward
    expected = (6 * n + attention) * SEQ
    assert callback.flops_per_sample == pytest.approx(expected, rel=0.1)
    assert abs(callback.flops_per_sample - 6 * n * SEQ) > 0.15 * expected  # attention counted

    for scope in ("throughput", "throughput/device"):
        for key in (*KEYS, "text_tokens_per_sec"):
            assert f"{scope}/{key}" in metrics
        assert f"{scope}/image_tokens_per_sec" not in metrics  # no images in the batch
    # every mask is full: SEQ real tokens per sample; one process: global = device
    assert metrics["throughput/text_tokens_per_sec"] == pytest.approx(
        SEQ * metrics["throughput/samples_per_sec"]
    )
    assert metrics["throughput/samples_per_sec"] == metrics["throughput/device/samples_per_sec"]
    assert metrics["throughput/samples_per_sec"] == pytest.approx(
        4 / metrics["throughput/step_time"]
    )
    tflops = callback.flops_per_sample * metrics["throughput/samples_per_sec"] / 1e12
    assert metrics["throughput/tflops_per_sec"] == pytest.approx(tflops)
    peak = calibrated_cpu_peak(torch.float32)
    assert metrics["throughput/mfu"] == pytest.approx(tflops * 1e12 / peak)
    assert 0 <= metrics["throughput/data_wait"] < 1


def test_tuple_image_batches_log_image_tokens():
    config = ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2, pool="avg",
                       class_token=False)  # fmt: skip
    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    callback = ThroughputMonitor(peak_flops=1e12)
    metrics = fit(ImageClassifier(ViT(config), 10), DataLoader(data, batch_size=4), callback)
    for key in (*KEYS, "image_tokens_per_sec"):
        assert f"throughput/{key}" in metrics
    assert "throughput/text_tokens_per_sec" not in metrics
    patches = (16 // 4) ** 2
    assert metrics["throughput/image_tokens_per_sec"] == pytest.approx(
        patches * metrics["throughput/samples_per_sec"]
    )
    assert metrics["throughput/mfu"] == pytest.approx(metrics["throughput/tflops_per_sec"])


def test_count_batch_formats():
    images = torch.zeros(3, 3, 32, 48)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    counts = count_batch(
        {"images": images, "input_ids": mask.long(), "attention_mask": mask}, (8, 8)
    )
    assert (counts.samples, counts.image_tokens, int(counts.text_tokens)) == (3, 3 * 4 * 6, 6)
    counts = count_batch((images, torch.zeros(3)), (16, 16))
    assert (counts.samples, counts.image_tokens, counts.text_tokens) == (3, 3 * 2 * 3, 0)
    counts = count_batch((torch.zeros(5, 7, dtype=torch.long), torch.zeros(5)), None)
    assert (counts.samples, counts.image_tokens, counts.text_tokens) == (5, 0, 35)


def test_gpu_names_map_to_the_table():
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_kind("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_kind("NVIDIA H200") == "h200"
    assert gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_kind("Tesla T4") is None
    assert all(peaks["bf16"] > peaks["tf32"] > peaks["fp32"] for peaks in PEAK_FLOPS.values())


def test_ddp_logs_device_and_global_figures():
    """Two gloo processes in lockstep: the global rates are the sum of two nearly equal
    per-device rates, the token/sample ratio survives the reduction, MFU uses both peaks."""
    transformer = TransformerConfig(dim=32, n_layers=1, n_heads=2, causal=True, position="rope")
    task = CausalLM(DecoderLM(TextConfig(vocab_size=128, transformer=transformer)))
    callback = ThroughputMonitor(peak_flops=1e9)
    trainer = quiet_trainer(
        max_steps=4, log_every_n_steps=2, precision="32-true", callbacks=[callback],
        strategy="ddp_fork", devices=2,
    )  # fmt: skip
    trainer.fit(task, lm_loader(n=32))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    device, total = (
        metrics["throughput/device/samples_per_sec"],
        metrics["throughput/samples_per_sec"],
    )
    assert total == pytest.approx(2 * device, rel=0.25)
    assert metrics["throughput/text_tokens_per_sec"] == pytest.approx(SEQ * total)
    assert metrics["throughput/mfu"] == pytest.approx(
        metrics["throughput/tflops_per_sec"] * 1e12 / (2 * 1e9)
    )
    assert metrics["throughput/device/mfu"] == pytest.approx(
        metrics["throughput/device/tflops_per_sec"] * 1e12 / 1e9
    )
