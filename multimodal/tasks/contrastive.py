"""Contrastive image-text pretraining (CLIP's InfoNCE or SigLIP's sigmoid loss), correct under
DDP: features are gathered across ranks with their gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from multimodal.adapt import AdaptConfig
from multimodal.models.clip import ClipLike, CLIPOutput
from multimodal.models.itm import ITMHead, itm_pairs
from multimodal.models.losses import clip_loss, itm_loss, siglip_loss
from multimodal.tasks.accumulation import AccumulatingTask
from multimodal.tasks.base import StageStepTask
from multimodal.tasks.optim import OptimConfig
from multimodal.train.accumulation import Embedded, grad_cache
from multimodal.train.prepare import BlockOptions

LOSSES = ("clip", "siglip")
Batch = dict[str, Tensor]


def inbatch_accuracy(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Image -> text retrieval accuracy within the batch (not zero-shot classification)."""
    with torch.no_grad():
        similarity = image_features @ text_features.T  # (B, B)
        target = torch.arange(len(similarity), device=similarity.device)
        return (similarity.argmax(dim=1) == target).float().mean()


class ContrastivePretraining(AccumulatingTask, StageStepTask):
    """Train a CLIP-style model on image-caption batches (`images`, `input_ids`,
    `attention_mask`).

    Args:
        model: a `ClipLike` (our `CLIP`, `OpenCLIP`); for "siglip", built with
            `init_logit_bias` (e.g. -10).
        loss: "clip" (symmetric InfoNCE) or "siglip" (pairwise sigmoid).
        local_loss: CLIP loss of local features against the gathered ones (less memory,
            same gradients) instead of the full similarity matrix on every rank.
        gather_with_grad: gradients flow through the gathered features to every rank.
        optim: optimiser and schedule (no weight decay on the logit scale and bias).
        itm_head: an image-text matching head trained next to the contrastive loss (ALBEF):
            every pair, plus a hard negative text per image and a hard negative image per
            text drawn from this rank's similarities; needs a model returning token features.
        itm_weight: weight of the ITM loss.
        accumulate: train K consecutive batches as ONE batch of K x B for the contrastive
            loss (`multimodal.train.grad_cache`: exact big-batch loss and gradients, memory
            of one batch's activations, one optimiser step per K batches); not with itm_head
            or the Trainer's accumulate_grad_batches.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
        lock_image_tower, lock_text_tower: freeze that tower (LiT: a locked pretrained image
            tower, a text tower learning to read it); its projection into the joint space
            still trains, and the optimiser gets only trainable parameters.
        lock_image_unlocked_layers, lock_text_unlocked_layers: the locked tower's last N
            blocks (with what follows them: final norm, pooling) stay trainable.
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `model` (`multimodal.adapt.AdaptConfig`: LoRA,
            bottleneck adapters, what stays trainable), applied after `init_from`; the `ClipLike`;
            an `itm_head` keeps training.
    """

    def __init__(
        self,
        model: ClipLike,
        *,
        loss: str = "clip",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        optim: OptimConfig | None = None,
        itm_head: ITMHead | None = None,
        itm_weight: float = 1.0,
        accumulate: int = 1,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        lock_image_tower: bool = False,
        lock_image_unlocked_layers: int = 0,
        lock_text_tower: bool = False,
        lock_text_unlocked_layers: int = 0,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} must be one of {list(LOSSES)}")
        if loss == "siglip" and model.logit_bias is None:
            raise ValueError("loss='siglip' needs a CLIP built with init_logit_bias (e.g. -10)")
        if itm_weight < 0:
            raise ValueError(f"itm_weight={itm_weight} must be >= 0")
        if accumulate > 1 and itm_head is not None:
            raise ValueError(
                f"accumulate={accumulate} with itm_head is not supported: the hard negatives "
                "of the K x B batch need every micro-batch's token features with their graphs"
            )
        self.save_hyperparameters(ignore=["model", "itm_head"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.model = model
        self.lock_towers(
            (lock_image_tower, lock_image_unlocked_layers),
            (lock_text_tower, lock_text_unlocked_layers),
        )
        self.itm_head = itm_head
        self.itm_weight = itm_weight
        self.loss_name = loss
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.optim = optim or OptimConfig()
        self.init_accumulation(accumulate)
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.model)

    def lock_towers(self, image: tuple[bool, int], text: tuple[bool, int]) -> None:
        """Lock the towers asked for, as (lock, unlocked last blocks) pairs."""
        for name, (lock, unlocked), method in (
            ("image", image, self.model.lock_image_tower),
            ("text", text, self.model.lock_text_tower),
        ):
            if unlocked and not lock:
                raise ValueError(
                    f"lock_{name}_unlocked_layers={unlocked} needs lock_{name}_tower=true"
                )
            if lock:
                method(unlocked)

    def forward(self, batch: Batch) -> CLIPOutput:
        if self.itm_head is None:
            return self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        return self.model(
            batch["images"], batch["input_ids"], batch["attention_mask"], return_tokens=True
        )

    def matching_loss(self, out: CLIPOutput, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(ITM loss, ITM accuracy) over the pairs and hard negatives of this rank's batch."""
        assert self.itm_head is not None
        if out.image_tokens is None or out.text_tokens is None:
            raise ValueError("itm_head needs a model that returns token features")
        similarity = out.logit_scale.detach() * out.image_features @ out.text_features.T
        pairs = itm_pairs(similarity.float())
        logits = self.itm_head(
            out.image_tokens[pairs.image_index],
            out.text_tokens[pairs.text_index],
            attention_mask[pairs.text_index],
        )
        accuracy = (logits.argmax(dim=-1) == pairs.labels).float().mean()
        return itm_loss(logits.float(), pairs.labels), accuracy

    def loss(self, out: CLIPOutput) -> Tensor:
        """The contrastive loss over the global batch in training; in evaluation over this
        rank's batch (evaluation ranks may hold different numbers of batches and items, so no
        collective may run per step)."""
        image, text = out.image_features.float(), out.text_features.float()
        if self.loss_name == "siglip":
            assert out.logit_bias is not None
            return siglip_loss(
                image, text, out.logit_scale, out.logit_bias, across_ranks=self.training
            )
        return clip_loss(
            image,
            text,
            out.logit_scale,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            across_ranks=self.training,
        )

    def _step(self, batch: Batch, stage: str) -> Tensor:
        out = self(batch)
        loss = self.loss(out)
        accuracy = inbatch_accuracy(out.image_features, out.text_features)  # on this rank
        sync = stage != "train"
        self.log(
            f"{stage}/loss", loss, prog_bar=True, sync_dist=sync, batch_size=len(batch["images"])
        )
        self.log(  # in-batch image->text accuracy, not zero-shot classification
            f"{stage}/inbatch_acc",
            accuracy,
            prog_bar=True,
            sync_dist=sync,
            batch_size=len(batch["images"]),
        )
        if self.itm_head is not None:
            matching, matching_acc = self.matching_loss(out, batch["attention_mask"])
            self.log(f"{stage}/itm_loss", matching, sync_dist=sync, batch_size=len(batch["images"]))
            self.log(
                f"{stage}/itm_acc", matching_acc, sync_dist=sync, batch_size=len(batch["images"])
            )
            loss = loss + self.itm_weight * matching
        if stage == "train":
            self.log("train/logit_scale", out.logit_scale, batch_size=len(batch["images"]))
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if self.accumulate == 1:
            return super().training_step(batch, batch_idx)
        batches = self.collect(batch, batch_idx)
        if batches is None:  # not the K-th micro-batch yet
            return None
        result = grad_cache(
            batches, self._embed, self._loss_of_features, backward=self.backward_micro_batch
        )
        image, text = result.features
        size = len(image)  # K x B
        self.log("train/loss", result.loss, prog_bar=True, batch_size=size)
        self.log("train/inbatch_acc", inbatch_accuracy(image, text), prog_bar=True, batch_size=size)
        self.log("train/logit_scale", self.model.scale().detach(), batch_size=size)
        self.optimizer_step_once()
        return None

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict`: `keys`, and the unit-norm embeddings of what the
        batch holds: `image_embeddings` (B, D) of its images, `text_embeddings` (B, D) of its
        captions (an image folder: images only)."""
        rows: dict[str, Any] = {"keys": batch["keys"]}
        if "images" in batch:
            rows["image_embeddings"] = self.model.encode_image(batch["images"])
        if "input_ids" in batch:
            rows["text_embeddings"] = self.model.encode_text(
                batch["input_ids"], batch["attention_mask"]
            )
        return rows

    def _embed(self, batch: Batch) -> Embedded:
        """One micro-batch's features and the shared logit scale (and SigLIP bias)."""
        out = self(batch)
        shared = (out.logit_scale,) if out.logit_bias is None else (out.logit_scale, out.logit_bias)
        return Embedded((out.image_features, out.text_features), shared)

    def _loss_of_features(self, features: tuple[Tensor, ...], shared: tuple[Tensor, ...]) -> Tensor:
        image, text = features
        bias = shared[1] if len(shared) > 1 else None
        return self.loss(CLIPOutput(image, text, shared[0], bias))
