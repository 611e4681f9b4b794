"""Every task takes `adapt`: built from the configs (as `multimodal fit` builds them) with LoRA,
only the adapted parameters train, a 2-step fit changes nothing else, and a checkpoint of an
adapted task reloads with equal outputs; `init_from` loads base weights before adaptation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from multimodal.adapt import AdaptConfig, LoRAConfig, LoRALinear
from multimodal.models import CLIP
from multimodal.tasks import ContrastivePretraining, load_task
from tests.adapt.test_lora import randomize_lora, tiny_text, tiny_vit
from tests.helpers import CONFIGS, cli_from_config, quiet_trainer
from tests.tasks.test_load_checkpoint import CASES

ADAPTED_MODULE = {"text/bert_mlm.yaml": "encoder", "text/bert_classifier.yaml": "encoder"}


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    """LightningCLI(args=...) warns when the process has command-line arguments (pytest's)."""
    monkeypatch.setattr("sys.argv", ["multimodal"])


def build(section: dict) -> torch.nn.Module:
    """The task of a model section, built by LightningCLI as `multimodal fit` builds it."""
    cli = LightningCLI(
        run=False,
        args={"model": section, "trainer": {"logger": False, "enable_progress_bar": False}},
        save_config_callback=None,
    )
    return cli.model


def save(task: torch.nn.Module, path: Path) -> None:
    trainer = quiet_trainer()
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)


@pytest.mark.parametrize("config", list(CASES))
def test_every_task_adapts_and_reloads_from_its_checkpoint(config, tmp_path, capsys):
    cls, outputs = CASES[config]
    section = yaml.safe_load((CONFIGS / config).read_text())["model"]
    section["init_args"].update(init_from=None, adapt={"lora": {"rank": 2, "alpha": 4}})
    task = build(section)
    assert type(task) is cls
    assert "adapt: LoRA r=2 on" in capsys.readouterr().out
    prefix = ADAPTED_MODULE.get(config, "model") + "."
    lora = [n for n, _ in task.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")]
    assert lora and all(n.startswith(prefix) for n in lora)
    for name, p in task.named_parameters():
        if name.startswith(prefix):  # the adapted model: only LoRA trains
            assert p.requires_grad == (name in lora), name
    randomize_lora(task)  # the update shows in the outputs
    path = tmp_path / "last.ckpt"
    save(task, path)
    loaded = cls.load_from_checkpoint(path).eval()
    assert task.hparams["adapt"]["lora"]["rank"] == 2  # plain values, as LightningCLI saves
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded), outputs(task.eval()), rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in task.named_parameters() if p.requires_grad
    }


TINY_CLIP = """
model:
  class_path: multimodal.tasks.ContrastivePretraining
  init_args:
    optim: {lr: 0.01, warmup_steps: 0}
    model:
      class_path: multimodal.models.CLIP
      init_args:
        embed_dim: 16
        image_tower:
          class_path: vision.ViT
          init_args:
            config: {image_size: 32, patch_size: 8, dim: 32, n_layers: 2, n_heads: 2}
        text_tower:
          class_path: text.TextEncoder
          init_args:
            config:
              vocab_size: 30
              transformer: {dim: 32, n_layers: 2, n_heads: 2, max_positions: 8}
"""


def batches(n: int = 2, size: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "images": torch.randn(size, 3, 32, 32, generator=generator),
            "input_ids": torch.randint(1, 30, (size, 8), generator=generator),
            "attention_mask": torch.ones(size, 8, dtype=torch.bool),
        }
        for _ in range(n)
    ]


