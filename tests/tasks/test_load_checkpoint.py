"""`Task.load_from_checkpoint(ckpt)` without arguments rebuilds every task of the configs from
the config a LightningCLI run keeps in its checkpoint, with outputs equal to the saved task's;
read weights-only; the arguments that only supply initial weights are not used again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from multimodal.tasks import (
    Captioning,
    CausalLM,
    ContrastivePretraining,
    ImageClassifier,
    MaskedLM,
    Seq2SeqLM,
    TextClassifier,
    VisualQuestionAnswering,
    load_task,
)
from tests.helpers import CONFIGS, quiet_trainer

IDS = torch.tensor([[1, 5, 7, 9, 3, 2, 0, 0], [1, 4, 4, 6, 8, 10, 11, 2]])  # (2, 8), ids < 15
MASK = IDS != 0
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# config -> (task class, the outputs compared)
CASES: dict[str, tuple[type, Callable]] = {
    "text/gpt_reverse.yaml": (CausalLM, lambda t: t.model(IDS, attention_mask=MASK).logits),
    "text/t5_reverse.yaml": (
        Seq2SeqLM,
        lambda t: t.model(IDS, IDS[:, :5], attention_mask=MASK).logits,
    ),
    "text/bert_mlm.yaml": (
        MaskedLM,
        lambda t: t.mlm_head(t.encoder(IDS, attention_mask=MASK).hidden),
    ),
    "text/bert_classifier.yaml": (TextClassifier, lambda t: t(IDS, MASK)),
    "vision/vit_digits.yaml": (ImageClassifier, lambda t: t(IMAGES)),
    "clip/digits.yaml": (
        ContrastivePretraining,
        lambda t: torch.cat([t.model.encode_image(IMAGES), t.model.encode_text(IDS, MASK)]),
    ),
    "caption/digits.yaml": (Captioning, lambda t: t.model(IMAGES, IDS, MASK).logits),
    "vqa/digits.yaml": (VisualQuestionAnswering, lambda t: t.model(IMAGES, IDS, MASK).logits),
}


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    """LightningCLI(args=...) warns when the process has command-line arguments (pytest's)."""
    monkeypatch.setattr("sys.argv", ["multimodal"])


def saved_run(config: str, path: Path, **init_args) -> torch.nn.Module:
    """The model section of configs/<config> built by LightningCLI (as `multimodal fit`
    builds it) and saved by its Trainer to `path`."""
    section = yaml.safe_load((CONFIGS / config).read_text())["model"]
    section["init_args"].update({"init_from": None, **init_args})  # no MLM run to start from
    cli = LightningCLI(
        run=False,
        args={"model": section, "trainer": {"logger": False, "enable_progress_bar": False}},
        save_config_callback=None,
    )
    trainer = quiet_trainer()
    trainer.strategy.connect(cli.model)
    trainer.save_checkpoint(path)
    return cli.model


@pytest.mark.parametrize("config", list(CASES))
def test_every_task_loads_from_its_checkpoint_alone(config, tmp_path):
    cls, outputs = CASES[config]
    path = tmp_path / "last.ckpt"
    saved = saved_run(config, path).eval()
    assert type(saved) is cls
    loaded = cls.load_from_checkpoint(path).eval()
    assert type(loaded) is cls
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded), outputs(saved), rtol=0, atol=0)
    assert loaded.hparams == saved.hparams  # the rebuilt task can be saved and rebuilt again


def test_init_from_is_not_applied_again_and_a_wrong_class_is_named(tmp_path, capsys):
    first = tmp_path / "first.ckpt"
    saved_run("text/gpt_reverse.yaml", first)
    second = tmp_path / "second.ckpt"
    saved = saved_run("text/gpt_reverse.yaml", second, init_from=str(first)).eval()
    assert "init_from" in capsys.readouterr().out
    first.unlink()  # the rebuilt task needs only its own checkpoint
    loaded = load_task(second).eval()
    assert "init_from" not in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, saved.model(IDS).logits)
    with pytest.raises(TypeError, match="holds a CausalLM, not a MaskedLM"):
        MaskedLM.load_from_checkpoint(second)


def test_a_python_built_task_needs_its_model_or_config(tmp_path):
    from text import DecoderLM

    section = yaml.safe_load((CONFIGS / "text/gpt_reverse.yaml").read_text())["model"]
    cli = LightningCLI(run=False, args={"model": section}, save_config_callback=None)
    task = CausalLM(cli.model.model)  # built in Python: the model is an object, not config
    trainer = quiet_trainer()
    trainer.strategy.connect(task)
    path = tmp_path / "python.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="holds no task config"):
        CausalLM.load_from_checkpoint(path)
    twin = DecoderLM(cli.model.model.config)
    loaded = CausalLM.load_from_checkpoint(path, model=twin).eval()  # Lightning's own route
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, task.eval().model(IDS).logits)
