"""Export of a trained CLIP's embedding towers for serving: `torch.export` programs (.pt2) and
ONNX graphs, each with a dynamic batch dimension, checked against the eager model.

What is exported is the joint-space embedding, not the bare tower: `image` is
`encode_image` (tower, projection, L2 norm), `text` is `encode_text`, `joint` both at once
(the whole CLIP's two embeddings). The plain model is wrapped, never changed (DESIGN.md).

Routes on torch 2.14.1:
- `torch.export` -> `torch.export.save` (.pt2) -> `torch.export.load`: supported.
- ONNX through `torch.onnx.export(..., dynamo=True)` (the torch.export-based exporter), run
  with ONNX Runtime: supported; needs the optional extra (`pip install 'multimodal[export]'`:
  onnx, onnxscript, onnxruntime), imported only when used.
- ONNX int8 (`--int8`): each ONNX file also quantized by ONNX Runtime's dynamic quantization
  (`quantize_onnx`: int8 weights of every MatMul and Gemm with a weight, activations
  quantized per batch at run time) into `<tower>.int8.onnx`, checked by its smallest cosine
  to the eager embeddings (an int8 model cannot match to 1e-4). On a ViT-B/16 image tower on
  2 CPU cores it ran 2.8x faster than the fp32 ONNX file at batch 32 (bench/inference.py).
- TorchScript: refused. `torch.jit.trace` fails inside `F.scaled_dot_product_attention`
  (`enable_gqa` is traced into a tensor) and `torch.jit.script` cannot compile the layers'
  annotations; TorchScript is deprecated in favour of torch.export.
- The text input is fixed at the model's context length (pad with `padding="max_length"`);
  only the batch is dynamic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.eval.loading import LoadedModel

FORMATS = ("pt2", "onnx")
TOWERS = ("image", "text", "joint")
MANIFEST = "manifest.json"
EXPORT_EXTRA = "pip install 'multimodal[export]'"
EXAMPLE_BATCH = 2  # the batch traced; 0 and 1 would be specialised by torch.export
MAX_BATCH = 65536


def require_onnx() -> Any:
    """The `onnxruntime` module, with the export extra's other packages checked; an ImportError
    that names the extra when any is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({error.name} is missing): "
            f"{EXPORT_EXTRA}"
        ) from error
    return onnxruntime


class ImageEmbedder(nn.Module):
    """images (B, C, H, W) float -> L2-normalised embeddings (B, D): `model.encode_image`."""

    input_names = ("images",)
    output_names = ("image_embeddings",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)


