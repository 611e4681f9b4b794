"""Shards -> a class-per-folder image tree (`multimodal shards unpack`): the inverse of
`multimodal shards folder`, for tools that read torchvision's ImageFolder layout and for the
evaluation's `imagefolder:DIR` data spec.

The tar members are read as bytes (no decoder runs on them: nothing is unpickled); each
sample's image is written unchanged to `OUT/<class>/<key>.<ext>`, its class from the json's
`class_name` (spaces written as `_`, which the `imagefolder:` spec reads back as spaces) or,
without one, its `cls` / json `label` number. A sample without an image or a class is skipped
and counted, never a crash.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from multimodal.data.pipeline import expand_urls

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


@dataclass
class UnpackSummary:
    """What `unpack_shards` wrote: images per class folder, and skipped samples by reason."""

    images: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def lines(self, out: str | os.PathLike) -> list[str]:
        total = sum(self.images.values())
        lines = [f"unpacked {total} images into {len(self.images)} class folders under {out}"]
        lines += [f"  skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        return lines


def _samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of one tar, members grouped as webdataset
    groups them (the key is the member name up to its first dot after the last slash)."""
    key, members = None, {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot < 0:
                continue
            this_key, ext = name[:dot], name[dot + 1 :].lower()
            if this_key != key:
                if key is not None:
                    yield key, members
                key, members = this_key, {}
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def _class_folder(members: dict[str, bytes]) -> str | None:
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    name = meta.get("class_name") if isinstance(meta, dict) else None
    if isinstance(name, str) and name.strip():
        return re.sub(r"[\s/\\]+", "_", name.strip())
    label = members.get("cls", b"").strip() or str(meta.get("label", "")).encode()
    return label.decode(errors="replace") if label.isdigit() else None


def unpack_shards(
    shards: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True
) -> UnpackSummary:
    """Write every labelled image of `shards` (a folder, brace pattern, glob or list) to
    `out/<class>/<key>.<ext>`; `out` must not exist yet (nothing is overwritten). Each file is
    written under a temporary name and renamed, so a stopped run leaves no partial image."""
    urls = expand_urls(shards)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; expected a new folder")
    summary = UnpackSummary()
    for shard in tqdm(urls, desc="shards", unit="shard", disable=not progress):
        for key, members in _samples(shard):
            image = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            folder = _class_folder(members)
            if image is None:
                summary.skipped["no image (png/jpg/webp)"] += 1
                continue
            if folder is None:
                summary.skipped["no class (json class_name or label, or cls)"] += 1
                continue
            target = out / folder / f"{Path(key).name}.{image}"
            if target.exists():
                summary.skipped["key seen before (the first one kept)"] += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(members[image])
            os.replace(partial, target)
            summary.images[folder] += 1
    return summary
