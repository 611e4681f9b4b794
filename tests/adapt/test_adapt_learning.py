"""LoRA teaches a CLIP digits it never saw: the demo CLIP trained on 6 of the 10 digits, then
fine-tuned with configs/adapt/clip_lora.yaml (rank-4 LoRA, base frozen) on all 10, classifies
all 10 zero-shot with the held-out prompt templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multimodal.data.demo import demo_samples
from multimodal.data.shards import write_shards
from tests.helpers import cli_from_config, held_out_zeroshot

SEEN = 6  # digits 0-5 in the base run


def six_digit_shards(root: Path) -> Path:
    """The demo's training split with digits 0-5 only."""
    samples = (
        s for s in demo_samples() if s["json"]["split"] == "train" and s["json"]["label"] < SEEN
    )
    write_shards(samples, root, prefix="digits", progress=False)
    return root / "train"


def zeroshot_top1(task: torch.nn.Module, datamodule) -> tuple[float, float]:
    """Held-out-template zero-shot top-1 over the 10 digits on the val split: (all digits, the
    4 digits of the fine-tune only)."""
    right, labels = held_out_zeroshot(task.model, datamodule)
    assert len(labels) == 270
    return right.float().mean().item(), right[labels >= SEEN].float().mean().item()


@pytest.mark.slow
def test_lora_fine_tune_teaches_a_six_digit_clip_all_ten(demo_shards, tmp_path):
    data = [
        "--data.init_args.val_urls", str(demo_shards / "val"),
        "--data.init_args.num_workers", "0",
        "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    base = cli_from_config(
        "clip/digits.yaml",
        *data,
        "--data.init_args.train_urls", str(six_digit_shards(tmp_path / "six")),
        "--trainer.max_epochs", "24",
    )  # fmt: skip
    base.trainer.fit(base.model, base.datamodule)
    base_all, base_unseen = zeroshot_top1(base.model, base.datamodule)
    checkpoint = tmp_path / "base.ckpt"
    base.trainer.save_checkpoint(checkpoint)

    lora = cli_from_config(
        "adapt/clip_lora.yaml",
        *data,
        "--data.init_args.train_urls", str(demo_shards / "train"),
        "--model.init_args.init_from", str(checkpoint),
    )  # fmt: skip
    task = lora.model
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    total = sum(p.numel() for p in task.parameters())
    base_weights = {n: p.detach().clone() for n, p in task.named_parameters() if "lora_" not in n}
    lora.trainer.fit(task, lora.datamodule)
    tuned_all, tuned_unseen = zeroshot_top1(task, lora.datamodule)
    print(
        f"zero-shot top-1, 10 digits: base (6 digits) {base_all:.3f} -> LoRA {tuned_all:.3f}; "
        f"the 4 new digits {base_unseen:.3f} -> {tuned_unseen:.3f}; "
        f"{trainable} of {total} parameters trainable ({100 * trainable / total:.2f}%)"
    )
    assert trainable / total <= 0.02
    frozen = [n for n, p in task.named_parameters() if n in base_weights and not p.requires_grad]
    assert frozen and all(torch.equal(task.get_parameter(n), base_weights[n]) for n in frozen)
    assert base_unseen < 0.5  # the base run never saw digits 6-9
    assert tuned_all >= 0.9, (base_all, tuned_all, tuned_unseen)