class TextEmbedder(nn.Module):
    """input_ids (B, T) int64 and attention_mask (B, T) bool (True = real token) ->
    L2-normalised embeddings (B, D): `model.encode_text`."""

    input_names = ("input_ids", "attention_mask")
    output_names = ("text_embeddings",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class JointEmbedder(nn.Module):
    """Both embeddings of a CLIP at once: (images, input_ids, attention_mask) ->
    (image_embeddings, text_embeddings), each L2-normalised."""

    input_names = ("images", "input_ids", "attention_mask")
    output_names = ("image_embeddings", "text_embeddings")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.model.encode_image(images), self.model.encode_text(input_ids, attention_mask)


EMBEDDERS: dict[str, type[nn.Module]] = {
    "image": ImageEmbedder,
    "text": TextEmbedder,
    "joint": JointEmbedder,
}


@dataclass(frozen=True)
class InputSpec:
    """What the exported towers take: image shape (C, H, W), text length and vocabulary."""

    image_shape: tuple[int, int, int]
    context_length: int
    vocab_size: int


def example_inputs(
    tower: str, spec: InputSpec, batch: int, *, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Random inputs of `tower` by input name: normal images, random ids with a mask whose
    real lengths vary between 2 and the context length (padding right, as the tokenizer)."""
    if tower not in EMBEDDERS:
        raise ValueError(f"tower={tower!r} must be one of {list(EMBEDDERS)}")
    T = spec.context_length
    images = torch.randn(batch, *spec.image_shape, generator=generator)
    ids = torch.randint(1, spec.vocab_size, (batch, T), generator=generator)
    lengths = torch.randint(2, T + 1, (batch,), generator=generator)
    mask = torch.arange(T) < lengths[:, None]  # (B, T)
    ids = ids.masked_fill(~mask, 0)
    inputs = {"images": images, "input_ids": ids, "attention_mask": mask}
    return {name: inputs[name] for name in EMBEDDERS[tower].input_names}


def _dynamic_batch(names: Sequence[str]) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {name: {0: batch} for name in names}


def export_program(module: nn.Module, inputs: dict[str, Tensor]) -> torch.export.ExportedProgram:
    """`module` (an embedder) through `torch.export` with dim 0 of every input dynamic."""
    module.eval()
    with torch.no_grad():
        return torch.export.export(
            module, tuple(inputs.values()), dynamic_shapes=_dynamic_batch(list(inputs))
        )


def save_pt2(module: nn.Module, inputs: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """`module` exported and saved with `torch.export.save` (load with `torch.export.load`)."""
    path = Path(path)
    torch.export.save(export_program(module, inputs), path)
    return path


def save_onnx(module: nn.Module, inputs: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """`module` exported to ONNX with the dynamo exporter; the weights go in the .onnx file
    itself below 2 GB, in a `.data` file beside it above."""
    require_onnx()
    path = Path(path)
    module.eval()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            path,
            dynamo=True,
            input_names=list(inputs),
            output_names=list(getattr(module, "output_names", ())) or None,
            dynamic_shapes=_dynamic_batch(list(inputs)),
            external_data=size >= 2**31 - 2**26,  # protobuf's 2 GB limit, with room for the graph
            verbose=False,
        )
    return path


Runner = Callable[[dict[str, Tensor]], list[Tensor]]


def load_runner(path: str | os.PathLike) -> Runner:
    """A callable that runs an exported file (.pt2 through `torch.export.load`, .onnx through
    ONNX Runtime on the CPU) on inputs by name and returns its outputs as CPU tensors."""
    path = Path(path)
    if path.suffix == ".pt2":
        program = torch.export.load(path).module()

        def run_pt2(inputs: dict[str, Tensor]) -> list[Tensor]:
            with torch.no_grad():
                out = program(*inputs.values())
            return list(out) if isinstance(out, tuple | list) else [out]

        return run_pt2
    if path.suffix == ".onnx":
        ort = require_onnx()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(inputs: dict[str, Tensor]) -> list[Tensor]:
            feed = {name: tensor.cpu().numpy() for name, tensor in inputs.items()}
            return [torch.from_numpy(out) for out in session.run(None, feed)]

        return run_onnx
    raise ValueError(f"{str(path)!r}: expected a .pt2 or .onnx file")


def paired_outputs(
    runner: Runner, module: nn.Module, inputs: dict[str, Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """(exported, eager) for every output of `module` on `inputs`, each run once."""
    with torch.no_grad():
        eager = module(*inputs.values())
    eager = list(eager) if isinstance(eager, tuple | list) else [eager]
    exported = runner(inputs)
    if len(exported) != len(eager):
        raise ValueError(f"the exported file gives {len(exported)} outputs, eager {len(eager)}")
    return list(zip(exported, eager, strict=True))


def _largest_diff(pairs: list[tuple[Tensor, Tensor]]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


def _smallest_cosine(pairs: list[tuple[Tensor, Tensor]]) -> float:
    return min(F.cosine_similarity(a.float(), b.float(), dim=-1).min().item() for a, b in pairs)


def max_abs_diff(runner: Runner, module: nn.Module, inputs: dict[str, Tensor]) -> float:
    """Largest |exported - eager| over every output of `module` on `inputs`."""
    return _largest_diff(paired_outputs(runner, module, inputs))


def min_cosine(runner: Runner, module: nn.Module, inputs: dict[str, Tensor]) -> float:
    """Smallest cosine similarity between an exported embedding and eager's, over every row
    of every output of `module` on `inputs` (how close a quantized file is)."""
    return _smallest_cosine(paired_outputs(runner, module, inputs))


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """`source` (.onnx) with int8 weights in every MatMul and Gemm and activations quantized
    per batch at run time (ONNX Runtime's dynamic quantization, for CPU inference), written
    to `target` through a temporary file so a failed run leaves no partial model."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    partial = target.with_name(f".{target.name}.partial")
    quantize_dynamic(
        source, partial, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
    )
    partial.replace(target)
    return target


def input_spec(loaded: LoadedModel) -> InputSpec:
    """The input shapes of `loaded`: the image shape its evaluation transform makes, its
    context length and its tokenizer's vocabulary."""
    from PIL import Image

    image = loaded.transform(Image.new("RGB", (256, 256)))
    return InputSpec(
        image_shape=tuple(int(s) for s in image.shape),
        context_length=int(loaded.context_length),
        vocab_size=int(loaded.tokenizer.vocab_size),
    )


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """What a client needs to tokenise like the model: class, vocabulary, special ids."""
    info: dict[str, Any] = {"class": type(tokenizer).__name__}
    for name in ("vocab_size", "pad_id", "bos_id", "eos_id", "cls_id", "sep_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            info[name] = value
    info["padding"] = "right, to context_length (padding='max_length'); mask True = real token"
    return info


@dataclass
class ExportedFile:
    """One exported embedder: its file, inputs, outputs and the check against eager."""

    tower: str
    format: str
    file: str
    inputs: dict[str, dict[str, Any]]
    outputs: list[str]
    max_abs_diff: float
    check_batch: int
    quantized: str | None = None  # "int8": ONNX Runtime's dynamic quantization of `format`
    min_cosine: float | None = None  # smallest cosine to eager over the check batch's rows


@dataclass
class Manifest:
    """manifest.json beside the exported files: how to feed them and how close they are."""

    model: str
    image_size: list[int]
    mean: list[float]
    std: list[float]
    context_length: int
    tokenizer: dict[str, Any]
    torch_version: str
    files: list[ExportedFile] = field(default_factory=list)

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


def _input_description(inputs: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    return {
        name: {"shape": ["batch", *tensor.shape[1:]], "dtype": str(tensor.dtype).split(".")[-1]}
        for name, tensor in inputs.items()
    }


def _checked(
    path: Path,
    tower: str,
    format: str,
    module: nn.Module,
    check: dict[str, Tensor],
    quantized: str | None = None,
) -> ExportedFile:
    """The manifest entry of an exported file: reloaded and compared with eager on `check`
    (a quantized file also by its smallest cosine), the file and eager each run once."""
    pairs = paired_outputs(load_runner(path), module, check)
    return ExportedFile(
        tower=tower,
        format=format,
        file=path.name,
        inputs=_input_description(check),
        outputs=list(module.output_names),
        max_abs_diff=_largest_diff(pairs),
        check_batch=len(next(iter(check.values()))),
        quantized=quantized,
        min_cosine=None if quantized is None else _smallest_cosine(pairs),
    )


def export_towers(
    loaded: LoadedModel,
    out_dir: str | os.PathLike,
    *,
    format: str = "onnx",
    towers: Sequence[str] = ("image", "text"),
    check_batch: int = 3,
    seed: int = 0,
    int8: bool = False,
) -> Manifest:
    """Export each of `towers` of `loaded.model` (on the CPU, fp32) to `out_dir/<tower>.<format>`,
    check each reloaded file against eager on a random batch of `check_batch`, and write the
    manifest (`manifest.json`). `int8` (ONNX only): also `<tower>.int8.onnx`, quantized by
    `quantize_onnx` and checked by `min_cosine`. Returns the manifest."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {list(FORMATS)}")
    if int8 and format != "onnx":
        raise ValueError(
            f"int8 export is for ONNX files (ONNX Runtime's quantization), not {format}"
        )
    for tower in towers:
        if tower not in EMBEDDERS:
            raise ValueError(f"tower={tower!r} must be one of {list(EMBEDDERS)}")
    if format == "onnx":
        require_onnx()  # before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model.float().cpu().eval()
    spec = input_spec(loaded)
    manifest = Manifest(
        model=loaded.description,
        image_size=list(spec.image_shape),
        mean=list(loaded.mean),
        std=list(loaded.std),
        context_length=spec.context_length,
        tokenizer=tokenizer_info(loaded.tokenizer),
        torch_version=torch.__version__,
    )
    generator = torch.Generator().manual_seed(seed)
    save = save_pt2 if format == "pt2" else save_onnx
    for tower in towers:
        module = EMBEDDERS[tower](model).eval()
        traced = example_inputs(tower, spec, EXAMPLE_BATCH, generator=generator)
        check = example_inputs(tower, spec, check_batch, generator=generator)
        path = save(module, traced, out / f"{tower}.{format}")
        manifest.files.append(_checked(path, tower, format, module, check))
        if int8:
            quantized = quantize_onnx(path, out / f"{tower}.int8.onnx")
            manifest.files.append(_checked(quantized, tower, format, module, check, "int8"))
    manifest.write(out)
    return manifest
