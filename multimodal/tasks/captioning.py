"""Captioning: teacher-forced cross-entropy of the caption given the image (with CoCa's
contrastive loss when the model has a contrastive head); validation writes captions greedily
and scores them against every reference caption of the image: exact match, corpus BLEU-4,
ROUGE-L and CIDEr-D."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from multimodal.adapt import AdaptConfig
from multimodal.eval.caption_metrics import bleu_caveats, caption_metrics
from multimodal.models.captioner import Captioner, CaptionerOutput
from multimodal.models.losses import caption_loss, clip_loss
from multimodal.tasks.accumulation import AccumulatingTask
from multimodal.tasks.language_modeling import IGNORE, check_vocabulary
from multimodal.tasks.optim import OptimConfig
from multimodal.train.accumulation import Embedded, grad_cache
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


class Captioning(AccumulatingTask):
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
        accumulate: train K consecutive batches as ONE batch of K x B (CoCa-style models
            only): the contrastive loss sees all K x B pairs (`multimodal.train.grad_cache`),
            the caption loss is the token mean over the K x B captions (exact), the experts'
            balance loss the mean of the K micro-batches'; one optimiser step per K batches.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `model` (`multimodal.adapt.AdaptConfig`: LoRA,
            bottleneck adapters, what stays trainable), applied after `init_from`; the `Captioner`.
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
        accumulate: int = 1,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight={contrastive_weight} must be >= 0")
        if accumulate > 1 and not model.contrastive:
            raise ValueError(
                f"accumulate={accumulate} needs a CoCa-style Captioner (text_tower): without a "
                "contrastive loss use the Trainer's accumulate_grad_batches"
            )
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
        self.init_accumulation(accumulate)
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.model)

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
            losses["contrastive_loss"] = clip_loss(  # this rank's batch alone in evaluation
                out.image_features.float(),
                out.text_features.float(),
                out.logit_scale,
                across_ranks=self.training,
            )
            loss = loss + self.contrastive_weight * losses["contrastive_loss"]
        losses["loss"] = loss
        return losses

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if self.accumulate > 1:
            batches = self.collect(batch, batch_idx)
            if batches is not None:  # the K-th micro-batch
                self.accumulated_step(batches)
            return None
        losses = self.losses(batch)
        for name, value in losses.items():
            self.log(
                f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["images"])
            )
        return losses["loss"]

    def accumulated_step(self, batches: list[Batch]) -> None:
        """One optimiser step on K micro-batches as one batch (manual optimisation)."""
        tokens = sum(int(self._labels(b).ne(IGNORE).sum()) for b in batches)  # of the K x B
        logged: dict[str, list[Tensor]] = {"caption_loss": [], "contrastive_loss": []}

        def embed(batch: Batch) -> Embedded:
            out = self._forward(batch)
            return Embedded((out.image_features, out.text_features), (out.logit_scale,))

        def forward(batch: Batch) -> Embedded:
            out = self._forward(batch)
            labels = self._labels(batch)
            share = labels.ne(IGNORE).sum() / tokens  # of the big batch's token mean
            caption = share * caption_loss(
                out.logits.float(),
                labels,
                label_smoothing=self.label_smoothing,
                ignore_index=IGNORE,
            )
            logged["caption_loss"].append(caption.detach())
            local = caption + self.aux_loss_weight * out.aux_loss / len(batches)
            return Embedded((out.image_features, out.text_features), (out.logit_scale,), local)

        def loss_fn(features: tuple[Tensor, ...], shared: tuple[Tensor, ...]) -> Tensor:
            loss = clip_loss(features[0], features[1], shared[0])
            logged["contrastive_loss"].append(loss.detach())
            return self.contrastive_weight * loss

        result = grad_cache(
            batches, forward, loss_fn, embed=embed, backward=self.backward_micro_batch
        )
        assert result.local_loss is not None
        size = sum(len(b["images"]) for b in batches)
        for name, values in logged.items():
            self.log(f"train/{name}", torch.stack(values).sum(), batch_size=size)
        self.log("train/loss", result.loss + result.local_loss, prog_bar=True, batch_size=size)
        self.optimizer_step_once()

    def _forward(self, batch: Batch) -> CaptionerOutput:
        """The model on a batch: the caption without its last token is the decoder's input."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return self.model(batch["images"], ids[:, :-1], mask[:, :-1])

    @staticmethod
    def _labels(batch: Batch) -> Tensor:
        return next_token_labels(batch["input_ids"], batch["attention_mask"])

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
        if "bleu_4" in (caveats := bleu_caveats(candidates)):
            rank_zero_warn(f"val/bleu_4 is {caveats['bleu_4']}")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict`: `keys` and the `caption` written for each image
        (`generation`, default greedy), as validation writes them."""
        return {"keys": batch["keys"], "caption": self.write_captions(batch["images"])}

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
