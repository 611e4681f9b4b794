"""Visual question answering: soft-score BCE over the answer vocabulary (plus the answer
decoder's cross-entropy when the model writes answers); accuracy is the VQA soft score of the
predicted answer."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from torchmetrics import MeanMetric

from multimodal.adapt import AdaptConfig
from multimodal.models.losses import caption_loss, vqa_loss
from multimodal.models.vqa import VQAModel
from multimodal.tasks.base import StageStepTask
from multimodal.tasks.captioning import cut_at, next_token_labels
from multimodal.tasks.language_modeling import IGNORE, check_vocabulary
from multimodal.tasks.optim import OptimConfig
from multimodal.train.prepare import BlockOptions

Batch = dict[str, Any]


@runtime_checkable
class HasAnswers(Protocol):
    """Datamodules with an answer vocabulary (`VQADataModule`)."""

    num_answers: int


class VisualQuestionAnswering(StageStepTask):
    """Train a `VQAModel` on `VQADataModule` batches (`images`, `input_ids`,
    `attention_mask`, `answer_scores` (B, A) soft targets; with an answer decoder also
    `answer_input_ids` / `answer_attention_mask`).

    Args:
        model: the VQA model; its `num_answers` must equal the datamodule's.
        optim: optimiser and schedule.
        answer_loss_weight: weight of the answer decoder's token cross-entropy.
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of `model` (`multimodal.adapt.AdaptConfig`: LoRA,
            bottleneck adapters, what stays trainable), applied after `init_from`; the `VQAModel`,
            its `classifier` head included: list it in `train_also`.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`).
    """

    def __init__(
        self,
        model: VQAModel,
        *,
        optim: OptimConfig | None = None,
        answer_loss_weight: float = 1.0,
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
        if answer_loss_weight < 0:
            raise ValueError(f"answer_loss_weight={answer_loss_weight} must be >= 0")
        self.save_hyperparameters(ignore=["model"])
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.model = model
        self.optim = optim or OptimConfig()
        self.answer_loss_weight = answer_loss_weight
        self.val_acc = MeanMetric()
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.model)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, HasAnswers) and datamodule.num_answers != self.model.num_answers:
            raise ValueError(
                f"the data has {datamodule.num_answers} answers in its vocabulary but the "
                f"model's num_answers is {self.model.num_answers}: set it to "
                f"{datamodule.num_answers}"
            )
        if self.model.answer_decoder is not None:
            check_vocabulary(self, self.model.answer_decoder.config.vocab_size)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Rows of `multimodal predict` (one per question): `keys`, `answer_id` (the top
        answer of the classifier), `score` (its sigmoid: the soft score the model predicts),
        `answer` (its text, from the datamodule's `answer_vocab`) and, with an answer
        decoder, `generated_answer` (written greedily, decoded with the datamodule's
        tokenizer)."""
        out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        score, answer_id = out.logits.float().sigmoid().max(dim=-1)
        rows: dict[str, Any] = {"keys": batch["keys"], "answer_id": answer_id, "score": score}
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        vocab = getattr(datamodule, "answer_vocab", None)
        if vocab is not None:
            rows["answer"] = [vocab[i] for i in answer_id.tolist()]
        decoder = self.model.answer_decoder
        if decoder is not None:
            sequences = self.model.generate_answers(
                batch["images"], batch["input_ids"], batch["attention_mask"]
            ).sequences
            tokenizer = getattr(datamodule, "tokenizer", None)
            if tokenizer is None:
                raise ValueError("generated answers need a datamodule with a `tokenizer`")
            rows["generated_answer"] = [
                tokenizer.decode(cut_at(row, decoder.config.eos_id)) for row in sequences
            ]
        return rows

    def _step(self, batch: Batch, stage: str) -> Tensor:
        decoding = self.model.answer_decoder is not None
        answer_ids = batch["answer_input_ids"] if decoding else None
        answer_mask = batch["answer_attention_mask"] if decoding else None
        out = self.model(
            batch["images"],
            batch["input_ids"],
            batch["attention_mask"],
            answer_ids=None if answer_ids is None else answer_ids[:, :-1],
            answer_mask=None if answer_mask is None else answer_mask[:, :-1],
        )
        scores = batch["answer_scores"]
        loss = vqa_loss(out.logits.float(), scores)
        sync = stage != "train"
        self.log(f"{stage}/answer_loss", loss, sync_dist=sync, batch_size=len(batch["images"]))
        if out.answer_logits is not None:
            decoder_loss = caption_loss(
                out.answer_logits.float(),
                next_token_labels(answer_ids, answer_mask),
                ignore_index=IGNORE,
            )
            self.log(
                f"{stage}/decoder_loss",
                decoder_loss,
                sync_dist=sync,
                batch_size=len(batch["images"]),
            )
            loss = loss + self.answer_loss_weight * decoder_loss
        # VQA accuracy: the soft score of the predicted answer, min(#annotators / 3, 1)
        predicted = out.logits.argmax(dim=-1)
        batch_scores = scores.gather(1, predicted[:, None]).squeeze(1)  # (B,)
        if stage == "train":  # this batch's accuracy
            accuracy = batch_scores.mean()
        else:  # over the whole validation set, every rank's items
            accuracy = self.val_acc
            accuracy.update(batch_scores)
        self.log(
            f"{stage}/loss", loss, prog_bar=True, sync_dist=sync, batch_size=len(batch["images"])
        )
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=len(batch["images"]))
        return loss
