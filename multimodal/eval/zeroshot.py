"""Zero-shot classification with a CLIP-style model: class prompts -> averaged, normalised text
embeddings (the classifier) -> image logits -> top-k accuracy, per-class recall, confusion.

The model is duck-typed (`ZeroShotModel`): our `multimodal.models.CLIP`, the open_clip wrapper,
or anything with `encode_image` and `encode_text`. Evaluation runs on one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from multimodal.eval.class_names import Template, render_prompts
from text.tokenizer import Tokenizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ZeroShotModel(Protocol):
    """What zero-shot evaluation needs from a model."""

    def encode_image(self, images: Tensor, *, normalize: bool = True) -> Tensor: ...

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor: ...


def embed_images(model: ZeroShotModel, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D) unit-norm fp32 image embeddings. Normalised here, once, after
    the cast to fp32: under autocast the model's own normalisation would run in bf16/fp16."""
    return F.normalize(model.encode_image(images, normalize=False).float(), dim=-1)


def embed_texts(model: ZeroShotModel, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T) token ids -> (B, D) unit-norm fp32 text embeddings (as `embed_images`)."""
    features = model.encode_text(input_ids, attention_mask, normalize=False)
    return F.normalize(features.float(), dim=-1)


@contextlib.contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Every submodule in eval mode inside, each one's own training flag restored after
    (a frozen tower kept in eval during training stays in eval)."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: object) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def zeroshot_classifier(
    model: ZeroShotModel,
    tokenizer: Tokenizer,
    class_prompts: Sequence[Sequence[str]],
    *,
    context_length: int = 77,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """(C, D) fp32: for each class, the mean of its prompts' normalised text embeddings
    (prompts are the class name in several templates), normalised again, as in CLIP's
    evaluation.

    The prompts of all classes are tokenized together (one padding width, so the result does
    not depend on `batch_size`) and encoded `batch_size` prompts per forward pass, across
    class boundaries. The model runs in eval mode; its training flags are restored after.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if isinstance(class_prompts, str) or not class_prompts:
        raise ValueError("class_prompts must be a non-empty list of prompt lists, one per class")
    prompts: list[str] = []
    owner: list[int] = []  # the class of each prompt
    for c, class_list in enumerate(class_prompts):
        if isinstance(class_list, str) or not class_list:
            raise ValueError(f"class {c}: expected a non-empty list of prompts, got {class_list!r}")
        prompts += list(class_list)
        owner += [c] * len(class_list)
    device = torch.device(device) if device is not None else model_device(model)
    tokens = tokenizer.batch_encode(prompts, max_length=context_length)  # (P, T)
    chunks = []
    with eval_mode(model):
        for start in tqdm(
            range(0, len(prompts), batch_size), disable=not progress, desc="classes", unit="batch"
        ):
            stop = start + batch_size
            chunks.append(
                embed_texts(
                    model,
                    tokens.input_ids[start:stop].to(device),
                    tokens.attention_mask[start:stop].to(device),
                )
            )  # (b, D)
    embeddings = torch.cat(chunks)  # (P, D)
    index = torch.tensor(owner, device=embeddings.device)  # (P,)
    sums = embeddings.new_zeros(len(class_prompts), embeddings.shape[1])  # (C, D)
    sums.index_add_(0, index, embeddings)
    counts = torch.bincount(index, minlength=len(class_prompts)).unsqueeze(1)  # (C, 1)
    return F.normalize(sums / counts, dim=-1)


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """(B, D) normalised image embeddings, (C, D) classifier -> (B, C) cosine similarities."""
    return image_features.float() @ classifier.T


