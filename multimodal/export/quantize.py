"""Post-training int8 quantization of a CLIP's towers for CPU inference, a file format that
loads without unpickling, and the model rebuilt from it for evaluation.

Route: `torch.ao.quantization.quantize_dynamic` on every `nn.Linear` (int8 weights, one scale
per output channel; activations quantized per batch at run time; embeddings, norms and the
attention kernel stay fp32). On torch 2.14.1 it still works although `torch.ao.quantization`
warns that it is deprecated (its warnings are silenced here, the calls do not change); its
fbgemm/x86 kernels ran the CLIP ViT-B/16 image embedding 1.6x faster than fp32 at batch 32
(bench/inference.py, a shared 2-core CPU; 2.9x on a 4-layer one at batch 8), cosine >= 0.9995.
torchao 0.18's `Int8DynamicActivationInt8WeightConfig` was tried first: it quantizes and
stays accurate, but run eagerly it made a 4-layer ViT-B tower about 13x *slower* than fp32 on
this CPU (no fused int8 CPU kernel without `torch.compile`), and compiling at every load
(minutes on 2 cores) is no option for an evaluation command; so torchao is not used.

File (`save_quantized` / `load_quantized`): a torch file of plain values only (read with
`weights_only=True`): the quantized state dict, the run's model and data config sections
(to rebuild the model and its tokenizer and transform) and a format tag. Loading rebuilds the
fp32 model from the config, quantizes its structure the same way and loads the int8 weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimodal.eval.loading import LoadedModel
from multimodal.tasks.loading import drop_weight_arguments, instantiate_section
from multimodal.train.checkpoint_file import read_checkpoint

FORMAT = "multimodal-int8-dynamic/1"
METHOD = "torch.ao.quantization.quantize_dynamic(nn.Linear, qint8, per-channel weights)"


@contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """torch.ao.quantization's deprecation warnings, silenced (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_.*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        yield


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` with every nn.Linear replaced by a dynamically quantized int8 Linear, in fp32 on
    the CPU and in eval mode (inference only); a copy unless `inplace`."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if not inplace:
        model = copy.deepcopy(model)
    model = model.float().cpu().eval()
    with _quiet_deprecation():
        return quantize_dynamic(
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict tensors (int8 weights count one byte an element)."""
    total = 0
    for value in model.state_dict().values():
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def save_quantized(
    model: nn.Module, config: dict[str, Any], path: str | os.PathLike, *, source: str = ""
) -> Path:
    """Write the int8 `model` (from `quantize_int8`) with `config` (the run's fit config, a
    dict with its `model` and `data` sections) to `path`, atomically."""
    for section in ("model", "data"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"config has no {section!r} section: expected a fit config")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "format": FORMAT,
        "method": METHOD,
        "source": source,
        "config": {"model": config["model"], "data": config["data"]},
        "state_dict": model.state_dict(),
    }
    partial = path.with_name(path.name + ".partial")
    with _quiet_deprecation():
        torch.save(content, partial)
    os.replace(partial, path)
    return path


def is_quantized_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file written by `save_quantized` (read weights-only, its tensors
    mapped, not read: the evaluation loader asks this of every checkpoint). A file that cannot
    be mapped is not one (`save_quantized` writes torch's zip format)."""
    try:
        content = read_checkpoint(path, mmap=True)
    except ValueError:
        return False
    return isinstance(content, dict) and content.get("format") == FORMAT


def load_quantized(path: str | os.PathLike) -> LoadedModel:
    """The int8 model of a `save_quantized` file, rebuilt from its config, with the tokenizer,
    context length and evaluation transform of the run's datamodule: ready for
    `multimodal.eval.evaluate.run_zeroshot` / `run_retrieval` (CPU only)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    with _quiet_deprecation():
        content = read_checkpoint(path)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an int8 model written by `multimodal quantize` "
            f"(no format {FORMAT!r})"
        )
    where = f"the config stored in {str(path)!r}"
    config = content["config"]
    task = instantiate_section(drop_weight_arguments(config["model"]), LightningModule, where)
    data = instantiate_section(config["data"], LightningDataModule, where)
    model = quantize_int8(task.model, inplace=True)
    with _quiet_deprecation():
        model.load_state_dict(content["state_dict"], strict=True)
    description = f"{type(model).__name__} int8 from {path} ({content.get('source', '')})"
    return LoadedModel.from_datamodule(model.eval(), data, description)


def quantized_copy(loaded: LoadedModel) -> LoadedModel:
    """`loaded` with an int8 copy of its model (on the CPU); the original is left as it is."""
    model = quantize_int8(loaded.model)
    return dataclasses.replace(loaded, model=model, description=f"{loaded.description}, int8")
