"""Adapter-only weights: what a parameter-efficient fine-tune changed (the added parameters and
those trained through `train_also`, a few MB), saved with the `AdaptConfig` that re-creates
them on a fresh base model.

File format (a torch file of plain values, read with `weights_only=True`):
`{"format": FORMAT, "config": AdaptConfig.to_dict(), "state_dict": {name: tensor}}`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from multimodal.adapt.config import AdaptConfig, apply_adaptation

FORMAT = "multimodal-adapter-v1"
SHOWN = 5  # key names listed per kind of mismatch


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of an adapted model (after `apply_adaptation` with
    `freeze_base`: the new parameters and `train_also`'s), detached, on the CPU. Note: with
    `freeze_base=False` every parameter trains, so this is the whole model."""
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, config: AdaptConfig) -> Path:
    """Write `adapter_state_dict(model)` and `config` to `path` atomically (a temporary file in
    the same folder, then `os.replace`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "format": FORMAT,
        "config": config.to_dict(),
        "state_dict": adapter_state_dict(model),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(content, file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_adapter(path: str | os.PathLike) -> tuple[AdaptConfig, dict[str, Tensor]]:
    """The config and weights of a `save_adapter` file (weights-only); ValueError naming the
    file when it is something else."""
    content = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an adapter file written by save_adapter")
    return AdaptConfig.from_dict(content["config"]), content["state_dict"]


def _mismatch(model: nn.Module, state: dict[str, Tensor]) -> str:
    params = dict(model.named_parameters())
    missing = sorted(state.keys() - params.keys())
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(params[k].shape)} in the model"
        for k in state.keys() & params.keys()
        if state[k].shape != params[k].shape
    )
    parts = []
    for what, keys in (("not in the model", missing), ("of another shape", shapes)):
        if keys:
            more = f", ... {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:SHOWN])}{more}")
    return "; ".join(parts)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdaptConfig:
    """Load a `save_adapter` file into `model`: a base model not adapted yet (the file's keys
    are not all there) first gets the recorded config applied. ValueError naming the keys
    whose names or shapes do not fit. Returns the recorded config."""
    config, state = read_adapter(path)
    names = {name for name, _ in model.named_parameters()}
    if not state.keys() <= names:
        apply_adaptation(model, config)
    problems = _mismatch(model, state)
    if problems:
        raise ValueError(
            f"adapter {str(path)!r} does not fit the model (another base model?): {problems}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)
    return config
