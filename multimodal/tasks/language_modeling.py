"""Language-model training: causal (GPT), masked (BERT, with next-sentence prediction),
sequence-to-sequence (T5), and text classification.

Batches are the dicts of `multimodal.data.text`: token ids, a boolean attention mask (True =
real token) and labels with -100 where nothing is predicted.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from multimodal.adapt import AdaptConfig
from multimodal.tasks.base import OptimizedTask
from multimodal.tasks.classification import class_rows
from multimodal.tasks.optim import OptimConfig
from multimodal.train.prepare import BlockOptions
from text import (
    DecoderLM,
    EncoderDecoderLM,
    EncoderLM,
    MaskedLMHead,
    NextSentenceHead,
    SequenceClassificationHead,
)
from text.generation import GenerationConfig, generate

IGNORE = -100
Batch = dict[str, Tensor]


@runtime_checkable
class HasVocabulary(Protocol):
    """Datamodules whose token ids come from a vocabulary of known size."""

    vocab_size: int


def check_vocabulary(task: LightningModule, model_vocab: int) -> None:
    """Fail before training when the data's ids do not fit the model's embedding table."""
    datamodule = task.trainer.datamodule if task._trainer is not None else None
    if isinstance(datamodule, HasVocabulary) and datamodule.vocab_size > model_vocab:
        raise ValueError(
            f"the data has a vocabulary of {datamodule.vocab_size} ids but the model's "
            f"TextConfig.vocab_size is {model_vocab}: set it to at least {datamodule.vocab_size}"
        )


def left_padded(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) prompts and mask -> the same rows left-padded (what `generate`
    takes for prompts of different lengths)."""
    width = input_ids.shape[1]
    shift = width - attention_mask.sum(dim=1, keepdim=True)  # (B, 1) padding of each row
    index = (torch.arange(width, device=input_ids.device) - shift) % width  # (B, T)
    return input_ids.gather(1, index), attention_mask.bool().gather(1, index)


def token_rows(task: LightningModule, name: str, rows: Tensor, eos_id: int | None) -> dict:
    """(B, T) generated ids -> `{name}_ids` (each cut before its first EOS) and, when the
    datamodule has a tokenizer, `{name}` (their text)."""
    ids = [row[: row.index(eos_id)] if eos_id in row else row for row in rows.tolist()]
    out: dict[str, Any] = {f"{name}_ids": ids}
    tokenizer = _tokenizer(task)
    if tokenizer is not None:
        out[name] = [tokenizer.decode(row) for row in ids]
    return out


def _tokenizer(task: LightningModule) -> Any:
    datamodule = task.trainer.datamodule if task._trainer is not None else None
    return getattr(datamodule, "tokenizer", None)


def new_tokens(config: GenerationConfig | None, room: int) -> GenerationConfig:
    """`config`, or greedy decoding of at most 32 tokens that fit in `room` positions."""
    if config is not None:
        return config
    if room < 1:
        raise ValueError("the prompts fill the model's max_positions: nothing left to generate")
    return GenerationConfig(max_new_tokens=min(32, room))


class TokenPredictions(NamedTuple):
    logits: Tensor  # (B, T, vocab) scores of the token at each labelled position
    labels: Tensor  # (B, T), IGNORE where nothing is predicted
    extra_loss: Tensor  # added to the token loss (MoE balance, next-sentence prediction)


