"""Rebuilding a trained task from its checkpoint alone: `load_task(ckpt)`, and through it
`Task.load_from_checkpoint(ckpt)` for every task.

The task's config comes from the checkpoint's hyper-parameters (a `multimodal fit` run stores
its whole model section there, nested model included) or else from the config.yaml LightningCLI
saved with the run; the weights come from the checkpoint's `state_dict`, read weights-only.
Arguments that only supply initial weights (a task's `init_from`, OpenCLIP's `checkpoint` and
`pretrained`, a timm tower's `pretrained`: each class's `weight_arguments`) are dropped before
the rebuild: the checkpoint replaces those weights, so neither the files nor a download are
needed.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from multimodal.train.checkpoint_file import read_checkpoint

RUN_CONFIG = "config.yaml"  # what LightningCLI saves in the run's log folder
SHOWN = 5  # key names listed per kind of mismatch


def find_run_config(checkpoint: str | os.PathLike) -> Path | None:
    """The config.yaml LightningCLI saved for the run of `checkpoint`
    (`<run>/checkpoints/x.ckpt` -> `<run>/config.yaml`), or None."""
    path = Path(checkpoint).resolve()
    for folder in (path.parent.parent, path.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def read_config_file(config: str | os.PathLike, *sections: str) -> dict:
    """A fit config (YAML mapping) that has each of `sections` (e.g. "model") with a
    class_path; ValueError naming the file otherwise."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"config {str(path)!r}: expected a YAML mapping with model and data")
    for key in sections:
        if not isinstance(content.get(key), dict):
            raise ValueError(
                f"config {str(path)!r} has no {key!r} section with a class_path: expected a "
                "`multimodal fit` config (or the config.yaml saved next to its logs)"
            )
    return content


def _import_class(class_path: Any) -> type | None:
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def drop_weight_arguments(config: Any) -> Any:
    """A copy of a class_path / init_args config tree without the init arguments that only
    supply initial weights (each class's `weight_arguments`): they take their defaults."""
    if isinstance(config, list):
        return [drop_weight_arguments(item) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: drop_weight_arguments(value) for key, value in config.items()}
    cls = _import_class(config.get("class_path"))
    init_args = config.get("init_args")
    if cls is not None and isinstance(init_args, dict):
        dropped = set(getattr(cls, "weight_arguments", ()))
        config["init_args"] = {k: v for k, v in init_args.items() if k not in dropped}
    return config


def instantiate_section(section: dict, base: type, where: str) -> Any:
    """A `class_path` / `init_args` config section instantiated with jsonargparse as
    LightningCLI does (subclasses of `base`, nested classes included). When `base` is a
    LightningModule, the task stores the section as its hyper-parameters, as under
    LightningCLI, so a checkpoint of it can be rebuilt again."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "section", required=True)
    try:
        parsed = parser.parse_object({"section": section})
    except Exception as error:  # jsonargparse's ArgumentError and the like
        raise ValueError(f"{where}: {error}") from None
    if not (isinstance(base, type) and issubclass(base, LightningModule)):
        return parser.instantiate_classes(parsed).section
    dumped = yaml.safe_load(parser.dump(parsed, skip_none=False, format="yaml"))["section"]
    hparams = {"_class_path": dumped["class_path"], **dumped.get("init_args", {})}
    with _given_hyperparameters_context(hparams, "lightning.pytorch.cli.instantiate_module"):
        return parser.instantiate_classes(parsed).section


def state_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor]) -> str:
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
            more = f", ... {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:SHOWN])}{more}")
    return "; ".join(parts)


def _config_in_hparams(checkpoint: dict) -> dict | None:
    """The task section stored by a LightningCLI run in the checkpoint's hyper-parameters."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("_class_path"), str):
        return None
    init_args = {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}
    return {"class_path": hparams["_class_path"], "init_args": init_args}


def load_task(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None = None, *, strict: bool = True
) -> Any:
    """The LightningModule of a `multimodal fit` checkpoint, rebuilt and with its weights.

    The task is rebuilt from `config` (a fit config) when given, else from the checkpoint's
    hyper-parameters, else from the config.yaml saved with the run; the weights are loaded
    strictly (ValueError naming the mismatched keys) unless `strict=False`. The task is
    returned in training mode, on the CPU, as `LightningModule.load_from_checkpoint` does.
    """
    from lightning.pytorch import LightningModule

    content = read_checkpoint(checkpoint)
    state = content.get("state_dict") if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} has no 'state_dict' of tensors: expected a "
            "Lightning checkpoint written by `multimodal fit`"
        )
    section = None if config is not None else _config_in_hparams(content)
    where = f"the hyper-parameters of checkpoint {str(checkpoint)!r}"
    if section is None:
        config = config if config is not None else find_run_config(checkpoint)
        if config is None:
            raise FileNotFoundError(
                f"checkpoint {str(checkpoint)!r} holds no task config (a task built in Python "
                f"keeps no model config) and no {RUN_CONFIG} was found in its run folder "
                f"{Path(checkpoint).resolve().parent.parent}: pass the fit config, or build the "
                "task and call load_state_dict"
            )
        section = read_config_file(config, "model")["model"]
        where = f"config {str(config)!r}"
    task = instantiate_section(drop_weight_arguments(section), LightningModule, where)
    problems = state_mismatch(task.state_dict(), state)
    if strict and problems:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} does not fit the task rebuilt from {where} "
            f"(another run's config?): {problems}"
        )
    task.on_load_checkpoint(content)
    task.load_state_dict(state, strict=strict)
    return task
