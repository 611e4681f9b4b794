"""LightningDataModules over webdataset shards: image-text pairs, VQA and image classification.

Every datamodule builds its loaders with `build_pipeline` (the epoch's samples planned over
ranks x workers, decode, transform + tokenize in the workers, batching inside the pipeline)
and `ShardLoader`. A training epoch is one pass over the training shards (every sample once
over all ranks and workers; under DDP every rank steps the same number of full batches, at
most one of them padded), reshuffled each epoch, unless `epoch_length` or `resampled` say
otherwise; `sources` mixes several shard sets by weight. Validation reads every sample
exactly once over all ranks, never padded. The training loader's position is saved in every
Lightning checkpoint, so `--ckpt_path` resumes mid-epoch with exactly the batches that were
next.

Batches:

- `ImageTextDataModule`: `images` (B, 3, H, W), `input_ids` / `attention_mask` (B, T) with
  T = `context_length` (as `open_clip.tokenize`), `labels` (B,) (-1 without a label),
  `keys` (B sample keys) and `skipped` (skip counts by reason);
- `VQADataModule`: one item per question: `images`, question `input_ids` / `attention_mask`,
  `answers` (B lists of the annotators' answers), `answer_ids` (B,) (the most frequent answer
  in the vocabulary, -1 if none is) and `answer_scores` (B, V) = min(#annotators / 3, 1),
  `keys`, `skipped`;
- `ShardClassificationDataModule`: a tuple `(images, labels)`, as `ImageClassifier` expects.

Add `SkippedSamplesLogger` to the Trainer's callbacks to log the skipped samples per epoch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from webdataset.tariterators import base_plus_ext

from multimodal.data.answers import normalize_answer  # the form answers are counted in
from multimodal.data.pipeline import (
    STREAM,
    Batch,
    ShardLoader,
    ShardPipelineConfig,
    SkipSample,
    Source,
    build_pipeline,
    decode_sample,
    expand_urls,
)
from multimodal.data.predict_inputs import (
    ImageFolderDataset,
    Unwrapped,
    image_key_collate,
    rank_loader,
)
from multimodal.data.text import TokenizerMixin, pad_sequences
from text.tokenizer import Tokenizer
from vision.transforms import ImageTransformConfig

log = logging.getLogger(__name__)

VQA_SCORE_ANNOTATORS = 3  # an answer given by this many annotators scores 1 (VQA v2)
SPLITS = ("train", "val")


def clip_image_transform(image_size: int = 224) -> ImageTransformConfig:
    """open_clip's transforms: random resized crop of 90-100% of the area, no flip (captions
    say left and right), resize + center crop of the whole image at eval, OpenAI CLIP stats."""
    return ImageTransformConfig(
        image_size=image_size,
        normalization="openai_clip",
        train_scale=(0.9, 1.0),
        hflip=0.0,
        crop_pct=1.0,
    )


def sample_label(sample: dict[str, Any]) -> int:
    """The label of a decoded sample: `cls`, else the json `label`, else -1."""
    if "cls" in sample:
        return sample["cls"]
    label = sample.get("json", {}).get("label")
    if label is None:
        return -1
    if isinstance(label, bool) or not isinstance(label, int):
        raise SkipSample("invalid label", f"json label {label!r} is not an int")
    return label


def _image(sample: dict[str, Any]) -> Any:
    if "image" not in sample:
        raise SkipSample("missing image")
    return sample["image"]


def _pad_ids(rows: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[Tensor, Tensor]:
    """(B, width) ids and bool mask (True = real token) of rows no longer than width."""
    ids, mask = pad_sequences(rows, pad_id)  # (B, T') with T' = longest row
    extra = width - ids.shape[1]
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=False)


# ---------------------------------------------------------------------------------------------
# per-sample maps and collates (dataclasses, so that spawned workers can pickle them)


@dataclass
class ImageTextSample:
    """Decoded sample -> `{"image", "input_ids", "label", "key"}`.

    The caption is `txt`; with `sample_captions`, one of `json["captions"]` drawn at random
    when there are any; without `txt`, the first of those. No caption: `SkipSample`.
    """

    transform: Callable
    tokenizer: Tokenizer
    context_length: int
    sample_captions: bool = False

    def caption(self, sample: dict[str, Any]) -> str:
        captions = sample.get("json", {}).get("captions") or []
        if not isinstance(captions, list):
            raise SkipSample("invalid captions", f"json captions is a {type(captions).__name__}")
        captions = [c for c in captions if isinstance(c, str) and c.strip()]
        text = sample.get("txt", "").strip()
        if captions and (self.sample_captions or not text):
            return random.choice(captions) if self.sample_captions else captions[0]
        if not text:
            raise SkipSample("missing caption")
        return text

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = _image(sample)
        caption = self.caption(sample)
        return {
            "image": self.transform(image),  # (3, H, W)
            "input_ids": self.tokenizer.encode(caption, max_length=self.context_length),
            "label": sample_label(sample),
            "key": sample["__key__"],
            "references": self.references(sample, caption),
        }

    @staticmethod
    def references(sample: dict[str, Any], caption: str) -> list[str]:
        """Every caption of the sample (`txt` and `json["captions"]`), for caption metrics."""
        captions = sample.get("json", {}).get("captions") or []
        text = sample.get("txt", "").strip()
        found = [text] if text else []
        found += [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        return list(dict.fromkeys(found)) or [caption]


@dataclass
class ImageTextCollator:
    """Image-text items -> `images`, `input_ids`, `attention_mask`, `labels`, `keys`,
    `references` (all captions of each image)."""

    pad_id: int
    context_length: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = _pad_ids([i["input_ids"] for i in items], self.pad_id, self.context_length)
        return {
            "images": default_collate([i["image"] for i in items]),  # (B, 3, H, W)
            "input_ids": ids,  # (B, T)
            "attention_mask": mask,  # (B, T)
            "labels": torch.tensor([i["label"] for i in items], dtype=torch.long),  # (B,)
            "keys": [i["key"] for i in items],
            "references": [i["references"] for i in items],  # every caption of each image
        }


def vqa_pairs(sample: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The (question, answers) pairs of `json["vqa"]`; none or a malformed one: `SkipSample`."""
    pairs = sample.get("json", {}).get("vqa")
    if not pairs:
        raise SkipSample("missing vqa")
    result = []
    for pair in pairs if isinstance(pairs, list) else [pairs]:
        question = pair.get("question") if isinstance(pair, dict) else None
        answers = pair.get("answers", []) if isinstance(pair, dict) else None
        if (
            not isinstance(question, str)
            or not question.strip()
            or not isinstance(answers, list)
            or not all(isinstance(a, str) for a in answers)
        ):
            raise SkipSample(
                "malformed vqa", f"expected {{question: str, answers: [str]}}: {pair!r}"
            )
        result.append((question.strip(), answers))
    return result