class TokenPredictionTask(OptimizedTask):
    """Shared loop of the language-model tasks: cross-entropy over labelled tokens, token
    accuracy and perplexity (torchmetrics), AdamW with warmup + cosine. A subclass says how a
    batch becomes `TokenPredictions`."""

    def __init__(self, vocab_size: int, optim: OptimConfig | None, label_smoothing: float) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.optim = optim or OptimConfig()
        self.label_smoothing = label_smoothing
        self.vocab_size = vocab_size
        self.train_acc = MulticlassAccuracy(vocab_size, ignore_index=IGNORE, average="micro")
        self.val_acc = MulticlassAccuracy(vocab_size, ignore_index=IGNORE, average="micro")
        self.val_ppl = Perplexity(ignore_index=IGNORE)

    def setup(self, stage: str) -> None:
        check_vocabulary(self, self.vocab_size)

    def predictions(self, batch: Batch) -> TokenPredictions:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits, labels, extra = self.predictions(batch)
        token_loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE,
            label_smoothing=self.label_smoothing,
        )
        self.train_acc(logits.flatten(0, 1), labels.flatten())
        self.log("train/loss", token_loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return token_loss + extra

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits, labels, _ = self.predictions(batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        self.val_acc(logits.flatten(0, 1), labels.flatten())
        self.val_ppl(logits.float(), labels)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/ppl", self.val_ppl)


class CausalLM(TokenPredictionTask):
    """Next-token prediction with a `DecoderLM`: position t predicts labels[t + 1].

    Args:
        model: the decoder.
        optim: optimiser and schedule.
        label_smoothing: of the token cross-entropy.
        aux_loss_weight: weight of the mixture-of-experts balance loss.
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `model` (`multimodal.adapt.AdaptConfig`:
            LoRA, bottleneck adapters, what stays trainable), applied after `init_from`.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
        generation: how `multimodal predict` continues prompts (default: greedy, at most 32
            new tokens within max_positions).
    """

    def __init__(
        self,
        model: DecoderLM,
        *,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.01,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__(model.config.vocab_size, optim, label_smoothing)
        self.save_hyperparameters(ignore=["model"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.model = model
        self.aux_loss_weight = aux_loss_weight
        self.generation = generation
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.model)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict`: `keys`, `continuation_ids` (the new tokens of each
        prompt, up to EOS) and `continuation` (their text, with a tokenizer)."""
        ids, mask = left_padded(batch["input_ids"], batch["attention_mask"])
        room = self.model.config.transformer.max_positions - ids.shape[1]
        out = generate(
            self.model, ids, attention_mask=mask, config=new_tokens(self.generation, room)
        )
        eos = self.model.config.eos_id
        return {"keys": batch["keys"], **token_rows(self, "continuation", out.sequences, eos)}

    def predictions(self, batch: Batch) -> TokenPredictions:
        out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        return TokenPredictions(out.logits[:, :-1], labels, self.aux_loss_weight * out.aux_loss)


class Seq2SeqLM(TokenPredictionTask):
    """Teacher-forced sequence-to-sequence training of an `EncoderDecoderLM` (plain pairs or
    span corruption: the datamodule decides).

    Args:
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `model` (`multimodal.adapt.AdaptConfig`:
            LoRA, bottleneck adapters, what stays trainable), applied after `init_from`.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
    """

    def __init__(
        self,
        model: EncoderDecoderLM,
        *,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.01,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__(model.config.vocab_size, optim, label_smoothing)
        self.save_hyperparameters(ignore=["model"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.model = model
        self.aux_loss_weight = aux_loss_weight
        self.generation = generation
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.model)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict`: `keys`, `output_ids` (the decoded tokens of each
        source, up to EOS) and `output` (their text, with a tokenizer)."""
        room = self.model.config.transformer.max_positions - 1  # after the decoder start
        out = generate(
            self.model,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            config=new_tokens(self.generation, room),
        )
        eos = self.model.config.eos_id
        return {"keys": batch["keys"], **token_rows(self, "output", out.sequences, eos)}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        start = getattr(datamodule, "decoder_start_id", self.model.decoder_start_id)
        if start != self.model.decoder_start_id:
            raise ValueError(
                f"the data starts decoding from id {start} but the model from "
                f"{self.model.decoder_start_id}: set EncoderDecoderLM(decoder_start_id={start})"
            )

    def predictions(self, batch: Batch) -> TokenPredictions:
        out = self.model(
            batch["input_ids"],
            batch["decoder_input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_attention_mask=batch["decoder_attention_mask"],
        )
        return TokenPredictions(out.logits, batch["labels"], self.aux_loss_weight * out.aux_loss)


class MaskedLM(TokenPredictionTask):
    """BERT pretraining: masked-token prediction, plus next-sentence prediction when the
    batches carry `next_sentence_label`.

    Args:
        encoder: the bidirectional encoder.
        next_sentence: add the next-sentence head and loss.
        optim: optimiser and schedule.
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `encoder` (`multimodal.adapt.AdaptConfig`: LoRA,
            bottleneck adapters, what stays trainable), applied after `init_from`; the MLM and
            next-sentence heads keep training.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
    """

    def __init__(
        self,
        encoder: EncoderLM,
        *,
        next_sentence: bool = False,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ) -> None:
        super().__init__(encoder.config.vocab_size, optim, label_smoothing)
        self.save_hyperparameters(ignore=["encoder"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.encoder = encoder
        tied = encoder.embed.token.weight if encoder.config.tie_embeddings else None
        self.mlm_head = MaskedLMHead(encoder.config.dim, encoder.config.vocab_size, tied)
        self.nsp_head = NextSentenceHead(encoder.config.dim) if next_sentence else None
        self.nsp_acc = MulticlassAccuracy(2, average="micro")
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.encoder)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict`: the [MASK] tokens of each prompt filled with the
        most likely token: `keys`, `filled_ids` (the prompt's ids, masks replaced),
        `predicted` (the token chosen for each mask, in order) and `filled` (the text)."""
        tokenizer = _tokenizer(self)
        if tokenizer is None or tokenizer.mask_id is None:
            raise ValueError("filling masks needs a datamodule whose tokenizer has [MASK]")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.encoder(ids, attention_mask=mask).hidden
        best = self.mlm_head(hidden).argmax(dim=-1)  # (B, T)
        masked = (ids == tokenizer.mask_id) & mask
        filled = torch.where(masked, best, ids)
        rows: dict[str, Any] = {"keys": batch["keys"], "filled_ids": [], "predicted": []}
        for row, is_mask, length in zip(filled, masked, mask.sum(dim=1).tolist(), strict=True):
            rows["filled_ids"].append(row[:length].tolist())
            rows["predicted"].append([tokenizer.decode([i]) for i in row[is_mask].tolist()])
        rows["filled"] = [tokenizer.decode(row) for row in rows["filled_ids"]]
        return rows

    def predictions(self, batch: Batch) -> TokenPredictions:
        out = self.encoder(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            segment_ids=batch.get("segment_ids"),
        )
        extra = out.aux_loss
        if self.nsp_head is not None:
            nsp_logits = self.nsp_head(out.hidden)
            target = batch["next_sentence_label"]
            nsp_loss = F.cross_entropy(nsp_logits.float(), target)
            self.nsp_acc(nsp_logits, target)
            stage = "train" if self.training else "val"
            self.log(f"{stage}/nsp_loss", nsp_loss, sync_dist=True)
            self.log(f"{stage}/nsp_acc", self.nsp_acc)
            extra = extra + nsp_loss
        return TokenPredictions(self.mlm_head(out.hidden), batch["labels"], extra)


class TextClassifier(OptimizedTask):
    """Sequence classification: an `EncoderLM`, pooling ("cls", "mean"), dropout, linear.

    Args:
        encoder: the bidirectional encoder.
        num_classes: classes.
        pooling: how token features become one vector.
        dropout: before the classifier.
        freeze_encoder: train only the head (feature-based use of a pretrained encoder).
        optim: optimiser and schedule.
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `encoder` (`multimodal.adapt.AdaptConfig`: LoRA,
            bottleneck adapters, what stays trainable), applied after `init_from`; the
            classification head keeps training: with nothing added this is a linear probe.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
    """

    def __init__(
        self,
        encoder: EncoderLM,
        num_classes: int,
        *,
        pooling: str = "cls",
        dropout: float = 0.1,
        freeze_encoder: bool = False,
        label_smoothing: float = 0.0,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.save_hyperparameters(ignore=["encoder"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.encoder = encoder.requires_grad_(not freeze_encoder)
        self.head = SequenceClassificationHead(
            encoder.out_dim, num_classes, pooling=pooling, dropout=dropout
        )
        self.label_smoothing = label_smoothing
        self.optim = optim or OptimConfig()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.encoder)

    def setup(self, stage: str) -> None:
        check_vocabulary(self, self.encoder.config.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids, attention_mask=attention_mask).hidden
        return self.head(hidden, attention_mask)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict`: `keys`, `class_index`, `probability` (softmax) and
        `class_name` when the datamodule has `label_names`."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "label_names", None)
        logits = self(batch["input_ids"], batch["attention_mask"])
        return {"keys": batch["keys"], **class_rows(logits, names)}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(
            logits.float(), batch["labels"], label_smoothing=self.label_smoothing
        )
        self.train_acc(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.val_acc(logits, batch["labels"])
        self.log("val/loss", F.cross_entropy(logits.float(), batch["labels"]), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
