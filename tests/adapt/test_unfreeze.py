"""Gradual unfreezing: which parameters train in which epoch, that frozen ones stay put, and
that a resumed run continues the schedule."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from multimodal.adapt.unfreeze import GradualUnfreezing
from multimodal.data import SyntheticSequenceDataModule
from multimodal.layers import TransformerConfig
from multimodal.tasks import CausalLM, OptimConfig
from multimodal.train.checkpoint_file import config_classes
from tests.helpers import cli_from_config, quiet_trainer
from text import DecoderLM, TextConfig

# a 2-block decoder with an untied head; names as the task holds them
EMBEDDINGS = {"model.embed.token.weight", "model.transformer.position_embedding.weight"}
TOP = {"model.transformer.norm.weight", "model.transformer.norm.bias", "model.lm_head.weight"}


def block(i: int) -> set[str]:
    parts = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    return {
        f"model.transformer.blocks.{i}.{p}.{kind}" for p in parts for kind in ("weight", "bias")
    }


# epoch -> trainable names, every_n_epochs=1, start_frozen=True (hand-written from ULMFiT's
# order: the top, then block 1, block 0, then the embeddings under them)
EXPECTED = {
    0: TOP,
    1: TOP | block(1),
    2: TOP | block(1) | block(0),
    3: TOP | block(1) | block(0) | EMBEDDINGS,
}


def tiny_task(**optim) -> CausalLM:
    torch.manual_seed(0)
    transformer = TransformerConfig(
        dim=16, n_layers=2, n_heads=2, causal=True, position="learned", max_positions=16
    )
    config = TextConfig(vocab_size=13, transformer=transformer, tie_embeddings=False)
    return CausalLM(DecoderLM(config), optim=OptimConfig(lr=1e-2, **optim))


def tiny_data() -> SyntheticSequenceDataModule:
    return SyntheticSequenceDataModule(
        n_symbols=8, min_length=2, max_length=4, n_train=16, n_val=4, batch_size=8
    )


class Recorder(Callback):
    """Per epoch: the trainable names at the first batch, and whether each parameter moved."""

    def __init__(self) -> None:
        self.trainable: dict[int, set[str]] = {}
        self.moved: dict[int, dict[str, bool]] = {}

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, *args) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.trainable:
            self.trainable[epoch] = {n for n, p in module.named_parameters() if p.requires_grad}
            self._start = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        self.moved[trainer.current_epoch] = {
            n: not torch.equal(p.detach(), self._start[n]) for n, p in module.named_parameters()
        }


def fit(task: CausalLM, epochs: int, *callbacks: Callback, **kwargs) -> Trainer:
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )
    trainer.fit(task, datamodule=tiny_data())
    return trainer


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_trainable_sets_follow_the_schedule_and_frozen_stay_put(layer_decay):
    task = tiny_task(layer_decay=layer_decay, weight_decay=0.1)
    all_names = {n for n, _ in task.named_parameters()}
    assert EXPECTED[3] == all_names  # the hand table covers every parameter
    recorder = Recorder()
    trainer = fit(task, 4, GradualUnfreezing(every_n_epochs=1), recorder)
    assert recorder.trainable == EXPECTED
    for epoch, moved in recorder.moved.items():
        # frozen parameters do not change (no update, no weight decay); trainable ones do
        assert {n for n, m in moved.items() if m} == EXPECTED[epoch], epoch
    assert trainer.callback_metrics["adapt/trainable_params"] == sum(
        p.numel() for p in task.parameters()
    )
    assert all(p.requires_grad for p in task.parameters())  # given back after fit


def test_every_n_epochs_and_start_unfrozen():
    recorder = Recorder()
    fit(tiny_task(), 4, GradualUnfreezing(every_n_epochs=2, start_frozen=False), recorder)
    assert recorder.trainable == {0: EXPECTED[1], 1: EXPECTED[1], 2: EXPECTED[2], 3: EXPECTED[2]}


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_continues_the_schedule(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    fit(tiny_task(), 2, GradualUnfreezing(), checkpoints, enable_checkpointing=True)
    recorder = Recorder()
    trainer = quiet_trainer(
        max_epochs=4,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[GradualUnfreezing(), recorder],
    )
    with torch.serialization.safe_globals(list(config_classes())):  # as `multimodal fit` reads
        trainer.fit(tiny_task(), datamodule=tiny_data(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert recorder.trainable == {2: EXPECTED[2], 3: EXPECTED[3]}


def test_locked_parameters_stay_locked():
    # parameters frozen before fit (a locked tower) are not the callback's to unfreeze
    task = tiny_task()
    task.model.embed.requires_grad_(False)
    recorder = Recorder()
    fit(task, 4, GradualUnfreezing(), recorder)
    assert recorder.trainable[3] == EXPECTED[3] - {"model.embed.token.weight"}
    assert not task.model.embed.token.weight.requires_grad


def test_bad_every_n_epochs_names_the_field():
    with pytest.raises(ValueError, match="GradualUnfreezing.every_n_epochs"):
        GradualUnfreezing(every_n_epochs=0)


def test_yaml_turns_both_on(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["multimodal"])
    # the README's snippet, on top of a shipped config
    snippet = tmp_path / "adapt.yaml"
    snippet.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: multimodal.adapt.unfreeze.GradualUnfreezing\n"
        "      init_args: {every_n_epochs: 1}\n"
        "model:\n"
        "  init_args:\n"
        "    optim: {lr: 1e-4, layer_decay: 0.75}\n"
    )
    cli = cli_from_config(
        "text/gpt_reverse.yaml", "--config", str(snippet),
        "--trainer.max_steps", "1", "--trainer.precision", "32",
        "--data.init_args.n_train", "64", "--data.init_args.n_val", "8",
    )  # fmt: skip
    assert [type(c) for c in cli.trainer.callbacks].count(GradualUnfreezing) == 1
    cli.trainer.fit(cli.model, cli.datamodule)
    initial = sorted({g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups})
    # 2 blocks: top 1e-4, blocks 1e-4 * 0.75 and 0.75^2, embeddings 0.75^3
    assert initial == pytest.approx(sorted(1e-4 * 0.75**d for d in range(4)), rel=1e-12)