def answer_targets(answers: Sequence[str], index: dict[str, int]) -> tuple[int, dict[int, float]]:
    """(the vocabulary id of the most frequent answer, -1 if none is in the vocabulary; soft
    scores id -> min(#annotators giving it / 3, 1)); answers are compared normalised."""
    counts = Counter(normalize_answer(a) for a in answers)
    known = {index[a]: n for a, n in counts.items() if a in index}
    scores = {i: min(n / VQA_SCORE_ANNOTATORS, 1.0) for i, n in known.items()}
    best = min(known, key=lambda i: (-known[i], i), default=-1)  # ties: the more frequent answer
    return best, scores


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most annotators gave (normalised; ties: the first given); "" if none."""
    counts = Counter(normalize_answer(a) for a in answers)
    return max(counts, key=counts.__getitem__, default="")


@dataclass
class VQASample:
    """Decoded sample -> one item per VQA pair: `{"image", "input_ids", "answers",
    "answer_id", "scores", "key"}` (the image transformed once, shared by its questions);
    with `one_question`, one pair drawn at random (one item per image)."""

    transform: Callable
    tokenizer: Tokenizer
    context_length: int
    answer_index: dict[str, int]
    one_question: bool = False

    def __call__(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        image = _image(sample)
        pairs = list(enumerate(vqa_pairs(sample)))
        if self.one_question:
            pairs = [random.choice(pairs)]
        pixels = self.transform(image)  # (3, H, W)
        items = []
        for n, (question, answers) in pairs:
            answer_id, scores = answer_targets(answers, self.answer_index)
            items.append(
                {
                    "image": pixels,
                    "input_ids": self.tokenizer.encode(question, max_length=self.context_length),
                    "answers": answers,
                    "answer_tokens": self.tokenizer.encode(
                        most_common_answer(answers), max_length=self.context_length
                    ),
                    "answer_id": answer_id,
                    "scores": scores,
                    "key": f"{sample['__key__']}/{n}",
                }
            )
        return items


@dataclass
class VQACollator:
    """VQA items -> `images`, `input_ids`, `attention_mask`, `answers`, `answer_ids`,
    `answer_scores` (B, n_answers), `answer_input_ids` / `answer_attention_mask` (the most
    common answer tokenized, for answer decoders), `keys`."""

    pad_id: int
    context_length: int
    n_answers: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = _pad_ids([i["input_ids"] for i in items], self.pad_id, self.context_length)
        answer_ids, answer_mask = _pad_ids(
            [i["answer_tokens"] for i in items], self.pad_id, self.context_length
        )
        scores = torch.zeros(len(items), self.n_answers)  # (B, V)
        for row, item in enumerate(items):
            for answer, score in item["scores"].items():
                scores[row, answer] = score
        return {
            "images": default_collate([i["image"] for i in items]),  # (B, 3, H, W)
            "input_ids": ids,  # (B, T)
            "attention_mask": mask,  # (B, T)
            "answers": [i["answers"] for i in items],
            "answer_input_ids": answer_ids,  # (B, T_a) the most common answer, for decoders
            "answer_attention_mask": answer_mask,  # (B, T_a)
            "answer_ids": torch.tensor([i["answer_id"] for i in items], dtype=torch.long),  # (B,)
            "answer_scores": scores,
            "keys": [i["key"] for i in items],
        }


@dataclass
class ClassificationSample:
    """Decoded sample -> (image tensor, label); no label or one outside [0, num_classes):
    `SkipSample`."""

    transform: Callable
    num_classes: int | None = None

    def __call__(self, sample: dict[str, Any]) -> tuple[Tensor, int]:
        image = _image(sample)
        label = sample_label(sample)
        if label < 0:
            raise SkipSample("missing label")
        if self.num_classes is not None and label >= self.num_classes:
            raise SkipSample("label out of range", f"label {label} >= {self.num_classes}")
        return self.transform(image), label


@dataclass
class ImageKeySample:
    """Decoded shard sample -> `{"image", "key"}` (predicting needs no label or caption)."""

    transform: Callable

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": self.transform(_image(sample)), "key": sample["__key__"]}


def classification_collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """(image, label) items -> (images (B, 3, H, W), labels (B,) long)."""
    images = default_collate([image for image, _ in items])
    return images, torch.tensor([label for _, label in items], dtype=torch.long)


def _is_json(name: str) -> bool:
    _, ext = base_plus_ext(name)
    return ext is not None and ext.lower() == "json"


def build_answer_vocab(urls: str | Sequence[str], max_answers: int | None = None) -> list[str]:
    """Answers of the `json["vqa"]` pairs in the shards, normalised, ranked by the number of
    questions they answer (ties alphabetically), the first `max_answers`. Reads only the json
    entries; samples with unreadable json are left out."""
    counts: Counter[str] = Counter()

    shards = [{"url": url} for url in expand_urls(urls)]
    for raw in wds.tarfile_samples(
        iter(shards), handler=wds.warn_and_continue, select_files=_is_json
    ):
        try:
            pairs = vqa_pairs(decode_sample(raw))
        except SkipSample:
            continue
        for _, answers in pairs:
            counts.update({normalize_answer(a) for a in answers})
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return ranked[:max_answers] if max_answers is not None else ranked


# ---------------------------------------------------------------------------------------------
# datamodules


class _ShardDataModule(LightningDataModule):
    """What the shard datamodules share: validation of the loader options, one pipeline
    config per split, loaders. Subclasses give `map_sample(split)` and `collate()`."""

    def __init__(
        self,
        train_urls: str | list[str] | None,
        val_urls: str | list[str] | None,
        transform: ImageTransformConfig,
        batch_size: int,
        val_batch_size: int | None,
        num_workers: int,
        persistent_workers: bool,
        pin_memory: bool,
        shuffle_buffer: int,
        resampled: bool,
        epoch_length: int | None,
        seed: int,
        sources: list[Source] | None = None,
        one_val_item_per_sample: bool = True,
        predict_urls: str | list[str] | None = None,
        predict_images: str | None = None,
    ) -> None:
        super().__init__()
        if sources is not None and train_urls is not None:
            raise ValueError("train_urls and sources are both set; give one of them")
        if sources is None and not train_urls:
            raise ValueError(f"train_urls={train_urls!r} is empty; expected shard URLs")
        if val_urls is not None and not val_urls:
            raise ValueError(f"val_urls={val_urls!r} is empty; expected shard URLs or None")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.transform = transform
        self._train_state: dict[str, Any] | None = None  # a resumed loader position
        self._train_loader: ShardLoader | None = None
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.configs: dict[str, ShardPipelineConfig] = {
            "train": ShardPipelineConfig(
                urls=train_urls,
                sources=sources,
                batch_size=batch_size,
                shuffle_shards=True,
                shuffle_buffer=shuffle_buffer,
                resampled=resampled,
                epoch_length=epoch_length,
                seed=seed,
                training=True,
            )
        }

        def evaluation_config(urls: Any) -> ShardPipelineConfig:
            """Every item once over all ranks, in order (validation and prediction)."""
            return ShardPipelineConfig(
                urls=urls,
                batch_size=val_batch_size or batch_size,
                shuffle_shards=False,
                shuffle_buffer=0,
                seed=seed,
                training=False,
                one_item_per_sample=one_val_item_per_sample,
            )

        if val_urls is not None:
            self.configs["val"] = evaluation_config(val_urls)
        if predict_urls is not None and not predict_urls:
            raise ValueError(f"predict_urls={predict_urls!r} is empty; expected shard URLs or None")
        if predict_urls is not None and predict_images is not None:
            raise ValueError("predict_urls and predict_images are both set; give one of them")
        self.predict_images = predict_images
        predict_from = predict_urls if predict_urls is not None else val_urls
        self.predict_config = None if predict_from is None else evaluation_config(predict_from)
        self.predict_batch_size = val_batch_size or batch_size

    @property
    def train_shard_urls(self) -> list[str]:
        """Every training shard (of every source)."""
        return [u for source in self.configs["train"].source_list for u in expand_urls(source.urls)]

    def setup(self, stage: str | None = None) -> None:
        for config in self.configs.values():
            for source in config.source_list:
                expand_urls(source.urls)  # a missing shard fails here, not in a worker

    def map_sample(self, split: str) -> Callable[[dict[str, Any]], Any]:
        raise NotImplementedError

    def collate(self) -> Callable[[list[Any]], Batch]:
        raise NotImplementedError

    def image_transform(self, split: str) -> Callable:
        return self.transform.train() if split == "train" else self.transform.eval()

    def loader(self, split: str) -> ShardLoader:
        """A loader over the split's shards (built now: rank and world size are read from
        torch.distributed at this point). The training loader follows the Trainer's epoch and
        knows how many batches its loop has taken, for an exact resume."""
        config = self.configs[split]
        dataset = build_pipeline(config, self.map_sample(split), collate=self.collate())
        trainer = self.trainer
        return ShardLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            progress=TrainerProgress(trainer) if split == "train" and trainer else None,
        )

    def train_dataloader(self) -> ShardLoader:
        loader = self.loader("train")
        if self._train_state is not None:
            loader.load_state_dict(self._train_state)
            self._train_state = None
        self._train_loader = loader
        return loader

    # The training loader's position goes into every checkpoint through the datamodule's
    # state: Lightning restores a datamodule before `configure_optimizers` builds the loader
    # (to count the schedule's steps), whereas it would hand a loader's own state to that
    # already-built loader only when it builds it again.

    def state_dict(self) -> dict[str, Any]:
        loader = self._train_loader
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        loader = self._train_loader
        if state is not None and loader is not None:
            loader.load_state_dict(state)
        else:
            self._train_state = state

    def val_dataloader(self) -> ShardLoader | list:
        return self.loader("val") if "val" in self.configs else []

    def predict_parts(self) -> tuple[Callable[[dict[str, Any]], Any], Callable[[list[Any]], Batch]]:
        """(map_sample, collate) of the predicted shard samples: validation's, whose batches
        carry `keys` (a subclass whose batches do not overrides this)."""
        return self.map_sample("predict"), self.collate()

    def predict_dataloader(self) -> Unwrapped | DataLoader:
        """`predict_images` (every image file under the folder, sorted, key = relative path),
        else the `predict_urls` shards (default: `val_urls`) read as validation reads them:
        every item exactly once over all ranks, in order, nothing padded."""
        if self.predict_images is not None:
            return rank_loader(
                ImageFolderDataset(self.predict_images, self.image_transform("predict")),
                batch_size=self.predict_batch_size,
                collate=image_key_collate,
                trainer=self.trainer,
                num_workers=self.num_workers,
            )
        if self.predict_config is None:
            raise ValueError(
                f"{type(self).__name__} has nothing to predict: set predict_urls (or "
                "val_urls), or predict_images for a folder of images"
            )
        for source in self.predict_config.source_list:
            expand_urls(source.urls)  # a missing shard fails here, not in a worker
        map_sample, collate = self.predict_parts()
        dataset = build_pipeline(self.predict_config, map_sample, collate=collate)
        loader = PredictShardLoader(
            dataset, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        return Unwrapped(loader)


class PredictShardLoader(ShardLoader):
    """A ShardLoader whose dict batches carry `order`: [the DataLoader worker that made the
    batch, its number among that worker's batches]. A rank's workers read contiguous runs of
    whole batches in worker order (`multimodal.data.stream_plan`) and the DataLoader hands
    their batches out in turn, so sorting a rank's items by `order` gives back the order of
    the data (what the prediction writer does)."""

    def _batches(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        return super()._batches(self._tagged(batches))

    @staticmethod
    def _tagged(batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            if isinstance(batch, dict):  # before ShardLoader takes the stream entry out
                stream = batch.get(STREAM, {})
                batch["order"] = [int(stream.get("worker", 0)), int(stream.get("batches", 0))]
            yield batch


@dataclass
class TrainerProgress:
    """The training loop's epoch and the batches of it the loop has taken (Lightning fetches
    one batch ahead, so the loader alone would count one too many)."""

    trainer: Trainer

    def epoch(self) -> int:
        return self.trainer.current_epoch

    def consumed(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed


class _TokenizedShardDataModule(TokenizerMixin, _ShardDataModule):
    """A shard datamodule with a tokenizer (loaded on first use) and a context length."""

    def __init__(self, tokenizer: str, context_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2 (BOS and EOS)")
        self.tokenizer_name = tokenizer
        self.context_length = context_length


class ImageTextDataModule(_TokenizedShardDataModule):
    """Image-caption pairs from shards (`jpg`/`png` + `txt`, optional `json` captions and
    label, `cls`) for CLIP-style contrastive training and captioning.

    Args:
        train_urls: training shards (brace pattern, list, directory, `pipe:` command).
        val_urls: validation shards, read once in order (None = no validation).
        tokenizer: "clip" or a directory written by `Tokenizer.save`.
        context_length: tokens per caption, BOS and EOS included; captions are cut (keeping
            EOS) and padded to it.
        transform: image transforms (default: `clip_image_transform()`, 224 px, CLIP stats).
        sample_captions: in training, draw one of `json["captions"]` when the sample has them.
        batch_size: items per batch and rank.
        val_batch_size: items per validation batch (default: batch_size).
        num_workers: DataLoader worker processes per rank.
        persistent_workers: keep workers between epochs.
        pin_memory: pin batches in page-locked memory (faster copies to a GPU).
        shuffle_buffer: raw samples each worker holds for shuffling (0 = off).
        resampled: draw training shards with replacement (needs epoch_length).
        epoch_length: training batches per rank per epoch; None = one pass over the training
            shards (every sample once over all ranks and workers).
        seed: seed of the shard order, the shuffle buffer and the per-sample augmentations.
        sources: instead of train_urls, several shard sets mixed by weight:
            `[{urls: ..., weight: 0.7, name: web}, {urls: ..., weight: 0.3}]`; an epoch is
            `epoch_length` batches per rank (default: one pass's worth of all their samples);
            the per-source counts are logged by `SkippedSamplesLogger` (`data/source/NAME`).
        predict_urls: shards `multimodal predict` reads (default: val_urls), every sample
            once over all ranks, in order; batches as validation's (a caption is needed).
        predict_images: instead, a folder of images to predict (every image file under it,
            sorted by relative path, which is the key); batches hold `images` and `keys`.
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        tokenizer: str = "clip",
        context_length: int = 77,
        transform: ImageTransformConfig | None = None,
        sample_captions: bool = True,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        sources: list[Source] | None = None,
        predict_urls: str | list[str] | None = None,
        predict_images: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            context_length=context_length,
            train_urls=train_urls,
            val_urls=val_urls,
            transform=transform or clip_image_transform(),
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            epoch_length=epoch_length,
            seed=seed,
            sources=sources,
            predict_urls=predict_urls,
            predict_images=predict_images,
        )
        self.sample_captions = sample_captions

    def map_sample(self, split: str) -> ImageTextSample:
        return ImageTextSample(
            transform=self.image_transform(split),
            tokenizer=self.tokenizer,
            context_length=self.context_length,
            sample_captions=self.sample_captions and split == "train",
        )

    def collate(self) -> ImageTextCollator:
        return ImageTextCollator(pad_id=self.pad_id, context_length=self.context_length)


