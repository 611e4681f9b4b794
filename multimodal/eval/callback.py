"""A validation callback: zero-shot classification and image-text retrieval over the whole
validation set at the end of a validation epoch, logged next to the loss.

Each validation batch's images (and captions) are embedded in `on_validation_batch_end` with
the model under training, in the Trainer's precision context; at the end of the epoch the
embeddings of every rank are gathered (padded to the largest rank's count, then trimmed), so
under DDP every rank computes the same metrics over the whole validation set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from multimodal.eval import class_names as names
from multimodal.eval.evaluate import CAPTIONS
from multimodal.eval.retrieval import retrieval_metrics
from multimodal.eval.zeroshot import (
    ZeroShotMetrics,
    embed_images,
    embed_texts,
    zeroshot_classifier,
    zeroshot_logits,
)


class ZeroShotRetrievalCallback(Callback):
    """Logs `val/zeroshot_top1`, `val/zeroshot_top5`, `val/zeroshot_mean_per_class_recall`
    and `val/retrieval/{image_to_text,text_to_image}/{recall@K,mean_rank,median_rank}` every
    `every_n_epochs` validation epochs (and on every `trainer.validate`).

    The LightningModule must hold the CLIP-style model as `.model` (`encode_image`,
    `encode_text`); batches are dicts with `images`, `labels` (-1: no label, left out of
    zero-shot) and `references` (every caption of each image) or `input_ids` /
    `attention_mask` (the batch's own caption), as `ImageTextDataModule` makes.

    Args:
        classes: class names in label order: a built-in name ("digits", "cifar10",
            "imagenet"...) or a .txt/.json file; None: no zero-shot classification.
        templates: prompt templates (built-in name or file); default: those of `classes`.
        tokenizer: "clip" or a saved tokenizer folder; default: the datamodule's tokenizer.
        context_length: default: the datamodule's.
        retrieval: compute retrieval metrics.
        captions: "all" (every caption in `references`) or "txt" (the batch's own caption).
        ks: the K of Recall@K.
        every_n_epochs: run on epochs where (epoch + 1) % every_n_epochs == 0.
        prog_bar: show the zero-shot top-1 in the progress bar.
        max_memory_mib: memory of one block of the retrieval similarity matrix.
    """

    def __init__(
        self,
        classes: str | None = None,
        templates: str | None = None,
        *,
        tokenizer: str | None = None,
        context_length: int | None = None,
        retrieval: bool = True,
        captions: str = "all",
        ks: Sequence[int] = (1, 5, 10),
        every_n_epochs: int = 1,
        prog_bar: bool = True,
        max_memory_mib: int = 256,
    ) -> None:
        super().__init__()
        if classes is None and not retrieval:
            raise ValueError("classes=None and retrieval=False: nothing to evaluate")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1")
        if captions not in CAPTIONS:
            raise ValueError(f"captions={captions!r} must be one of {list(CAPTIONS)}")
        if context_length is not None and context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2")
        if max_memory_mib < 1:
            raise ValueError(f"max_memory_mib={max_memory_mib} must be >= 1")
        self.class_names: tuple[str, ...] | None = None
        self.templates: tuple[names.Template, ...] | None = None
        if classes is not None:  # read now: a bad name fails before training starts
            own = classes in names.BUILTIN_TEMPLATES or classes.endswith(".json")
            if templates is None and not own:
                raise ValueError(f"classes={classes!r} has no templates of its own: pass templates")
            self.class_names = names.class_names(classes)
            self.templates = names.templates(templates or classes)
        self.tokenizer_name = tokenizer
        self.context_length = context_length
        self.retrieval = retrieval
        self.captions = captions
        self.ks = tuple(ks)
        self.every_n_epochs = every_n_epochs
        self.prog_bar = prog_bar
        self.max_memory_bytes = max_memory_mib * 2**20
        self._tokenizer: Any = None
        self._reset()

    def _reset(self) -> None:
        self._images: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._texts: list[Tensor] = []
        self._owners: list[Tensor] = []  # the local image index of each text
        self._n_images = 0

    def _active(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:  # trainer.validate(): always
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _text_setup(self, trainer: Trainer) -> tuple[Any, int]:
        data = trainer.datamodule
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                from text.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_name)
            elif hasattr(data, "tokenizer"):
                self._tokenizer = data.tokenizer
            else:
                raise ValueError(
                    "ZeroShotRetrievalCallback: pass tokenizer= (the datamodule has none)"
                )
        length = self.context_length or getattr(data, "context_length", None)
        if length is None:
            raise ValueError(
                "ZeroShotRetrievalCallback: pass context_length= (the datamodule has none)"
            )
        return self._tokenizer, length

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active(trainer) or dataloader_idx != 0:
            return
        model = pl_module.model
        with trainer.precision_plugin.forward_context():
            images = embed_images(model, batch["images"])
        self._images.append(images)
        labels = batch.get("labels")
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        self._labels.append(labels.to(images.device))
        if self.retrieval:
            self._embed_captions(trainer, pl_module, batch, len(images), images.device)
        self._n_images += len(images)

    def _embed_captions(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: dict[str, Any],
        n: int,
        device: torch.device,
    ) -> None:
        if self.captions == "all" and "references" in batch:
            tokenizer, length = self._text_setup(trainer)
            texts = [t for refs in batch["references"] for t in refs]
            owners = [i for i, refs in enumerate(batch["references"]) for _ in refs]
            tokens = tokenizer.batch_encode(texts, max_length=length)
            input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        else:
            input_ids, mask = batch["input_ids"], batch.get("attention_mask")
            owners = list(range(n))
        with trainer.precision_plugin.forward_context():
            self._texts.append(embed_texts(pl_module.model, input_ids, mask))
        self._owners.append(torch.tensor(owners, device=device) + self._n_images)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer) or not self._images:
            self._reset()
            return
        images = _gather_rows(pl_module, torch.cat(self._images))  # (N, D) over every rank
        labels = _gather_rows(pl_module, torch.cat(self._labels))
        metrics: dict[str, float] = {}
        if self.class_names is not None:
            metrics.update(self._zeroshot(trainer, pl_module, images, labels))
        if self.retrieval:
            texts = torch.cat(self._texts)
            owners = _gather_owners(pl_module, torch.cat(self._owners), self._n_images)
            result = retrieval_metrics(
                images,
                _gather_rows(pl_module, texts),
                owners,
                ks=self.ks,
                max_memory_bytes=self.max_memory_bytes,
            )
            metrics.update({f"val/retrieval/{k}": v for k, v in result.to_dict().items()})
        for name, value in metrics.items():
            pl_module.log(
                name,
                value,
                prog_bar=self.prog_bar and name == "val/zeroshot_top1",
                sync_dist=True,  # every rank holds the same value: the mean changes nothing
            )
        self._reset()

    def _zeroshot(
        self, trainer: Trainer, pl_module: LightningModule, images: Tensor, labels: Tensor
    ) -> dict[str, float]:
        assert self.class_names is not None and self.templates is not None
        known = labels >= 0
        if not known.any():
            return {}
        tokenizer, length = self._text_setup(trainer)
        with trainer.precision_plugin.forward_context():
            classifier = zeroshot_classifier(
                pl_module.model,
                tokenizer,
                names.render_prompts(self.class_names, self.templates),
                context_length=length,
                device=images.device,
            )
        metrics = ZeroShotMetrics(len(self.class_names))
        metrics.update(zeroshot_logits(images[known], classifier), labels[known])
        result = metrics.compute(self.class_names)
        return {
            "val/zeroshot_top1": result.top1,
            "val/zeroshot_top5": result.top5,
            "val/zeroshot_mean_per_class_recall": result.mean_per_class_recall,
        }


def _gather_rows(pl_module: LightningModule, x: Tensor) -> Tensor:
    """The rows of `x` from every rank, rank by rank (ranks may hold different counts)."""
    if pl_module.trainer.world_size == 1:
        return x
    count = torch.tensor([len(x)], device=x.device)
    counts = pl_module.all_gather(count).reshape(-1).tolist()  # (world,)
    padded = F.pad(x, (0, 0) * (x.ndim - 1) + (0, max(counts) - len(x)))
    gathered = pl_module.all_gather(padded)  # (world, max, ...)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def _gather_owners(pl_module: LightningModule, owners: Tensor, n_images: int) -> Tensor:
    """The image index of every text of every rank, shifted by the images of earlier ranks."""
    if pl_module.trainer.world_size == 1:
        return owners
    images = pl_module.all_gather(torch.tensor([n_images], device=owners.device)).reshape(-1)
    offsets = torch.cumsum(images, 0) - images  # images before each rank
    counts = pl_module.all_gather(torch.tensor([len(owners)], device=owners.device)).reshape(-1)
    padded = F.pad(owners, (0, int(counts.max()) - len(owners)))
    gathered = pl_module.all_gather(padded)  # (world, max)
    return torch.cat([gathered[r, :n] + offsets[r] for r, n in enumerate(counts.tolist())])
