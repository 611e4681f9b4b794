"""Reading checkpoint files without unpickling arbitrary objects: Lightning checkpoints, plain
state dicts and safetensors files.

Torch files are read with `torch.load(weights_only=True)`. Checkpoints written by `multimodal
fit` hold only plain values (LightningCLI saves the hyper-parameters as dicts); a checkpoint of
a task built in Python keeps config dataclasses (`OptimConfig`) in its hyper-parameters, which
are allowed through `torch.serialization.safe_globals` for the platform's own config classes
only (`config_classes`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from multimodal.checkpoint_check import check_torch_file

SAFETENSORS_SUFFIX = ".safetensors"


def config_classes() -> tuple[type, ...]:
    """The platform's config dataclasses a task may keep in its hyper-parameters: the only
    classes (beyond tensors and plain containers) a checkpoint may hold."""
    from multimodal.adapt import AdaptConfig, AdapterConfig, DistillConfig, LoRAConfig
    from multimodal.adapt.prefix import PrefixConfig
    from multimodal.adapt.prompt import PromptConfig
    from multimodal.layers.config import TransformerConfig
    from multimodal.tasks.optim import OptimConfig
    from text.config import TextConfig
    from text.generation import GenerationConfig
    from vision.transforms import ImageTransformConfig
    from vision.vit import ViTConfig

    return (
        AdaptConfig,
        AdapterConfig,
        DistillConfig,
        LoRAConfig,
        PrefixConfig,
        PromptConfig,
        OptimConfig,
        TransformerConfig,
        TextConfig,
        GenerationConfig,
        ImageTransformConfig,
        ViTConfig,
    )


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """The object saved in a torch file, read with `weights_only=True` (plus the platform's
    config dataclasses); FileNotFoundError or ValueError naming the file when it is missing,
    not a torch file (`multimodal.checkpoint_check`) or holds other objects. `mmap` maps the
    tensors instead of reading them (to look at a file's keys without loading its weights)."""
    path = check_torch_file(path)  # a missing, text, empty or foreign file says so
    try:
        with torch.serialization.safe_globals(list(config_classes())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file: a Lightning checkpoint (its `state_dict`), a plain state
    dict (raw or under "state_dict", DDP's "module." prefix stripped) or a .safetensors file."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = read_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no state dict of tensors (expected a Lightning "
            "checkpoint, a saved state_dict() or a .safetensors file)"
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state