class VQADataModule(_TokenizedShardDataModule):
    """Visual question answering from shards: one item per pair of `json["vqa"]`
    (`{"question": str, "answers": [str, ...]}`, the answers of several annotators).

    Targets are over an answer vocabulary: `answer_vocab`, or the `max_answers` answers of the
    training shards answering the most questions (read in `setup`, on every rank: the same
    shards give the same list; pass the list for large datasets). Answers are matched
    lower-cased with whitespace collapsed.

    Args:
        answer_vocab: the answers, in id order (None = built from `train_urls`).
        max_answers: size of a built vocabulary (VQA v2 models use 3129).
        one_question_per_image: in training, one question drawn at random per image and
            epoch instead of all of them: every batch holds `batch_size` different images
            and an epoch is one pass over the images (validation always asks every question).
        predict_urls: shards `multimodal predict` reads (default: val_urls): every question
            of every sample once over all ranks, in order (key `<sample key>/<question n>`).
        (the other arguments as `ImageTextDataModule`; `context_length` bounds the question)
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        tokenizer: str = "clip",
        context_length: int = 77,
        transform: ImageTransformConfig | None = None,
        answer_vocab: list[str] | None = None,
        max_answers: int | None = 3129,
        one_question_per_image: bool = True,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        sources: list[Source] | None = None,
        predict_urls: str | list[str] | None = None,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            context_length=context_length,
            train_urls=train_urls,
            val_urls=val_urls,
            transform=transform or clip_image_transform(),
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            epoch_length=epoch_length,
            seed=seed,
            sources=sources,
            one_val_item_per_sample=False,  # one item per question
            predict_urls=predict_urls,
        )
        if answer_vocab is not None:
            normalized = [normalize_answer(a) for a in answer_vocab]
            if not normalized or len(set(normalized)) != len(normalized) or "" in normalized:
                raise ValueError(
                    "answer_vocab must be a non-empty list of distinct, non-blank answers "
                    "(compared lower-cased with whitespace collapsed)"
                )
            answer_vocab = normalized
        if max_answers is not None and max_answers <= 0:
            raise ValueError(f"max_answers={max_answers} must be > 0 or None")
        self.max_answers = max_answers
        self.one_question_per_image = one_question_per_image
        self._answer_vocab = answer_vocab

    @property
    def answer_vocab(self) -> list[str]:
        """The answers in id order (built from the training shards on first use)."""
        if self._answer_vocab is None:
            vocab = build_answer_vocab(self.train_shard_urls, self.max_answers)
            if not vocab:
                raise ValueError(
                    f"the {len(self.train_shard_urls)} training shards hold no json 'vqa' "
                    "answers to build answer_vocab from"
                )
            log.info("answer vocabulary: %d answers from the training shards", len(vocab))
            self._answer_vocab = vocab
        return self._answer_vocab

    @property
    def num_answers(self) -> int:
        return len(self.answer_vocab)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        _ = self.answer_vocab

    def map_sample(self, split: str) -> VQASample:
        return VQASample(
            transform=self.image_transform(split),
            tokenizer=self.tokenizer,
            context_length=self.context_length,
            answer_index={answer: i for i, answer in enumerate(self.answer_vocab)},
            one_question=self.one_question_per_image and split == "train",
        )

    def collate(self) -> VQACollator:
        return VQACollator(
            pad_id=self.pad_id, context_length=self.context_length, n_answers=self.num_answers
        )


class ShardClassificationDataModule(_ShardDataModule):
    """Image classification from shards: the label is `cls`, else `json["label"]`; samples
    without one (or outside [0, num_classes)) are skipped. Batches are `(images, labels)`
    tuples, as `multimodal.tasks.ImageClassifier` expects.

    Args:
        num_classes: labels must be below it (None = not checked).
        transform: image transforms (default: `ImageTransformConfig()`, 224 px, ImageNet).
        (the other arguments as `ImageTextDataModule`; predicted shard samples need no label,
        their batches are dicts of `images` and `keys`)
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        num_classes: int | None = None,
        transform: ImageTransformConfig | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        sources: list[Source] | None = None,
        predict_urls: str | list[str] | None = None,
        predict_images: str | None = None,
    ) -> None:
        super().__init__(
            train_urls=train_urls,
            val_urls=val_urls,
            transform=transform or ImageTransformConfig(),
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            epoch_length=epoch_length,
            seed=seed,
            sources=sources,
            predict_urls=predict_urls,
            predict_images=predict_images,
        )
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be > 0 or None")
        self.num_classes = num_classes

    def map_sample(self, split: str) -> ClassificationSample:
        return ClassificationSample(self.image_transform(split), self.num_classes)

    def collate(self) -> Callable[[list[tuple[Tensor, int]]], tuple[Tensor, Tensor]]:
        return classification_collate

    def predict_parts(self) -> tuple[ImageKeySample, Callable[[list[Any]], Batch]]:
        """Predicted samples need no label: `{"images", "keys"}` batches."""
        return ImageKeySample(self.image_transform("predict")), image_key_collate


