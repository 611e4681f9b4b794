"""`init_from`: a MaskedLM's encoder starts a TextClassifier (encoder weights equal, head
fresh, a table of what was loaded), in Python and through configs/text/bert_classifier.yaml;
strict loading, prefix maps, shape mismatches and the file formats it reads."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

from multimodal.layers import TransformerConfig
from multimodal.tasks import MaskedLM, OptimConfig, TextClassifier
from multimodal.train.init_from import load_init_weights, map_keys
from tests.helpers import cli_from_config
from text import EncoderLM, TextConfig, train_tokenizer

ENCODER = TextConfig(
    vocab_size=50,
    n_segments=2,
    transformer=TransformerConfig(
        dim=16, n_layers=2, n_heads=2, position="learned", max_positions=16
    ),
)
ENCODER_PREFIX = {"encoder.": "encoder."}


def counts(table: str) -> dict[str, int]:
    """{row name: count} of a printed init_from table."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\w[\w ]*?)\s+(\d+)", table, re.M)}


@pytest.fixture
def mlm_checkpoint(tmp_path):
    """A Lightning-style checkpoint of a MaskedLM with next-sentence head, hyper-parameters
    holding a config dataclass (read through the weights-only allowlist)."""
    torch.manual_seed(1)
    mlm = MaskedLM(EncoderLM(ENCODER), next_sentence=True)
    with torch.no_grad():  # "pretrained": every weight unlike a fresh initialisation
        for parameter in mlm.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / "mlm.ckpt"
    torch.save({"state_dict": mlm.state_dict(), "hyper_parameters": {"optim": OptimConfig()}}, path)
    return mlm, path


def test_masked_lm_encoder_starts_a_classifier_with_a_fresh_head(mlm_checkpoint, capsys):
    mlm, path = mlm_checkpoint
    torch.manual_seed(2)
    fresh = TextClassifier(EncoderLM(ENCODER), 3)
    torch.manual_seed(2)
    task = TextClassifier(
        EncoderLM(ENCODER), 3, init_from=str(path), init_prefix_map=ENCODER_PREFIX
    )
    encoder = mlm.encoder.state_dict()
    assert task.encoder.state_dict().keys() == encoder.keys()
    for key, value in task.encoder.state_dict().items():
        assert torch.equal(value, encoder[key]), key
        assert not torch.equal(value, fresh.encoder.state_dict()[key]), key
    for key, value in task.head.state_dict().items():  # as built, untouched by the file
        assert torch.equal(value, fresh.head.state_dict()[key]), key
    table = capsys.readouterr().out
    heads = [k for k in mlm.state_dict() if not k.startswith("encoder.")]
    assert counts(table) == {
        "loaded": len(encoder),
        "missing": len(task.head.state_dict()),
        "unexpected": 0,
        "shape mismatch": 0,
        "not in prefix map": len(heads),
    }
    assert "head.classifier.weight" in table and str(path) in table
    assert "mlm_head." in table.split("not in prefix map")[1]


def test_strict_loading_names_the_keys_and_a_map_that_fits_nothing_fails(mlm_checkpoint):
    _, path = mlm_checkpoint
    with pytest.raises(
        ValueError, match=r"2 missing \(head\.classifier\.weight, head\.classifier\.bias\)"
    ):
        TextClassifier(EncoderLM(ENCODER), 3, init_from=str(path), init_strict=True,
                       init_prefix_map=ENCODER_PREFIX)  # fmt: skip
    with pytest.raises(ValueError, match="no key fits TextClassifier"):
        TextClassifier(EncoderLM(ENCODER), 3, init_from=str(path),
                       init_prefix_map={"decoder.": "encoder."})  # fmt: skip


def test_shape_mismatches_are_left_out_and_reported(mlm_checkpoint):
    _, path = mlm_checkpoint
    wider = TextConfig(vocab_size=60, n_segments=2, transformer=ENCODER.transformer)
    task = TextClassifier(EncoderLM(wider), 3)
    report = load_init_weights(task, path, prefix_map=ENCODER_PREFIX)
    assert report.mismatched == ["encoder.embed.token.weight: file (50, 16), model (60, 16)"]
    assert "encoder.embed.token.weight" not in report.loaded and report.loaded
    with pytest.raises(ValueError, match=r"shape mismatch \(encoder\.embed\.token\.weight"):
        load_init_weights(task, path, strict=True, prefix_map=ENCODER_PREFIX)


