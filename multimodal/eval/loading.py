"""Loading a model to evaluate: a `multimodal fit` checkpoint rebuilt from its run's config, or
an open_clip architecture with local or pretrained weights.

Lightning checkpoints are read with `torch.load(weights_only=True)`, never unpickling
arbitrary objects. Those written by `multimodal fit` hold only plain values (LightningCLI
saves the hyper-parameters as dicts), so they load as they are; a checkpoint of a task built in
Python keeps config dataclasses (`OptimConfig`) in its hyper-parameters, which are allowed
through `torch.serialization.safe_globals` for the platform's own config classes only
(`CONFIG_CLASSES`). Only the `state_dict` of the checkpoint is used.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from text.tokenizer import Tokenizer, load_tokenizer

RUN_CONFIG = "config.yaml"  # what LightningCLI saves in the run's log folder


@dataclass
class LoadedModel:
    """A model ready for evaluation and what is needed to feed it.

    Attributes:
        model: has `encode_image` and `encode_text` (our `CLIP` or `OpenCLIP`), in eval mode.
        tokenizer: the model's tokenizer (`batch_encode`).
        context_length: the text length the model was trained with.
        transform: the evaluation image transform (PIL image -> (3, H, W) tensor).
        mean, std: the transform's normalisation, to turn tensors back into images to show.
        description: what was loaded, for reports.
        data_tokenizer: a tokenizer with `encode`, for the shard reader (the model's when it
            has one; the ids it makes are not used by the evaluations).
    """

    model: nn.Module
    tokenizer: Any
    context_length: int
    transform: Callable[[Any], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    data_tokenizer: Tokenizer


def config_classes() -> tuple[type, ...]:
    """The platform's config dataclasses a task may keep in its hyper-parameters: the only
    classes (beyond tensors and plain containers) a checkpoint may hold."""
    from multimodal.layers.config import TransformerConfig
    from multimodal.tasks.optim import OptimConfig
    from text.config import TextConfig
    from text.generation import GenerationConfig
    from vision.transforms import ImageTransformConfig
    from vision.vit import ViTConfig

    return (
        OptimConfig,
        TransformerConfig,
        TextConfig,
        GenerationConfig,
        ImageTransformConfig,
        ViTConfig,
    )


def read_lightning_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The `state_dict` of a Lightning checkpoint, read with `weights_only=True` (plus the
    platform's config dataclasses, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(list(config_classes())):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects that are not weights nor the platform's "
            f"config classes; it is not loaded (weights_only=True). torch says: "
            f"{str(error).splitlines()[-1]}"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable torch file: {error}"
        ) from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {str(path)!r} has no 'state_dict' of tensors: expected a Lightning "
            "checkpoint written by `multimodal fit`"
        )
    return state


def find_run_config(checkpoint: str | os.PathLike) -> Path | None:
    """The config.yaml LightningCLI saved for the run of `checkpoint`
    (`<run>/checkpoints/x.ckpt` -> `<run>/config.yaml`), or None."""
    path = Path(checkpoint).resolve()
    for folder in (path.parent.parent, path.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def instantiate_model_and_data(config: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The LightningModule and the LightningDataModule of a fit config (its `model` and `data`
    sections, instantiated with jsonargparse as LightningCLI does; the rest is ignored)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule, LightningModule

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"config {str(path)!r}: expected a YAML mapping with model and data")
    for key in ("model", "data"):
        if not isinstance(content.get(key), dict):
            raise ValueError(
                f"config {str(path)!r} has no {key!r} section with a class_path: expected a "
                "`multimodal fit` config (or the config.yaml saved next to its logs)"
            )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model", required=True)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        parsed = parser.parse_object({"model": content["model"], "data": content["data"]})
    except Exception as error:  # jsonargparse's ArgumentError and the like
        raise ValueError(f"config {str(path)!r}: {error}") from None
    init = parser.instantiate(parsed)
    return init.model, init.data


def _check_encoders(model: object, where: str) -> None:
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise ValueError(
                f"{where}: the model ({type(model).__name__}) has no {method}; zero-shot and "
                "retrieval evaluation need a CLIP-style model"
            )


def load_lightning(checkpoint: str | os.PathLike, config: str | os.PathLike | None) -> LoadedModel:
    """Our model from a `multimodal fit` checkpoint: the task is rebuilt from `config` (the
    fit config; default: the config.yaml saved with the run) and its weights loaded strictly;
    tokenizer, context length and image transform come from the config's datamodule."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    if config is None:
        config = find_run_config(checkpoint)
        if config is None:
            raise FileNotFoundError(
                f"no config for checkpoint {str(checkpoint)!r}: pass --config (the fit config); "
                f"looked for {RUN_CONFIG} in the run folder {Path(checkpoint).parent.parent}"
            )
    task, data = instantiate_model_and_data(config)
    model = getattr(task, "model", None)
    _check_encoders(model, f"config {str(config)!r}")
    for attribute in ("tokenizer", "context_length", "transform"):
        if not hasattr(data, attribute):
            raise ValueError(
                f"config {str(config)!r}: the datamodule ({type(data).__name__}) has no "
                f"{attribute}; expected an image-text datamodule such as ImageTextDataModule"
            )
    state = read_lightning_state_dict(checkpoint)
    problems = _mismatch(task.state_dict(), state)
    if problems:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} does not fit the model of config {str(config)!r} "
            f"(another run's config?): {problems}"
        )
    task.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=data.tokenizer,
        context_length=data.context_length,
        transform=data.transform.eval(),
        mean=tuple(data.transform.mean),
        std=tuple(data.transform.std),
        description=f"{type(model).__name__} from {checkpoint} (config {config})",
        data_tokenizer=data.tokenizer,
    )