# ---------------------------------------------------------------------------------------------
# logging the skipped samples


def _shard_loaders(loaders: Any) -> Iterable[ShardLoader]:
    """The ShardLoaders among what the Trainer holds (a loader, a list or a dict of them)."""
    if isinstance(loaders, ShardLoader):
        yield loaders
    elif isinstance(loaders, DataLoader) or loaders is None:
        return
    elif isinstance(loaders, dict):
        for loader in loaders.values():
            yield from _shard_loaders(loader)
    elif isinstance(loaders, list | tuple):
        for loader in loaders:
            yield from _shard_loaders(loader)


class SkippedSamplesLogger(Callback):
    """At the end of each epoch, logs the samples the shard loaders skipped: `data/skipped`
    (training) and `data/val_skipped` (validation), summed over ranks, and warns with the
    count by reason (this rank's); with several training `sources`, also the items drawn
    from each (`data/source/NAME`, summed over ranks)."""

    def _report(self, pl_module: LightningModule, loaders: Any, name: str, what: str) -> None:
        counts: Counter[str] = Counter()
        sources: Counter[str] = Counter()
        found = False
        for loader in _shard_loaders(loaders):
            found = True
            counts.update(loader.skip_counter.take())
            sources.update(loader.source_counts)
            loader.source_counts.clear()
        if not found:
            return
        if counts:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
            log.warning(
                "%s (rank %d): skipped %d samples this epoch (%s)",
                what,
                pl_module.global_rank,
                sum(counts.values()),
                reasons,
            )
        pl_module.log(name, float(sum(counts.values())), reduce_fx="sum", sync_dist=True)
        for source, n in sorted(sources.items()):
            pl_module.log(f"data/source/{source}", float(n), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(pl_module, trainer.train_dataloader, "data/skipped", "training data")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(pl_module, trainer.val_dataloaders, "data/val_skipped", "validation data")