def test_plain_state_dicts_ddp_prefixes_and_safetensors_load(tmp_path):
    source = EncoderLM(ENCODER)
    target = TextClassifier(EncoderLM(ENCODER), 2)
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}  # DDP's prefix
    torch.save(state, tmp_path / "plain.pt")
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors"
    )
    for name, prefix_map in (("plain.pt", {"": "encoder."}), ("w.safetensors", {"": "encoder."})):
        report = load_init_weights(target, tmp_path / name, prefix_map=prefix_map)
        assert len(report.loaded) == len(source.state_dict()) and not report.unexpected
        for key, value in source.state_dict().items():
            assert torch.equal(target.encoder.state_dict()[key], value), key
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="is a text file, not a torch checkpoint"):
        load_init_weights(target, tmp_path / "notes.txt")


def test_longest_prefix_wins_and_unmapped_keys_are_kept_apart():
    state = {"a.b.w": torch.zeros(1), "a.x": torch.ones(1), "c.w": torch.ones(1)}
    mapped, unmapped = map_keys(state, {"a.": "z.", "a.b.": "y."})
    assert set(mapped) == {"y.w", "z.x"} and unmapped == ["c.w"]


def test_bert_classifier_config_starts_from_a_bert_mlm_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["multimodal"])
    lines = [f"{label}\tthe number {word}" for label, word in [("even", "two"), ("odd", "one")]]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join(lines * 8) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the number two is even.", "the number one is odd."] * 8))
    train_tokenizer([corpus], kind="wordpiece", vocab_size=80, min_frequency=1).save(
        tmp_path / "tok"
    )
    steps = ("--trainer.max_steps", "1", "--trainer.precision", "32", "--trainer.callbacks", "[]")
    mlm = cli_from_config(
        "text/bert_mlm.yaml", *steps,
        "--data.init_args.train_files", f"[{corpus}]",
        "--data.init_args.tokenizer", str(tmp_path / "tok"),
        "--data.init_args.batch_size", "4",
    )  # fmt: skip
    mlm.trainer.fit(mlm.model, mlm.datamodule)
    checkpoint = tmp_path / "mlm" / "last.ckpt"
    mlm.trainer.save_checkpoint(checkpoint)
    capsys.readouterr()
    classifier = cli_from_config(
        "text/bert_classifier.yaml", *steps,
        "--model.init_args.init_from", str(checkpoint),
        "--model.init_args.freeze_encoder", "true",
        "--data.init_args.train_file", str(tsv),
        "--data.init_args.tokenizer", str(tmp_path / "tok"),
        "--data.init_args.batch_size", "4",
    )  # fmt: skip
    table = capsys.readouterr().out
    classifier.trainer.fit(classifier.model, classifier.datamodule)
    assert classifier.trainer.global_step == 1
    assert counts(table)["loaded"] == len(mlm.model.encoder.state_dict())
    assert counts(table)["missing"] == 2 and counts(table)["unexpected"] == 0  # the fresh head
    trained = mlm.model.encoder.state_dict()
    for key, value in classifier.model.encoder.state_dict().items():  # frozen: still the MLM's
        assert torch.equal(value, trained[key]), key


def test_a_resumed_run_does_not_read_init_from_again(tmp_path, monkeypatch, capsys):
    from lightning.pytorch import LightningModule

    from multimodal.cli import main
    from multimodal.tasks.loading import instantiate_section
    from tests.helpers import CONFIGS

    monkeypatch.setattr("sys.argv", ["multimodal"])
    section = yaml.safe_load((CONFIGS / "text/gpt_reverse.yaml").read_text())["model"]
    init = tmp_path / "init.pt"
    torch.save(instantiate_section(section, LightningModule, "test").state_dict(), init)
    fit = ["fit", "--config", str(CONFIGS / "text/gpt_reverse.yaml"), "--run-name", "b",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
           "--trainer.limit_val_batches", "0", "--trainer.precision", "32",
           "--trainer.callbacks", str([{"class_path": "ModelCheckpoint",
                                        "init_args": {"save_last": True}}])]  # fmt: skip
    main([*fit, "--model.init_args.init_from", str(init), "--trainer.max_steps", "1"])
    assert f"init_from {init}" in capsys.readouterr().out
    init.unlink()  # resuming needs only the run's own checkpoint
    main([*fit, "--model.init_args.init_from", str(init), "--trainer.max_steps", "2",
          "--ckpt_path", "last"])  # fmt: skip
    out = capsys.readouterr().out
    assert "init_from" not in out and "steps 2" in out
