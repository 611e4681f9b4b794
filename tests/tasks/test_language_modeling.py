"""Language-model tasks learn synthetic tasks and run on text files through their datamodules."""

from __future__ import annotations

import time

import pytest
import torch

from multimodal.data import SyntheticSequenceDataModule, TextFileDataModule, TextPairFileDataModule
from multimodal.layers import TransformerConfig
from multimodal.tasks import CausalLM, MaskedLM, OptimConfig, Seq2SeqLM, TextClassifier
from tests.helpers import fast_precision, quiet_trainer
from text import (
    DecoderLM,
    EncoderDecoderLM,
    EncoderLM,
    GenerationConfig,
    TextConfig,
    generate,
    train_tokenizer,
)

trainer = quiet_trainer


def reversal(objective: str) -> SyntheticSequenceDataModule:
    return SyntheticSequenceDataModule(
        task="reverse",
        objective=objective,
        n_symbols=10,
        min_length=4,
        max_length=8,
        n_train=6000,
        n_val=300,
        batch_size=64,
    )


OPTIM = OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.01)


@pytest.mark.slow
def test_decoder_learns_string_reversal_in_under_a_minute():
    data = reversal("causal")
    config = TextConfig(
        vocab_size=data.vocab_size,
        transformer=TransformerConfig(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            causal=True,
            position="rope",
            max_positions=32,
        ),
    )
    task = CausalLM(DecoderLM(config), optim=OPTIM)
    run = trainer(max_epochs=4, precision=fast_precision())
    start = time.perf_counter()
    run.fit(task, data)
    elapsed = time.perf_counter() - start
    assert run.callback_metrics["val/acc"] >= 0.95, dict(run.callback_metrics)
    print(f"reversal learned in {elapsed:.0f} s")


@pytest.mark.slow
def test_seq2seq_learns_string_reversal():
    data = reversal("seq2seq")
    config = TextConfig(
        vocab_size=data.vocab_size,
        bos_id=data.bos_id,
        transformer=TransformerConfig(
            dim=64, n_layers=2, n_heads=4, position="t5", max_positions=32, norm="rmsnorm"
        ),
    )
    task = Seq2SeqLM(EncoderDecoderLM(config), optim=OPTIM)
    run = trainer(max_epochs=4, precision=fast_precision())
    run.fit(task, data)
    assert run.callback_metrics["val/acc"] >= 0.95, dict(run.callback_metrics)
    # greedy generation reverses whole strings
    batch = next(iter(data.val_dataloader()))
    model = task.model.eval()
    out = generate(
        model,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        config=GenerationConfig(max_new_tokens=10, eos_id=data.eos_id, pad_id=data.pad_id),
    )
    exact = [
        out.sequences[i, : len(target)].tolist() == target
        for i, target in enumerate(
            [row[row != -100].tolist() for row in batch["labels"]]  # reversed string + EOS
        )
    ]
    assert sum(exact) / len(exact) >= 0.9, f"{sum(exact)}/{len(exact)} reversed exactly"