def test_yaml_adapt_with_init_from_fits_only_lora_and_train_also(tmp_path):
    base_config = tmp_path / "base.yaml"
    base_config.write_text(TINY_CLIP)
    base = cli_from_config(str(base_config)).model
    base_path = tmp_path / "base.ckpt"
    save(base, base_path)

    adapted_config = tmp_path / "adapt.yaml"
    section = yaml.safe_load(TINY_CLIP)
    section["model"]["init_args"].update(
        init_from=str(base_path),
        adapt={"lora": {"rank": 4, "alpha": 8, "targets": ["qkv", "proj"]}},
    )
    section["model"]["init_args"]["adapt"]["train_also"] = ["logit_scale"]
    adapted_config.write_text(yaml.safe_dump(section))
    cli = cli_from_config(str(adapted_config), "--trainer.max_steps", "2")
    task = cli.model
    assert AdaptConfig.from_dict(task.hparams["adapt"]) == AdaptConfig(
        lora=LoRAConfig(rank=4, alpha=8, targets=["qkv", "proj"]), train_also=["logit_scale"]
    )
    layers = [m for m in task.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 2 * 2  # towers x blocks x (qkv, proj)
    base_state = base.state_dict()
    for name, value in task.state_dict().items():  # init_from loaded into the plain model
        if "lora_" not in name:
            torch.testing.assert_close(value, base_state[name], rtol=0, atol=0)

    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in task.named_parameters() if "lora_" in n} | {
        "model.logit_scale"
    }
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    cli.trainer.fit(task, DataLoader(batches(), batch_size=None))
    assert cli.trainer.global_step == 2
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # 2 steps: B moves first, then A gets gradients

    path = tmp_path / "adapted.ckpt"
    cli.trainer.save_checkpoint(path)
    loaded = load_task(path).eval()
    images, ids = batches(1)[0]["images"], batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_image(images), task.eval().model.encode_image(images)
        )
        torch.testing.assert_close(loaded.model.encode_text(ids), task.model.encode_text(ids))


def test_a_python_built_adapted_task_reloads_with_its_model(tmp_path):
    config = AdaptConfig(lora=LoRAConfig(rank=2))
    task = ContrastivePretraining(CLIP(tiny_vit(), tiny_text(), embed_dim=16), adapt=config)
    randomize_lora(task)
    path = tmp_path / "python.ckpt"
    save(task, path)
    twin = CLIP(tiny_vit(seed=5), tiny_text(seed=5), embed_dim=16)
    loaded = ContrastivePretraining.load_from_checkpoint(path, model=twin).eval()
    images = batches(1)[0]["images"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_image(images), task.eval().model.encode_image(images)
        )


def test_tasks_built_in_python_take_adapt():
    config = AdaptConfig(lora=LoRAConfig(rank=2), train_also=["logit_scale"])
    task = ContrastivePretraining(CLIP(tiny_vit(), tiny_text(), embed_dim=16), adapt=config)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert "model.logit_scale" in trainable
    assert all("lora_" in n for n in trainable - {"model.logit_scale"})
    assert len(trainable) == 2 * 2 * 4 * 2 + 1  # towers x blocks x Linears x (A, B) + scale


def test_prefix_and_prompt_tuning_through_adapt_train_only_their_parameters_and_reload(tmp_path):
    config = AdaptConfig(
        prefix={"length": 3, "gate": True}, prompt={"length": 2, "towers": ["image_tower"]}
    )
    task = ContrastivePretraining(CLIP(tiny_vit(), tiny_text(), embed_dim=16), adapt=config)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(".kv_prefix." in n or n.endswith("prompt") for n in trainable)
    assert "model.image_tower.prompt" in trainable
    assert any(n.startswith("model.text_tower.") for n in trainable)  # prefixes in both towers
    with torch.no_grad():  # the prompt tokens and the gated prefixes: not yet the base's
        for p in task.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "prefix.ckpt"
    save(task, path)
    twin = CLIP(tiny_vit(seed=5), tiny_text(seed=5), embed_dim=16)
    loaded = ContrastivePretraining.load_from_checkpoint(path, model=twin).eval()
    images = batches(1)[0]["images"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_image(images), task.eval().model.encode_image(images)
        )
