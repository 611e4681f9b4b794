"""Loading a model to evaluate: a `multimodal fit` checkpoint rebuilt from its run's config, or
an open_clip architecture with local or pretrained weights.

Lightning checkpoints are rebuilt by `multimodal.tasks.load_task` and read weights-only
(`multimodal.train.checkpoint_file`); the config also gives the datamodule, whose tokenizer and
image transform the evaluation uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from multimodal.tasks.loading import (
    RUN_CONFIG,
    find_run_config,
    instantiate_section,
    load_task,
    read_config_file,
)
from text.tokenizer import Tokenizer, load_tokenizer


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
        itm_head: the task's image-text matching head (`ContrastivePretraining(itm_head=...)`),
            in eval mode, for re-ranking retrieval; None when the task has none.
    """

    model: nn.Module
    tokenizer: Any
    context_length: int
    transform: Callable[[Any], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    data_tokenizer: Tokenizer
    itm_head: nn.Module | None = None

    @classmethod
    def from_datamodule(
        cls, model: nn.Module, data: Any, description: str, *, itm_head: nn.Module | None = None
    ) -> LoadedModel:
        """`model` fed as the image-text datamodule `data` feeds it: its tokenizer, context
        length and evaluation transform (and the task's ITM head, if given)."""
        return cls(
            model=model,
            tokenizer=data.tokenizer,
            context_length=data.context_length,
            transform=data.transform.eval(),
            mean=tuple(data.transform.mean),
            std=tuple(data.transform.std),
            description=description,
            data_tokenizer=data.tokenizer,
            itm_head=itm_head,
        )


def instantiate_model_and_data(
    config: str | os.PathLike, checkpoint: str | os.PathLike | None = None
) -> tuple[nn.Module, Any]:
    """The LightningModule and the LightningDataModule of a fit config (its `model` and `data`
    sections, instantiated as LightningCLI does; the rest is ignored). With `checkpoint`, the
    task is that checkpoint's, rebuilt from the config (`multimodal.tasks.load_task`)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    content = read_config_file(config, "model", "data")
    where = f"config {str(config)!r}"
    if checkpoint is None:
        task = instantiate_section(content["model"], LightningModule, where)
    else:
        task = load_task(checkpoint, config)
    return task, instantiate_section(content["data"], LightningDataModule, where)


def _check_encoders(model: object, where: str) -> None:
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise ValueError(
                f"{where}: the model ({type(model).__name__}) has no {method}; zero-shot and "
                "retrieval evaluation need a CLIP-style model"
            )


def load_run(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None = None
) -> tuple[Any, Any, str | os.PathLike]:
    """The task (weights loaded strictly, any task) and the datamodule of a `multimodal fit`
    checkpoint, and the fit config they were rebuilt from: `config`, default the config.yaml
    saved with the run."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    if config is None:
        config = find_run_config(checkpoint)
        if config is None:
            raise FileNotFoundError(
                f"no config for checkpoint {str(checkpoint)!r}: pass --config (the fit config); "
                f"looked for {RUN_CONFIG} in the run folder {Path(checkpoint).parent.parent}"
            )
    task, data = instantiate_model_and_data(config, checkpoint)
    return task, data, config


def load_lightning(checkpoint: str | os.PathLike, config: str | os.PathLike | None) -> LoadedModel:
    """Our model from a `multimodal fit` checkpoint: the task is rebuilt from `config` (the
    fit config; default: the config.yaml saved with the run) and its weights loaded strictly;
    tokenizer, context length and image transform come from the config's datamodule."""
    task, data, config = load_run(checkpoint, config)
    model = getattr(task, "model", None)
    _check_encoders(model, f"config {str(config)!r}")
    for attribute in ("tokenizer", "context_length", "transform"):
        if not hasattr(data, attribute):
            raise ValueError(
                f"config {str(config)!r}: the datamodule ({type(data).__name__}) has no "
                f"{attribute}; expected an image-text datamodule such as ImageTextDataModule"
            )
    model.eval()
    itm_head = getattr(task, "itm_head", None)  # ContrastivePretraining's, None elsewhere
    if itm_head is not None:
        itm_head.eval()
    description = f"{type(model).__name__} from {checkpoint} (config {config})"
    return LoadedModel.from_datamodule(model, data, description, itm_head=itm_head)


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
    An int8 file of `multimodal quantize` loads as its CPU model.
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
        from multimodal.export.quantize import is_quantized_file, load_quantized

        if is_quantized_file(checkpoint):  # written by `multimodal quantize`: CPU int8
            if config is not None or torch.device(device).type != "cpu":
                raise ValueError(
                    f"{str(checkpoint)!r} is an int8 model of `multimodal quantize`: it holds "
                    "its config and runs on the CPU only (no --config, no --device cuda)"
                )
            return load_quantized(checkpoint)
        loaded = load_lightning(checkpoint, config)
    loaded.model.to(device)
    if loaded.itm_head is not None:
        loaded.itm_head.to(device)
    return loaded