def test_moe_balance_loss_reaches_the_router():
    data = reversal("causal")
    config = TextConfig(
        vocab_size=data.vocab_size,
        transformer=TransformerConfig(
            dim=32, n_layers=1, n_heads=4, causal=True, n_experts=4, max_positions=32
        ),
    )
    task = CausalLM(DecoderLM(config), aux_loss_weight=1.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    task.predictions(batch).extra_loss.backward()
    router = task.model.transformer.blocks[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def write_corpus(path, n: int = 300) -> None:
    words = ["seven", "three", "digit", "photo", "handwritten", "number", "even", "odd", "blue"]
    g = torch.Generator().manual_seed(0)
    lines = [
        " ".join(
            words[i]
            for i in torch.randint(
                0, len(words), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g
            )
        )
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_masked_lm_with_next_sentence_trains_on_text_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    train_tokenizer([corpus], kind="wordpiece", vocab_size=120).save(tmp_path / "tok")
    data = TextFileDataModule(
        [str(corpus)],
        tokenizer=str(tmp_path / "tok"),
        objective="masked",
        next_sentence=True,
        max_length=32,
        batch_size=8,
    )
    config = TextConfig(
        vocab_size=128,
        n_segments=2,
        transformer=TransformerConfig(
            dim=32, n_layers=1, n_heads=4, position="learned", max_positions=32
        ),
    )
    task = MaskedLM(EncoderLM(config), next_sentence=True)
    run = trainer(max_steps=3, limit_val_batches=2)
    run.fit(task, data)
    trained = dict(run.callback_metrics)
    run.validate(task, data)
    assert {"train/loss", "train/nsp_loss"} <= set(trained)
    assert torch.isfinite(trained["train/loss"])
    assert {"val/acc", "val/ppl", "val/nsp_acc"} <= set(run.callback_metrics)


def test_vocabulary_mismatch_is_caught_before_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    train_tokenizer([corpus], kind="bpe", vocab_size=300).save(tmp_path / "tok")
    data = TextFileDataModule([str(corpus)], tokenizer=str(tmp_path / "tok"), max_length=16)
    config = TextConfig(
        vocab_size=100,
        transformer=TransformerConfig(dim=32, n_layers=1, n_heads=4, causal=True, max_positions=16),
    )
    with pytest.raises(ValueError, match="vocab_size is 100"):
        trainer(max_steps=1).fit(CausalLM(DecoderLM(config)), data)


def test_text_classifier_trains_on_tsv(tmp_path):
    numbers = {"even": ["two", "four", "six"], "odd": ["one", "three", "five"]}
    lines = [f"{label}\tthe number {numbers[label][i % 3]}" for i in range(30) for label in numbers]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    words = tmp_path / "words.txt"
    words.write_text("\n".join(line.split("\t")[1] for line in lines))
    train_tokenizer([words], kind="wordpiece", vocab_size=60, min_frequency=1).save(
        tmp_path / "tok"
    )
    data = TextPairFileDataModule(
        str(tsv), None, tokenizer=str(tmp_path / "tok"), objective="classification", batch_size=8
    )
    config = TextConfig(
        vocab_size=64,
        transformer=TransformerConfig(
            dim=32, n_layers=1, n_heads=4, position="learned", max_positions=32
        ),
    )
    task = TextClassifier(EncoderLM(config), num_classes=2, pooling="mean")
    run = trainer(max_steps=4, limit_val_batches=1)
    run.fit(task, data)
    assert "train/loss" in run.callback_metrics
    run.validate(task, data)
    assert "val/acc" in run.callback_metrics


def test_frozen_encoder_only_trains_the_head():
    config = TextConfig(
        vocab_size=20, transformer=TransformerConfig(dim=16, n_layers=1, n_heads=2, max_positions=8)
    )
    task = TextClassifier(EncoderLM(config), num_classes=3, freeze_encoder=True)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)


def test_span_corruption_pretraining_of_an_encoder_decoder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    train_tokenizer([corpus], kind="bpe", vocab_size=300).save(tmp_path / "tok")
    data = TextFileDataModule(
        [str(corpus)],
        tokenizer=str(tmp_path / "tok"),
        objective="span_corruption",
        max_length=32,
        batch_size=8,
        n_sentinels=10,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    sentinels = batch["input_ids"] >= data.tokenizer.vocab_size
    assert sentinels.any() and (batch["labels"] >= data.tokenizer.vocab_size).any()
    assert data.vocab_size == data.tokenizer.vocab_size + 10
    config = TextConfig(
        vocab_size=data.vocab_size,
        transformer=TransformerConfig(
            dim=32, n_layers=1, n_heads=4, position="t5", max_positions=48
        ),
    )
    model = EncoderDecoderLM(config, decoder_start_id=data.decoder_start_id)
    run = trainer(max_steps=2)
    run.fit(Seq2SeqLM(model), data)
    assert torch.isfinite(run.callback_metrics["train/loss"])
    with pytest.raises(ValueError, match="decoder_start_id"):
        trainer(max_steps=1).fit(Seq2SeqLM(EncoderDecoderLM(config, decoder_start_id=99)), data)