def _mismatch(expected: dict[str, Tensor], state: dict[str, Tensor], shown: int = 5) -> str:
    """What keeps `state` from loading strictly into a module with `expected`; "" if nothing."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)} in the model"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    )
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shapes", shapes)):
        if keys:
            more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def _normalization(preprocess: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean and std of the torchvision Normalize inside an open_clip preprocess."""
    for step in getattr(preprocess, "transforms", []):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def load_open_clip(
    name: str, *, checkpoint: str | os.PathLike | None = None, pretrained: str | None = None
) -> LoadedModel:
    """An open_clip architecture with a local checkpoint (loaded strictly) or a pretrained tag
    (downloaded by open_clip), with its own tokenizer and evaluation transform."""
    from multimodal.models.open_clip import OpenCLIP

    if checkpoint is None and pretrained is None:
        raise ValueError(
            f"open_clip model {name!r} needs weights: pass --checkpoint FILE or --pretrained TAG"
        )
    model = OpenCLIP(name, pretrained=pretrained, checkpoint=checkpoint).eval()
    mean, std = _normalization(model.preprocess)
    tokenizer = model.tokenizer
    weights = checkpoint if checkpoint is not None else f"pretrained={pretrained}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        context_length=model.context_length,
        transform=model.preprocess,
        mean=mean,
        std=std,
        description=f"open_clip {model.model_name} ({weights})",
        data_tokenizer=tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer("clip"),
    )


def load_model(
    checkpoint: str | os.PathLike | None,
    *,
    config: str | os.PathLike | None = None,
    open_clip: str | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The model to evaluate, on `device`, in eval mode.

    Either `checkpoint` is a `multimodal fit` checkpoint (.ckpt) and `config` its fit config
    (default: the config.yaml saved with the run), or `open_clip` names an open_clip
    architecture whose weights are `checkpoint` (a local state dict) or `pretrained` (a tag).
    """
    if open_clip is not None:
        if config is not None:
            raise ValueError("--config is for checkpoints of `multimodal fit`, not --open-clip")
        loaded = load_open_clip(open_clip, checkpoint=checkpoint, pretrained=pretrained)
    else:
        if pretrained is not None:
            raise ValueError("--pretrained needs --open-clip NAME (an open_clip architecture)")
        if checkpoint is None:
            raise ValueError(
                "nothing to evaluate: pass --checkpoint RUN.ckpt (with --config) or --open-clip"
            )
        loaded = load_lightning(checkpoint, config)
    loaded.model.to(device)
    return loaded