@dataclass
class ZeroShotResult:
    """Zero-shot classification metrics; accuracies are fractions in [0, 1].

    `top_k` maps every requested k to its accuracy (k capped at the number of classes);
    `per_class_accuracy` (the recall of each class) is aligned with `class_names`, NaN for a
    class absent from the labels, and such classes are left out of `mean_per_class_recall`.
    `confusion[t, p]` counts images of true class t predicted as p.
    """

    class_names: list[str]
    top1: float
    top5: float
    top_k: dict[int, float]
    mean_per_class_recall: float
    per_class_accuracy: list[float]
    confusion: Tensor  # (C, C) int64, rows = true class
    n_samples: int
    predictions: Tensor = field(repr=False)  # (N,) top-1 class of each image
    labels: Tensor = field(repr=False)  # (N,)
    # (C, D) fp32 normalised class embeddings the images were scored with (logits = image
    # features @ classifier.T), where known: a linear probe can start from it
    classifier: Tensor | None = field(default=None, repr=False)

    @property
    def support(self) -> list[int]:
        """The number of images of each class (the rows of the confusion matrix)."""
        return self.confusion.sum(dim=1).tolist()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics: the scalars and per-class accuracy by class name (NaN -> None;
        a repeated name, as ImageNet's two "crane"s, is written `name (index)`)."""
        counts: dict[str, int] = {}
        for name in self.class_names:
            counts[name] = counts.get(name, 0) + 1
        per_class = {
            (name if counts[name] == 1 else f"{name} ({i})"): _json_float(accuracy)
            for i, (name, accuracy) in enumerate(
                zip(self.class_names, self.per_class_accuracy, strict=True)
            )
        }
        return {
            "top1": self.top1,
            "top5": self.top5,
            **{f"top{k}": value for k, value in self.top_k.items() if k not in (1, 5)},
            "mean_per_class_recall": _json_float(self.mean_per_class_recall),
            "n_samples": self.n_samples,
            "n_classes": len(self.class_names),
            "n_classes_present": sum(1 for s in self.support if s > 0),
            "per_class_accuracy": per_class,
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


class ZeroShotMetrics:
    """Streaming top-k hits and confusion matrix over (logits, labels) batches.

    Written by hand rather than with torchmetrics: its macro recall does not report absent
    classes as NaN, its top-k refuses k > C, and we keep every top-1 prediction anyway.
    """

    def __init__(self, num_classes: int, top_k: Sequence[int] = (1, 5)) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        for k in top_k:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"top_k={tuple(top_k)!r}: every k must be an int >= 1")
        self.num_classes = num_classes
        self.ks = sorted({1, 5, *top_k})
        self.hits = dict.fromkeys(self.ks, 0)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.predictions: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """(B, C) scores and (B,) true classes in [0, C)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits {tuple(logits.shape)}: expected (B, {self.num_classes})")
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if len(labels) != len(logits):
            raise ValueError(f"{len(labels)} labels for {len(logits)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(
                f"label {bad} is outside [0, {self.num_classes}) (-1 marks a sample without a "
                "label: zero-shot evaluation needs labelled images)"
            )
        top = logits.float().topk(min(self.ks[-1], self.num_classes), dim=1).indices.cpu()
        hit = top == labels.unsqueeze(1)  # (B, kmax)
        for k in self.ks:
            self.hits[k] += int(hit[:, :k].any(dim=1).sum())
        predictions = top[:, 0]
        flat = labels * self.num_classes + predictions
        self.confusion += torch.bincount(flat, minlength=self.num_classes**2).view_as(
            self.confusion
        )
        self.predictions.append(predictions)
        self.labels.append(labels)

    def compute(
        self, class_names: Sequence[str], classifier: Tensor | None = None
    ) -> ZeroShotResult:
        """The result (with the `classifier` the logits came from, where given); raises
        ValueError when no sample was seen."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        n = int(self.confusion.sum())
        if n == 0:
            raise ValueError("no images were evaluated (the data yielded no batch)")
        support = self.confusion.sum(dim=1)  # (C,)
        recall = self.confusion.diagonal().double() / support.double()  # NaN where support 0
        top_k = {k: self.hits[k] / n for k in self.ks}
        return ZeroShotResult(
            class_names=list(class_names),
            top1=top_k[1],
            top5=top_k[5],
            top_k=top_k,
            mean_per_class_recall=float(recall.nanmean()),
            per_class_accuracy=recall.tolist(),
            confusion=self.confusion.clone(),
            n_samples=n,
            predictions=torch.cat(self.predictions),
            labels=torch.cat(self.labels),
            classifier=None if classifier is None else classifier.detach().float(),
        )


def zeroshot_evaluate(
    model: ZeroShotModel,
    tokenizer: Tokenizer,
    batches: Iterable[Any],
    class_names: Sequence[str],
    templates: Sequence[Template],
    *,
    context_length: int = 77,
    text_batch_size: int = 256,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: bool = True,
    top_k: Sequence[int] = (1, 5),
    on_logits: Callable[[Tensor], None] | None = None,
) -> ZeroShotResult:
    """Zero-shot classification of labelled images with prompts built from class names.

    Args:
        model: has `encode_image` and `encode_text` (`ZeroShotModel`); evaluated in eval
            mode, its training flags restored after.
        tokenizer: the model's tokenizer.
        batches: `(images (B, 3, H, W), labels (B,))` pairs, or dicts with "images" and
            "labels" (the shard datamodules' loaders); labels in [0, len(class_names)).
        class_names: one name per class, in label order.
        templates: strings with `{}` for the class name, or callables name -> prompt.
        context_length: the text length the model was trained with.
        text_batch_size: prompts per text forward pass when building the classifier.
        device: where inputs go; default the model's device (the model must be there).
        precision: "fp32" (no autocast), "bf16" or "fp16" (autocast for both towers).
        progress: tqdm bars over the classifier and the image batches.
        top_k: the k of the top-k accuracies reported (1 and 5 always are).
        on_logits: called with each batch's (B, C) cosine similarities, in data order (e.g.
            to keep the top classes of the images a report shows).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    device = torch.device(device) if device is not None else model_device(model)
    metrics = ZeroShotMetrics(len(class_names), top_k)
    dtype = PRECISIONS[precision]
    with eval_mode(model), torch.no_grad():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            classifier = zeroshot_classifier(
                model,
                tokenizer,
                render_prompts(class_names, templates),
                context_length=context_length,
                batch_size=text_batch_size,
                device=device,
                progress=progress,
            )  # (C, D)
        for images, labels in tqdm(
            _image_batches(batches), total=_length(batches), disable=not progress, desc="images"
        ):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                features = embed_images(model, images.to(device))  # (B, D)
            logits = zeroshot_logits(features, classifier)
            metrics.update(logits, labels)
            if on_logits is not None:
                on_logits(logits)
    return metrics.compute(class_names, classifier)


def _image_batches(batches: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in batches:
        if isinstance(batch, dict):
            if "images" not in batch or "labels" not in batch:
                raise ValueError(
                    f"a dict batch needs 'images' and 'labels'; got keys {sorted(batch)}"
                )
            yield batch["images"], batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield batch[0], batch[1]
        else:
            raise ValueError(
                "expected batches of (images, labels) or dicts with 'images' and 'labels'; "
                f"got {type(batch).__name__}"
            )


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:  # an iterable loader or a generator
        return None
