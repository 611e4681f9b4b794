"""On-disk cache of a model's image and text embeddings of one dataset, for `multimodal
benchmark`: a suite rerun with one new model embeds only that model's data.

Layout: `ROOT/<model fingerprint>/<data fingerprint>-<precision>-<what>.pt`, one file a (model,
dataset) pair, written with `torch.save` to a temporary name then `os.replace`d (a crash leaves
the old file or none) and read with `torch.load(weights_only=True)` (tensors, strings, numbers
only: never unpickled code). Zero-shot classifiers (class prompt embeddings) are cached next to
them, keyed by a hash of the prompts.

- model fingerprint: sha256 of the checkpoint file and of its config's text; for an open_clip
  model, of its architecture name and weights file (or its pretrained tag).
- data fingerprint: sha256 of the spec and of the name, size and mtime of every file it reads
  (the shards, the files of an ImageFolder / torchvision root, a CSV / JSONL file and the images
  it lists). Touching or replacing a file makes a new fingerprint; a remote shard counts by URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from multimodal.eval.datasets import DatasetSpec, FileSamples, ImageSamples

CHUNK = 2**20
FINGERPRINT_CHARS = 16  # hex digits kept in file names (64 bits)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(*parts: str) -> str:
    """The sha256 hex digest of strings joined by NUL bytes."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def model_fingerprint(
    checkpoint: str | os.PathLike | None,
    *,
    config: str | os.PathLike | None = None,
    open_clip: str | None = None,
    pretrained: str | None = None,
    checkpoint_sha256: str | None = None,
) -> str:
    """What identifies a model's weights and preprocessing (see the module docstring);
    `checkpoint_sha256`: the checkpoint's digest when already computed."""
    parts = [f"open_clip={open_clip}", f"pretrained={pretrained}"]
    if checkpoint is not None:
        parts.append(f"checkpoint={checkpoint_sha256 or file_sha256(checkpoint)}")
    if config is not None:
        parts.append(f"config={Path(config).read_text(encoding='utf-8')}")
    return text_sha256(*parts)


def _local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _stat_line(file: str | os.PathLike) -> str:
    stat = os.stat(file)
    return f"{os.fspath(file)}\t{stat.st_size}\t{stat.st_mtime_ns}"


def _tree_files(root: Path) -> list[str]:
    return sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
    )


def data_files(spec: DatasetSpec, data: str | ImageSamples) -> list[str]:
    """Every local file the data is read from, in a stable order (see the module docstring);
    URLs of remote shards as they are."""
    if spec.kind == "shards":
        from multimodal.data.pipeline import expand_urls

        return expand_urls(data if isinstance(data, str) else spec.path)
    path = Path(spec.path).expanduser()
    if spec.kind in ("imagefolder", "torchvision"):
        return _tree_files(path)
    files = [str(path)]
    if isinstance(data, FileSamples):
        files += sorted({record.file for record in data.records})
    return files


def data_fingerprint(spec: DatasetSpec, data: str | ImageSamples) -> str:
    """What identifies the samples of a dataset: its spec and its files' names, sizes and
    modification times (a missing listed image counts as missing)."""
    lines = [str(spec)]
    for file in data_files(spec, data):
        if not _local(file):
            lines.append(file)
        elif os.path.exists(file):
            lines.append(_stat_line(file))
        else:
            lines.append(f"{file}\tmissing")
    return text_sha256(*lines)


@dataclass
class Embeddings:
    """A model's embeddings of one dataset, in data order (fp32, L2-normalised, CPU).

    Attributes:
        image_features: (N, D) one row per image the reader did not skip.
        labels: (N,) long, -1 for an unlabelled image.
        keys: the N sample keys.
        skipped: samples the reader left out, by reason.
        captions: the caption mode the text side was embedded with ("all" / "txt"), None when
            only images were embedded.
        texts, text_features (N_t, D), text_image (N_t,): the captions, their embeddings and
            the index of each caption's image (None without a text side).
    """

    image_features: Tensor
    labels: Tensor
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    captions: str | None = None
    texts: list[str] | None = None
    text_features: Tensor | None = None
    text_image: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """Only tensors, strings, numbers, lists and dicts: loadable with weights_only=True."""
        return {
            "image_features": self.image_features,
            "labels": self.labels,
            "keys": list(self.keys),
            "skipped": dict(self.skipped),
            "captions": self.captions,
            "texts": self.texts,
            "text_features": self.text_features,
            "text_image": self.text_image,
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Embeddings:
        return cls(**value)

    def with_texts(self, captions: str) -> bool:
        """True when the text side was embedded with this caption mode."""
        return self.captions == captions and self.text_features is not None


def atomic_torch_save(value: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then `os.replace` onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(value, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class EmbeddingCache:
    """Embeddings and zero-shot classifiers on disk under `root` (module docstring); counts
    what it served (`hits`) and what was stored (`stores`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.stores = 0

    def path(self, model: str, data: str, tag: str) -> Path:
        """The file of a model's embeddings of a dataset; `tag` names how they were made
        (precision, images only or with which captions)."""
        return self.root / model[:FINGERPRINT_CHARS] / f"{data[:FINGERPRINT_CHARS]}-{tag}.pt"

    def load(self, model: str, data: str, tag: str) -> Embeddings | None:
        """The cached embeddings, or None when there are none (or the file is unreadable)."""
        file = self.path(model, data, tag)
        if not file.is_file():
            return None
        try:
            value = torch.load(file, map_location="cpu", weights_only=True)
            embeddings = Embeddings.from_dict(value)
        except Exception:  # a truncated or foreign file: recompute and overwrite it
            return None
        self.hits += 1
        return embeddings

    def save(self, model: str, data: str, tag: str, embeddings: Embeddings) -> None:
        atomic_torch_save(embeddings.to_dict(), self.path(model, data, tag))
        self.stores += 1

    def classifier_path(self, model: str, prompts: list[list[str]], precision: str) -> Path:
        digest = text_sha256(json.dumps(prompts), precision)[:FINGERPRINT_CHARS]
        return self.root / model[:FINGERPRINT_CHARS] / f"classifier-{digest}.pt"

    def load_classifier(
        self, model: str, prompts: list[list[str]], precision: str
    ) -> Tensor | None:
        file = self.classifier_path(model, prompts, precision)
        if not file.is_file():
            return None
        try:
            value = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:
            return None
        return value if isinstance(value, Tensor) else None

    def save_classifier(
        self, model: str, prompts: list[list[str]], precision: str, classifier: Tensor
    ) -> None:
        atomic_torch_save(classifier.cpu(), self.classifier_path(model, prompts, precision))
