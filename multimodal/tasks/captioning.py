"""Captioning: teacher-forced cross-entropy of the caption given the image (with CoCa's
contrastive loss when the model has a contrastive head); validation writes captions greedily
and scores them against every reference caption of the image: exact match, corpus BLEU-4,
ROUGE-L and CIDEr-D."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from multimodal.eval.caption_metrics import caption_metrics
from multimodal.models.captioner import Captioner
from multimodal.models.losses import caption_loss, clip_loss
from multimodal.tasks.base import OptimizedTask
from multimodal.tasks.language_modeling import IGNORE, check_vocabulary
from multimodal.tasks.optim import OptimConfig
from multimodal.train.prepare import BlockOptions
from text.generation import GenerationConfig

Batch = dict[str, Any]


def next_token_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) ids -> (B, T - 1) labels of positions 0..T-2 (the next token), IGNORE on padding."""
    return input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE)


def cut_at(row: Tensor, eos_id: int | None) -> list[int]:
    """The ids of a 1-D row up to, not including, its first `eos_id`."""
    ids = row.tolist()
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def normalize_caption(text: str) -> str:
    """Lower-case, whitespace collapsed: what exact match compares."""
    return " ".join(text.lower().split())


class Captioning(OptimizedTask):
    """Train a `Captioner` on image-caption batches (`images`, `input_ids` BOS ... EOS,
    `attention_mask`; validation also reads `references`, every caption of each image).

    Args:
        model: the captioner (CoCa-style when built with a text tower).
        optim: optimiser and schedule.
        label_smoothing: of the caption cross-entropy.
        contrastive_weight: weight of the CLIP loss of a CoCa-style model (CoCa: 1).
        aux_loss_weight: weight of the decoder's mixture-of-experts balance loss.
        generation: how validation captions are written (None: `Captioner.generate`'s
            default, greedy up to the decoder's max_positions).
        val_generate: write and score captions in validation (exact match).
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
    """

    def __init__(
        self,
        model: Captioner,
        *,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        contrastive_weight: float = 1.0,
        aux_loss_weight: float = 0.01,
        generation: GenerationConfig | None = None,
        val_generate: bool = True,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight={contrastive_weight} must be >= 0")
        self.save_hyperparameters(ignore=["model"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.model = model
        self.optim = optim or OptimConfig()
        self.label_smoothing = label_smoothing
        self.contrastive_weight = contrastive_weight
        self.aux_loss_weight = aux_loss_weight
        self.generation = generation
        self.val_generate = val_generate
        self.val_exact_match = MeanMetric()
        self._val_captions: list[tuple[str, list[str]]] = []

    def setup(self, stage: str) -> None:
        check_vocabulary(self, self.model.decoder.config.vocab_size)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """The caption loss, and the contrastive loss of a CoCa-style model."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = self.model(batch["images"], ids[:, :-1], mask[:, :-1])
        losses = {
            "caption_loss": caption_loss(
                out.logits.float(),
                next_token_labels(ids, mask),
                label_smoothing=self.label_smoothing,
                ignore_index=IGNORE,
            )
        }
        loss = losses["caption_loss"] + self.aux_loss_weight * out.aux_loss
        if out.image_features is not None:
            # the text tower sees the caption without its last token: the decoder's input
            losses["contrastive_loss"] = clip_loss(
                out.image_features.float(), out.text_features.float(), out.logit_scale
            )
            loss = loss + self.contrastive_weight * losses["contrastive_loss"]
        losses["loss"] = loss
        return losses

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        for name, value in losses.items():
            self.log(
                f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["images"])
            )
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses = self.losses(batch)
        for name, value in losses.items():
            self.log(
                f"val/{name}",
                value,
                prog_bar=name == "loss",
                sync_dist=True,
                batch_size=len(batch["images"]),
            )
        if not self.val_generate:
            return
        captions = self.write_captions(batch["images"])
        references = batch.get("references") or [
            [text]
            for text in self.decode(batch["input_ids"][:, 1:])  # after BOS
        ]
        matches = [
            normalize_caption(c) in {normalize_caption(r) for r in refs}
            for c, refs in zip(captions, references, strict=True)
        ]
        self.val_exact_match.update(torch.tensor(matches, dtype=torch.float))
        self._val_captions += list(zip(captions, references, strict=True))
        self.log(
            "val/exact_match", self.val_exact_match, prog_bar=True, batch_size=len(batch["images"])
        )

    def on_validation_epoch_start(self) -> None:
        self._val_captions = []

    def on_validation_epoch_end(self) -> None:
        """Corpus BLEU-4, ROUGE-L and CIDEr-D of the epoch's captions (all ranks' captions:
        corpus metrics are not means of per-rank values)."""
        pairs = self._val_captions
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, pairs)  # our own ranks' strings
            pairs = [pair for part in gathered for pair in part]
        if not pairs or self.trainer.sanity_checking:
            return
        candidates, references = zip(*pairs, strict=True)
        metrics = caption_metrics(list(candidates), [list(r) for r in references])
        for name in ("bleu_4", "rouge_l", "cider_d"):
            self.log(f"val/{name}", metrics[name])  # equal on every rank

    def write_captions(self, images: Tensor) -> list[str]:
        """Captions of a batch of images, decoded to text with the datamodule's tokenizer."""
        return self.decode(self.model.generate(images, self.generation).sequences)

    def decode(self, ids: Tensor) -> list[str]:
        """Token rows -> text, each cut at its first EOS (the padding after it may be a real
        token: CLIP pads with the id of "!")."""
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("validation captions need a datamodule with a `tokenizer`")
        return [tokenizer.decode(cut_at(row, self.model.decoder.config.eos_id)) for row in ids]
