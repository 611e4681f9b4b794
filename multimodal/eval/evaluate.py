"""Zero-shot classification and retrieval of a loaded model over image-text shards, each turned
into report metrics and sections; used by `multimodal zeroshot`, `multimodal retrieval` and
`multimodal demo`.

Shards are read with the datamodules' own sample map and collate (`ImageTextSample`,
`ImageTextCollator`) in one ordered pass (`eval_loader`); so are an ImageFolder tree, a
torchvision dataset on disk and CSV / JSONL files of image paths (`multimodal.eval.datasets`).
The images shown in a report are fetched by sample key in a second pass that stops once it has
them all, so no image is kept in memory during the evaluation itself. Samples the reader
skipped (broken images) are counted in the metrics (`skipped`, by reason) when there are any.

`run_probes` adds a linear probe and few-shot k-NN on the frozen image features
(`multimodal.eval.linear_probe`), reported next to zero-shot top-1.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from multimodal.data.pipeline import (
    ShardLoader,
    ShardPipelineConfig,
    SkipCounter,
    build_pipeline,
)
from multimodal.data.shards_datamodules import ImageTextCollator, ImageTextSample
from multimodal.eval.class_names import Template
from multimodal.eval.datasets import (
    CaptionOptional,
    DatasetSpec,
    ImageSamples,
    SampleLoader,
    SkippingCollate,
    open_samples,
    parse_spec,
)
from multimodal.eval.itm_rerank import check_itm_model, itm_pair_scores, rerank_with_scores
from multimodal.eval.linear_probe import (
    VAL_FRACTION,
    KnnResult,
    ProbeResult,
    knn_probe,
    linear_probe,
)
from multimodal.eval.loading import LoadedModel
from multimodal.eval.metric_notes import reachable_image_to_text
from multimodal.eval.report import (
    Marked,
    RetrievalExample,
    Section,
    Text,
    confusion_section,
    per_class_section,
    recall_curve_section,
    retrieval_examples_section,
    table_section,
)
from multimodal.eval.retrieval import RetrievalResult, retrieval_metrics, topk_retrieval
from multimodal.eval.zeroshot import (
    PRECISIONS,
    ZeroShotResult,
    embed_images,
    embed_texts,
    eval_mode,
    zeroshot_evaluate,
)

CAPTIONS = ("all", "txt")
RECALL_KS = (1, 5, 10)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100)
TOP_RESULTS = 5


EvalLoader = ShardLoader | SampleLoader  # ordered dict batches, skips in `skip_counter`


def eval_loader(
    urls: str | list[str] | DatasetSpec | ImageSamples,
    loaded: LoadedModel,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
) -> EvalLoader:
    """Every sample of the data once, in order, partial last batch kept: dict batches with
    `images`, `labels`, `keys` and `references` (every caption of each image).

    `urls`: shards (a path, pattern or list, as `expand_urls` takes), a data spec or its string
    form (`imagefolder:DIR`, `torchvision:CIFAR10:ROOT`, `csv:FILE`, ...; see
    `multimodal.eval.datasets`) or samples already opened with `open_samples`."""
    sample = ImageTextSample(
        transform=loaded.transform,
        tokenizer=loaded.data_tokenizer,
        context_length=loaded.context_length,
        sample_captions=False,
    )
    collate = ImageTextCollator(
        pad_id=loaded.data_tokenizer.pad_id, context_length=loaded.context_length
    )
    if not isinstance(urls, ImageSamples):
        spec = DatasetSpec("shards", "-") if isinstance(urls, list) else parse_spec(urls)
        if spec.kind == "shards":
            config = ShardPipelineConfig(
                urls=urls if isinstance(urls, list) else spec.path,
                batch_size=batch_size,
                shuffle_shards=False,
                shuffle_buffer=0,
                drop_last=False,
            )
            dataset = build_pipeline(config, sample, rank=0, world_size=1, collate=collate)
            return ShardLoader(dataset, num_workers=num_workers)
        urls = open_samples(spec)
    return SampleLoader(
        urls,
        SkippingCollate(CaptionOptional(sample), collate),
        batch_size=batch_size,
        num_workers=num_workers,
    )


LoaderFactory = Callable[[], EvalLoader]


def skip_metrics(counter: SkipCounter, what: str) -> dict[str, Any]:
    """`{"skipped": {reason: count}}` of the samples the reader left out (logged with a
    warning), {} when none was."""
    counts = counter.report(what)
    return {"skipped": counts} if counts else {}


def to_display(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) float array in [0, 1] to show."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = (image.float().cpu() * std_t + mean_t).clamp(0, 1)
    return pixels.permute(1, 2, 0).numpy()


def images_by_key(
    loader: EvalLoader, keys: Sequence[str], mean: Sequence[float], std: Sequence[float]
) -> dict[str, np.ndarray]:
    """The images of `keys` (display arrays, see `to_display`), read from a fresh pass over the
    shards that stops once every key is found."""
    wanted = set(keys)
    found: dict[str, np.ndarray] = {}
    if not wanted:
        return found
    for batch in loader:
        for key, image in zip(batch["keys"], batch["images"], strict=True):
            if key in wanted:
                found[key] = to_display(image, mean, std)
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"samples {sorted(missing)[:5]} were not found in a second pass")
    return found


def pixels_by_key(loader: EvalLoader, keys: Sequence[str]) -> dict[str, Tensor]:
    """The normalised model inputs (3, H, W) of `keys` (CPU), read from a fresh pass over the
    data that stops once every key is found; for an attention section's forward passes."""
    wanted = set(keys)
    found: dict[str, Tensor] = {}
    if not wanted:
        return found
    for batch in loader:
        for key, image in zip(batch["keys"], batch["images"], strict=True):
            if key in wanted:
                found[key] = image.detach().cpu().clone()
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"samples {sorted(missing)[:5]} were not found in a second pass")
    return {key: found[key] for key in dict.fromkeys(keys)}


