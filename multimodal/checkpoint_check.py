"""Saying exactly what is wrong with a file given as a checkpoint, before torch reads it.

`torch.load` of a text file ends in `KeyError: 101`, and of random bytes in advice to retry
with `weights_only=False` (which would run arbitrary code). `check_torch_file` looks at the
file's first bytes instead; `check_lightning_checkpoint` then reads it with
`weights_only=True` (tensors memory-mapped, so cheap even for large files) and checks that it
is a Lightning checkpoint, as `multimodal fit --ckpt_path` needs.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)  # torch's legacy format: a pickle with protocol 2..5
LIGHTNING_KEYS = ("state_dict", "epoch", "global_step")
DISTRIBUTED_METADATA = "meta.pt"  # Lightning's ModelParallelStrategy checkpoint folders


def check_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """`path` if it is a file torch wrote (a torch zip archive or a legacy torch pickle);
    FileNotFoundError or ValueError naming the file and what it is instead."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        if (path / DISTRIBUTED_METADATA).is_file() or (path / ".metadata").is_file():
            return path  # a sharded (FSDP / distributed) checkpoint folder
        raise ValueError(
            f"{what} {str(path)!r} is a folder but not a distributed checkpoint (no "
            f"{DISTRIBUTED_METADATA} or .metadata in it)"
        )
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        raise ValueError(f"{what} {str(path)!r} is an empty file, not a torch checkpoint")
    if head == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            raise ValueError(
                f"{what} {str(path)!r} is a damaged zip archive (a truncated torch checkpoint?)"
            ) from None
        if not any(name.endswith("data.pkl") for name in names):
            raise ValueError(f"{what} {str(path)!r} is a zip archive but not a torch checkpoint")
        return path
    if head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return path
    if _looks_like_text(path):
        raise ValueError(f"{what} {str(path)!r} is a text file, not a torch checkpoint")
    raise ValueError(
        f"{what} {str(path)!r} is not a torch file (torch.save and Lightning write zip "
        "archives): not a checkpoint"
    )


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as file:
        sample = file.read(1024)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in sample


def check_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a Lightning checkpoint (`LIGHTNING_KEYS` present), read with
    `weights_only=True` as Lightning reads it to resume; ValueError naming the file when it is
    not a torch file, holds other Python objects (never unpickled), or is a torch file that
    Lightning did not write (a bare state dict, a whole pickled model)."""
    path = check_torch_file(path)
    if path.is_dir():
        return {}  # read by the strategy, shard by shard
    mmap = zipfile.is_zipfile(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = str(error).split("Unsupported global: ")[-1].split("was not")[0].strip()
        detail = f" ({found})" if "GLOBAL" in found else ""
        raise ValueError(
            f"checkpoint {str(path)!r} holds Python objects other than tensors and "
            f"plain values{detail}: it is not a platform checkpoint and is not "
            "loaded (it would run arbitrary code)"
        ) from None
    except (RuntimeError, EOFError, KeyError) as error:
        raise ValueError(f"checkpoint {str(path)!r} is a damaged torch file: {error}") from None
    if not isinstance(content, dict) or not all(key in content for key in LIGHTNING_KEYS):
        keys = sorted(content)[:5] if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} is a torch file but not a Lightning checkpoint of "
            f"`multimodal fit` (it has {keys}; expected {', '.join(LIGHTNING_KEYS)}, ...): "
            "to start from its weights use the task's init_from"
        )
    return content