def attention_or_note(
    model: Any,
    pixels: dict[str, Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    tokenizer: Any = None,
    title: str = "Attention",
) -> Section:
    """`multimodal.inspect.attention_section` of the images `pixels` (key -> normalised
    (3, H, W)) for a model whose image tower is our `vision.ViT` (the tower that returns its
    attention weights); for any other model a section with one line saying why there is none."""
    from multimodal.inspect.maps import image_tower
    from multimodal.inspect.report_section import attention_section

    try:
        tower = image_tower(model)
    except ValueError as error:
        return Section(title, [Text(f"No attention maps: {error}.")])
    device = next(tower.parameters()).device
    keys = list(pixels)
    with eval_mode(model):
        return attention_section(
            model,
            torch.stack([pixels[k] for k in keys]).to(device),
            mean,
            std,
            keys,
            tokenizer=tokenizer,
            title=title,
        )


@dataclass
class _KeyRecorder:
    """Iterates a loader, recording the sample keys in order (and keeping its length)."""

    loader: EvalLoader
    keys: list[str]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.keys.extend(batch["keys"])
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def _has_length(loader: Any) -> bool:
    try:
        len(loader)
    except TypeError:
        return False
    return True


@dataclass
class ZeroShotRun:
    """A zero-shot evaluation: the result, the report metrics and the report sections."""

    result: ZeroShotResult
    metrics: dict[str, Any]
    sections: list[Section]


def run_zeroshot(
    loaded: LoadedModel,
    loaders: LoaderFactory,
    class_names: Sequence[str],
    templates: Sequence[Template],
    *,
    precision: str = "fp32",
    text_batch_size: int = 256,
    n_examples: int = 16,
    progress: bool = True,
    attention: bool = False,
) -> ZeroShotRun:
    """Zero-shot classification of the labelled images of `loaders()` with prompts made from
    `class_names` and `templates`; sections: per-class accuracy, confusion matrix and example
    images with their predicted and true class (the wrong predictions first) and, with
    `attention`, the attention rollout of the example images (`attention_or_note`)."""
    keys: list[str] = []
    loader = loaders()
    scale = logit_scale(loaded.model)
    n_top = min(EXAMPLE_TOP_CLASSES, len(class_names))
    top_probs: list[Tensor] = []
    top_classes: list[Tensor] = []

    def keep_top(logits: Tensor) -> None:
        probs, classes = (logits.float() * scale).softmax(dim=-1).topk(n_top, dim=-1)
        top_probs.append(probs.cpu())
        top_classes.append(classes.cpu())

    result = zeroshot_evaluate(
        loaded.model,
        loaded.tokenizer,
        _KeyRecorder(loader, keys),
        class_names,
        templates,
        context_length=loaded.context_length,
        text_batch_size=text_batch_size,
        precision=precision,
        progress=progress,
        on_logits=keep_top if n_examples > 0 else None,
    )
    metrics = {
        "top1": result.top1,
        "top5": result.top5,
        "mean_per_class_recall": result.mean_per_class_recall,
        "n_samples": result.n_samples,
        "n_classes": len(result.class_names),
        **skip_metrics(loader.skip_counter, "zero-shot data"),
    }
    sections = [
        per_class_section(
            result.class_names,
            result.per_class_accuracy,
            support=result.support,
            title="Zero-shot: per-class accuracy",
        ),
        confusion_section(
            result.confusion, result.class_names, title="Zero-shot: confusion matrix"
        ),
    ]
    if n_examples > 0:
        top = (torch.cat(top_classes), torch.cat(top_probs))
        chosen = [keys[i] for i in zeroshot_example_indices(result, n_examples)[0]]
        pixels = pixels_by_key(loaders(), chosen) if attention else None
        sections.append(
            _zeroshot_examples(loaded, loaders, result, keys, n_examples, top, scale, pixels)
        )
        if pixels is not None:
            sections.append(
                attention_or_note(
                    loaded.model,
                    pixels,
                    loaded.mean,
                    loaded.std,
                    title="Zero-shot: attention of the example images",
                )
            )
    return ZeroShotRun(result, metrics, sections)


EXAMPLE_TOP_CLASSES = 3  # classes and probabilities shown for each example image
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's, for models without a `scale()`


def logit_scale(model: Any) -> float:
    """The model's logit multiplier (`scale()`: exp of the learned temperature, clamped), which
    turns cosine similarities into the logits of its softmax; CLIP's 100 for a model without."""
    scale = getattr(model, "scale", None)
    if not callable(scale):
        return DEFAULT_LOGIT_SCALE
    with torch.no_grad():
        return float(scale())


def zeroshot_example_indices(result: ZeroShotResult, n_examples: int) -> tuple[list[int], int]:
    """(the images a report shows, how many of them are misclassified): up to half
    misclassified ones first, then correctly classified ones, each in data order."""
    correct = (result.predictions == result.labels).tolist()
    wrong = [i for i, ok in enumerate(correct) if not ok][: n_examples // 2]
    right = [i for i, ok in enumerate(correct) if ok][: n_examples - len(wrong)]
    return wrong + right, len(wrong)


def _zeroshot_examples(
    loaded: LoadedModel,
    loaders: LoaderFactory,
    result: ZeroShotResult,
    keys: list[str],
    n_examples: int,
    top: tuple[Tensor, Tensor],
    scale: float,
    pixels: dict[str, Tensor] | None = None,
) -> Section:
    chosen, n_wrong = zeroshot_example_indices(result, n_examples)
    if pixels is None:
        images = images_by_key(loaders(), [keys[i] for i in chosen], loaded.mean, loaded.std)
    else:  # already read for the attention section
        images = {key: to_display(image, loaded.mean, loaded.std) for key, image in pixels.items()}
    names = result.class_names
    top_classes, top_probs = top
    rows = [
        {
            "image": images[keys[i]],
            "key": keys[i],
            "true class": names[int(result.labels[i])],
            "predicted": Marked(
                names[int(result.predictions[i])],
                bool(result.predictions[i] == result.labels[i]),
            ),
            f"top {top_classes.shape[1]} (probability)": tuple(
                f"{names[c]} {p:.3f}"
                for c, p in zip(top_classes[i].tolist(), top_probs[i].tolist(), strict=True)
            ),
        }
        for i in chosen
    ]
    return table_section(
        "Zero-shot: examples",
        rows,
        text=(
            f"{n_wrong} misclassified images first, then {len(chosen) - n_wrong} correctly "
            f"classified ones. Probability: softmax over the classes of the cosine "
            f"similarities times the model's logit scale ({scale:.3g})."
        ),
    )


@dataclass
class RetrievalRun:
    """A retrieval evaluation: the result, the report metrics and the report sections."""

    result: RetrievalResult
    metrics: dict[str, Any]
    sections: list[Section]
    itm_result: RetrievalResult | None = None  # with `rerank_itm`: the re-ranked result
    itm_metrics: dict[str, Any] | None = None  # its report metrics (`retrieval_itm`)
    caveats: dict[str, str] = field(default_factory=dict)  # metric name -> caveat


@torch.no_grad()
def embed_images_and_captions(
    loaded: LoadedModel,
    loader: EvalLoader,
    *,
    captions: str = "all",
    precision: str = "fp32",
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor, list[str], list[str]]:
    """(image features (N_i, D), text features (N_t, D), text_image (N_t,), keys (N_i),
    texts (N_t)), features L2-normalised fp32 on the model's device. `captions`: "all" (every
    caption of each image) or "txt" (its main caption)."""
    if captions not in CAPTIONS:
        raise ValueError(f"captions={captions!r} must be one of {list(CAPTIONS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    model = loaded.model
    device = next(model.parameters()).device
    dtype = PRECISIONS[precision]
    image_chunks: list[Tensor] = []
    keys: list[str] = []
    texts: list[str] = []
    owners: list[int] = []
    total = len(loader) if _has_length(loader) else None
    with eval_mode(model):
        for batch in tqdm(loader, total=total, disable=not progress, desc="images", unit="batch"):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                image_chunks.append(embed_images(model, batch["images"].to(device)))
            for key, references in zip(batch["keys"], batch["references"], strict=True):
                chosen = references if captions == "all" else references[:1]
                texts.extend(chosen)
                owners.extend([len(keys)] * len(chosen))
                keys.append(key)
        if not image_chunks:
            raise ValueError("the data yielded no images")
        if not texts:
            raise ValueError(
                "the data has no captions: retrieval needs images with captions (an "
                "ImageFolder tree or a torchvision dataset has labels only; use shards or a "
                "CSV / JSONL file with a caption column)"
            )
        text_chunks = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, disable=not progress, desc="captions", unit="batch"):
            tokens = loaded.tokenizer.batch_encode(
                texts[start : start + batch_size], max_length=loaded.context_length
            )
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                text_chunks.append(
                    embed_texts(
                        model, tokens.input_ids.to(device), tokens.attention_mask.to(device)
                    )
                )
    text_image = torch.tensor(owners, dtype=torch.long, device=device)
    return torch.cat(image_chunks), torch.cat(text_chunks), text_image, keys, texts


def recall_curve(ranks: Tensor, gallery: int, ks: Sequence[int] = CURVE_KS) -> dict[int, float]:
    """{K: share of queries with rank <= K} for the K of `ks` up to the gallery size."""
    chosen = [k for k in ks if k <= gallery] or [gallery]
    return {k: (ranks <= k).double().mean().item() for k in chosen}


def run_retrieval(
    loaded: LoadedModel,
    loaders: LoaderFactory,
    *,
    captions: str = "all",
    precision: str = "fp32",
    batch_size: int = 256,
    max_memory_bytes: int = 512 * 2**20,
    n_examples: int = 4,
    progress: bool = True,
    rerank_itm: int | None = None,
) -> RetrievalRun:
    """Image -> text and text -> image retrieval among every image and caption of
    `loaders()`; sections: Recall@K curves and example queries with their top 5 results.
    With `rerank_itm` K, each query's top K are also re-ordered by the model's ITM head
    (`multimodal.eval.itm_rerank`) and the recall before and after is compared in a section;
    ValueError for a model without an ITM head."""
    if rerank_itm is not None:
        if rerank_itm < 1:
            raise ValueError(f"--rerank-itm={rerank_itm} must be >= 1")
        check_itm_model(loaded)
    loader = loaders()
    image_features, text_features, text_image, keys, texts = embed_images_and_captions(
        loaded, loader, captions=captions, precision=precision, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    result = retrieval_metrics(
        image_features, text_features, text_image, ks=RECALL_KS, max_memory_bytes=max_memory_bytes
    )
    n_images, n_texts = len(image_features), len(text_features)
    metrics = {
        **result.to_dict(),
        "n_images": n_images,
        "n_texts": n_texts,
        "captions": captions,
        **skip_metrics(loader.skip_counter, "retrieval data"),
    }
    curves = {
        "image->text": recall_curve(result.image_to_text.ranks, n_texts),
        "text->image": recall_curve(result.text_to_image.ranks, n_images),
    }
    sections = [recall_curve_section(curves, title="Retrieval: Recall@K")]
    sections[0].blocks.insert(0, Text(RECALL_DEFINITION))
    caveats = shared_caption_caveats(texts, text_image.tolist(), metrics)
    for offset, (name, caveat) in enumerate(caveats.items(), 1):
        sections[0].blocks.insert(offset, Text(f"⚠ {name}: {caveat}"))
    itm_result, itm_metrics = None, None
    if rerank_itm is not None:

        def score_pairs(image_index: Tensor, text_index: Tensor) -> Tensor:
            return itm_pair_scores(
                loaded, loaders(), keys, texts, image_index, text_index,
                batch_size=batch_size, precision=precision, progress=progress,
            )  # fmt: skip

        itm_result = rerank_with_scores(
            image_features, text_features, text_image, score_pairs,
            k=rerank_itm, ks=RECALL_KS, max_memory_bytes=max_memory_bytes,
        )  # fmt: skip
        itm_metrics = {**itm_result.to_dict(), "k": min(rerank_itm, n_images, n_texts)}
        sections.insert(0, itm_rerank_section(result, itm_result, rerank_itm))
    if n_examples > 0:
        sections.append(
            _retrieval_examples(
                loaded,
                loaders,
                image_features,
                text_features,
                text_image,
                keys,
                texts,
                n_examples,
                max_memory_bytes,
            )  # fmt: skip
        )
    return RetrievalRun(result, metrics, sections, itm_result, itm_metrics, caveats)


RECALL_DEFINITION = (
    "Recall@K: the share of queries whose correct item (image->text: one of the image's own "
    "captions; text->image: the caption's own image) is among the first K results. Ties "
    "count against the model: a wrong item scoring exactly as high as the correct one ranks "
    "above it."
)


def shared_caption_caveats(
    texts: Sequence[str], text_image: Sequence[int], metrics: dict[str, Any]
) -> dict[str, str]:
    """Where images share captions word for word, image -> text Recall@K has a ceiling below 1
    by construction (`metric_notes.reachable_image_to_text`): adds
    `images_with_shared_captions` and `image_to_text/reachable_recall@K` (K of RECALL_KS with
    a ceiling below 1) to `metrics` and returns a caveat for each such recall; {} otherwise."""
    n, shared, reachable = reachable_image_to_text(texts, text_image, RECALL_KS)
    if shared == 0:
        return {}
    metrics["images_with_shared_captions"] = shared
    caveats = {}
    for k, ceiling in reachable.items():
        if ceiling < 1:
            metrics[f"image_to_text/reachable_recall@{k}"] = ceiling
            caveats[f"image_to_text/recall@{k}"] = (
                f"{shared} of {n} images have only captions that other images share word for "
                f"word: identical texts tie with the image's own and ties count against the "
                f"model, so no model exceeds {ceiling:.3g} here (low by construction, not a "
                "model failure)"
            )
    return caveats


def itm_rerank_section(before: RetrievalResult, after: RetrievalResult, k: int) -> Section:
    """Recall@K and mean rank of both directions before and after ITM re-ranking."""
    rows = []
    for name, old, new in (
        ("image->text", before.image_to_text, after.image_to_text),
        ("text->image", before.text_to_image, after.text_to_image),
    ):
        for r in sorted(old.recall):
            rows.append(
                {
                    "direction": name,
                    "metric": f"R@{r}",
                    "embeddings": old.recall[r],
                    "ITM re-ranked": new.recall[r],
                    "change": new.recall[r] - old.recall[r],
                }
            )
        rows.append(
            {
                "direction": name,
                "metric": "mean rank",
                "embeddings": old.mean_rank,
                "ITM re-ranked": new.mean_rank,
                "change": new.mean_rank - old.mean_rank,
            }
        )
    return table_section(
        f"Retrieval: ITM re-ranking of the top {k}",
        rows,
        text=(
            f"Each query's top {k} candidates by embedding similarity re-ordered by the ITM "
            "head's match probability (metrics `retrieval_itm/...`); a query whose correct item "
            f"is not in its top {k} keeps its rank, so R@K for K >= {k} does not change. "
            "R@K: the share of queries whose correct item is among the first K results; ties "
            "count against the model."
        ),
    )


def _spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n)."""
    count = min(count, n)
    return sorted({math.floor(i * n / count) for i in range(count)})


def _retrieval_examples(
    loaded: LoadedModel,
    loaders: LoaderFactory,
    image_features: Tensor,
    text_features: Tensor,
    text_image: Tensor,
    keys: list[str],
    texts: list[str],
    n_examples: int,
    max_memory_bytes: int,
) -> Section:
    text_queries = torch.tensor(_spread(len(texts), n_examples), device=text_image.device)
    _, found_images = topk_retrieval(
        text_features[text_queries],
        image_features,
        min(TOP_RESULTS, len(image_features)),
        max_memory_bytes=max_memory_bytes,
    )  # (q, k) image indices
    captioned = torch.unique(text_image)  # images that are queries
    image_queries = captioned[_spread(len(captioned), n_examples)]
    _, found_texts = topk_retrieval(
        image_features[image_queries],
        text_features,
        min(TOP_RESULTS, len(text_features)),
        max_memory_bytes=max_memory_bytes,
    )  # (q, k) text indices
    needed = {keys[i] for i in found_images.flatten().tolist()}
    needed |= {keys[i] for i in image_queries.tolist()}
    images = images_by_key(loaders(), sorted(needed), loaded.mean, loaded.std)
    text_to_image = [
        RetrievalExample(
            texts[q],
            [images[keys[i]] for i in row],
            [i == int(text_image[q]) for i in row],
        )
        for q, row in zip(text_queries.tolist(), found_images.tolist(), strict=True)
    ]
    image_to_text = [
        RetrievalExample(
            images[keys[q]],
            [texts[t] for t in row],
            [int(text_image[t]) == q for t in row],
        )
        for q, row in zip(image_queries.tolist(), found_texts.tolist(), strict=True)
    ]
    section = retrieval_examples_section(
        text_to_image, image_to_text, title="Retrieval: examples (top 5)"
    )
    section.blocks.insert(
        0,
        Text(
            "A result is correct (✓) when it is the query's own image or one of the image's own "
            "captions; another image that fits the caption equally well counts as wrong, as in "
            "Recall@K."
        ),
    )
    return section


@torch.no_grad()
def embed_labelled_images(
    loaded: LoadedModel,
    loader: EvalLoader,
    *,
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "images",
) -> tuple[Tensor, Tensor, list[str]]:
    """(image features (N, D) L2-normalised fp32 on the model's device, labels (N,) on the
    CPU, sample keys) of every labelled image of `loader`, sorted by sample key: the order
    (and so a probe's seeded validation split) does not depend on how many workers read the
    data; the keys name the groups of `probe_groups`.
    ValueError for an unlabelled image."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    model = loaded.model
    device = next(model.parameters()).device
    dtype = PRECISIONS[precision]
    features: list[Tensor] = []
    labels: list[Tensor] = []
    keys: list[str] = []
    total = len(loader) if _has_length(loader) else None
    with eval_mode(model):
        for batch in tqdm(loader, total=total, disable=not progress, desc=desc, unit="batch"):
            if (batch["labels"] < 0).any():
                key = batch["keys"][int((batch["labels"] < 0).nonzero()[0])]
                raise ValueError(f"sample {key!r} has no label: a probe needs labelled images")
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                features.append(embed_images(model, batch["images"].to(device)))
            labels.append(batch["labels"])
            keys.extend(batch["keys"])
    if not features:
        raise ValueError("the data yielded no images")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    return (
        torch.cat(features)[index.to(features[0].device)],
        torch.cat(labels)[index],
        [keys[i] for i in order],
    )


def probe_groups(keys: Sequence[str], pattern: str | None) -> list[str] | None:
    """Each key with the first match of the regular expression `pattern` removed: the group
    a probe's validation split keeps whole (None without a pattern). ValueError for a pattern
    that does not compile or matches no key."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"probe group pattern {pattern!r}: {error}") from None
    groups = [compiled.sub("", key, count=1) for key in keys]
    if groups == list(keys):
        raise ValueError(
            f"probe group pattern {pattern!r} matches none of the {len(keys)} training keys "
            f"(e.g. {keys[0]!r})"
        )
    return groups


PROBE_DEFINITIONS = {
    "zero-shot": "argmax of the cosine between the image and each class's averaged prompt "
    "embeddings; no training images.",
    "linear probe": "multinomial logistic regression on the frozen (standardised) image "
    "features of the training data, L2 strength chosen on a validation split of it (CLIP's "
    "protocol).",
    "linear probe, zero-shot prior": "the same, its weights pulled towards the zero-shot "
    "head instead of towards zero: it leaves zero-shot's predictions only as far as the "
    "validation split shows a gain.",
    "k-NN": "majority vote of the k training images of highest cosine similarity (ties: the "
    "larger summed similarity).",
}


@dataclass
class ProbeRun:
    """Linear probe (plain and with the zero-shot prior) and/or k-NN results, their report
    metrics and their section."""

    linear: ProbeResult | None
    knn: KnnResult | None
    metrics: dict[str, Any]
    section: Section
    linear_prior: ProbeResult | None = None


def run_probes(
    loaded: LoadedModel,
    train_loaders: LoaderFactory,
    test_loaders: LoaderFactory,
    n_classes: int,
    *,
    zeroshot_top1: float | None = None,
    zeroshot_classifier: Tensor | None = None,
    linear: bool = True,
    knn_k: int | None = None,
    knn_shots: int | None = None,
    seed: int = 0,
    folds: int | None = None,
    repeats: int = 1,
    group_pattern: str | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> ProbeRun:
    """Linear probe (`linear`) and k-NN (`knn_k`) on the frozen image features of the labelled
    images of `train_loaders()`, scored on those of `test_loaders()`; metrics `linear_probe`
    and `knn`, and a section comparing their top-1 with `zeroshot_top1`. With
    `zeroshot_classifier` ((C, D), `ZeroShotResult.classifier`) the linear probe is also fitted
    towards the zero-shot head (`linear_probe_zeroshot_prior`). `folds` / `repeats`: choose
    the probes' C by repeated k-fold cross-validation (`linear_probe`). `group_pattern`: a
    regular expression; training images whose keys are equal once its first match is
    removed form a group (`-r\\d+$`: the renderings of one scan) that every validation split
    keeps on one side."""
    if not linear and knn_k is None:
        raise ValueError("run_probes: nothing to run (linear=False and knn_k=None)")
    train_loader, test_loader = train_loaders(), test_loaders()
    train_features, train_labels, train_keys = embed_labelled_images(
        loaded, train_loader, precision=precision, progress=progress, desc="train images"
    )
    groups = probe_groups(train_keys, group_pattern)  # a pattern matching no key: fail now
    test_features, test_labels, _ = embed_labelled_images(
        loaded, test_loader, precision=precision, progress=progress, desc="test images"
    )
    train, test = (train_features, train_labels), (test_features, test_labels)
    for name, (_, labels) in (("training", train), ("test", test)):
        if labels.max() >= n_classes:
            raise ValueError(f"the {name} data has label {labels.max()} but {n_classes} classes")
    skipped: Counter[str] = Counter()
    for loader, what in ((train_loader, "probe training data"), (test_loader, "probe test data")):
        skipped.update(loader.skip_counter.report(what))
    probe = partial(
        linear_probe, train, test, n_classes,
        seed=seed, folds=folds, repeats=repeats, groups=groups, progress=progress,
    )  # fmt: skip
    linear_result = probe() if linear else None
    prior_result = (
        probe(prior=zeroshot_classifier) if linear and zeroshot_classifier is not None else None
    )
    knn_result = (
        knn_probe(train, test, knn_k, n_classes, shots=knn_shots, seed=seed)
        if knn_k is not None
        else None
    )
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if zeroshot_top1 is not None:
        rows.append(
            {"method": "zero-shot", "top-1": zeroshot_top1, "what": PROBE_DEFINITIONS["zero-shot"]}
        )
    for result, key, method in (
        (linear_result, "linear_probe", "linear probe"),
        (prior_result, "linear_probe_zeroshot_prior", "linear probe, zero-shot prior"),
    ):
        if result is not None:
            metrics[key] = result.to_dict()
            rows.append(
                {
                    "method": f"{method} (C={result.c:.3g})",
                    "top-1": result.top1,
                    "what": PROBE_DEFINITIONS[method],
                }
            )
    if knn_result is not None:
        metrics["knn"] = knn_result.to_dict()
        shots = "all" if knn_shots is None else f"{knn_shots} a class"
        rows.append(
            {
                "method": f"{knn_result.k}-NN ({shots})",
                "top-1": knn_result.top1,
                "what": PROBE_DEFINITIONS["k-NN"],
            }
        )
    if skipped:
        metrics["probe_skipped"] = dict(skipped)
    grouped = "" if groups is None else f" (kept whole: {len(set(groups))} groups of keys)"
    validation = (
        f"on a validation split of {VAL_FRACTION:.0%} of them"
        if folds is None
        else f"by {folds}-fold cross-validation on them"
        + (f", {repeats} times" if repeats > 1 else "")
    ) + grouped
    section = table_section(
        "Zero-shot, linear probe and k-NN",
        rows,
        text=(
            f"Top-1 accuracy on the {len(test[1])} test images; the probes are trained on the "
            f"image features of {len(train[1])} labelled training images (the image tower "
            f"frozen), their L2 strength chosen {validation}. Top-1: the share of test images "
            "whose predicted class is their label."
        ),
    )
    return ProbeRun(linear_result, knn_result, metrics, section, prior_result)
