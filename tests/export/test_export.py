"""`multimodal export` on a tiny random CLIP checkpoint: the torch.export (.pt2) and ONNX files
it writes equal the eager embeddings at batch sizes other than the traced one (the batch is
dynamic), and its manifest says how to feed them."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from multimodal.cli import COMMANDS
from multimodal.eval.loading import load_model
from multimodal.export.commands import export_main
from multimodal.export.export import (
    EMBEDDERS,
    EXAMPLE_BATCH,
    example_inputs,
    input_spec,
    load_runner,
    max_abs_diff,
    min_cosine,
    require_onnx,
    save_pt2,
)

TOLERANCE = 1e-4  # fp32
EXTRA = "the optional extra multimodal[export] (onnx, onnxscript, onnxruntime)"


def export(tiny_checkpoint, out, format: str, *extra: str) -> tuple[int, str]:
    checkpoint, config = tiny_checkpoint
    args = ["--checkpoint", str(checkpoint), "--config", str(config), "--out", str(out)]
    return COMMANDS["export"].run([*args, "--format", format, "--tower", "both", *extra])


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    checkpoint, config = tiny_checkpoint
    return load_model(checkpoint, config=config)


@pytest.fixture(scope="module")
def pt2_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt2")
    assert export(tiny_checkpoint, out, "pt2") == 0
    return out


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason=EXTRA)
    pytest.importorskip("onnxscript", reason=EXTRA)
    out = tmp_path_factory.mktemp("onnx")
    assert export(tiny_checkpoint, out, "onnx", "--int8") == 0
    return out


def check(loaded, path, tower: str, batch: int) -> float:
    """max |exported - eager| on a random batch of `batch`, unlike the traced one."""
    assert batch != EXAMPLE_BATCH
    generator = torch.Generator().manual_seed(batch)
    inputs = example_inputs(tower, input_spec(loaded), batch, generator=generator)
    return max_abs_diff(load_runner(path), EMBEDDERS[tower](loaded.model).eval(), inputs)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_pt2_equals_eager(loaded, pt2_export, tower, batch):
    assert check(loaded, pt2_export / f"{tower}.pt2", tower, batch) <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_onnx_equals_eager(loaded, onnx_export, tower, batch):
    assert check(loaded, onnx_export / f"{tower}.onnx", tower, batch) <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_onnx_int8_is_close_to_eager(loaded, onnx_export, tower, batch):
    """`--int8`: ONNX Runtime's dynamic quantization, every product with a weight int8
    (MatMulInteger; the attention's products of two activations stay fp32), the embeddings
    within cosine 0.99 of eager at other batch sizes than the traced one."""
    import onnx

    path = onnx_export / f"{tower}.int8.onnx"
    graph = onnx.load(str(path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    products = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) >= 4
    assert not [node.name for node in products if weights & set(node.input)]
    generator = torch.Generator().manual_seed(batch)
    inputs = example_inputs(tower, input_spec(loaded), batch, generator=generator)
    module = EMBEDDERS[tower](loaded.model).eval()
    cosine = min_cosine(load_runner(path), module, inputs)
    assert 0.99 <= cosine < 1 - 1e-7  # close, and really quantized
    manifest = json.loads((onnx_export / "manifest.json").read_text())
    (entry,) = [f for f in manifest["files"] if f["file"] == path.name]
    assert entry["quantized"] == "int8" and entry["min_cosine"] >= 0.99


def test_int8_export_needs_onnx(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export(tiny_checkpoint, tmp_path, "pt2", "--int8")
    assert "--int8 needs --format onnx" in capsys.readouterr().err


def test_joint_export_gives_both_embeddings(loaded, tmp_path):
    spec = input_spec(loaded)
    module = EMBEDDERS["joint"](loaded.model).eval()
    path = save_pt2(module, example_inputs("joint", spec, EXAMPLE_BATCH), tmp_path / "joint.pt2")
    for batch in (1, 7):
        assert check(loaded, path, "joint", batch) <= TOLERANCE


def test_manifest_says_how_to_feed_the_files(pt2_export, capsys):
    manifest = json.loads((pt2_export / "manifest.json").read_text())
    assert [f["file"] for f in manifest["files"]] == ["image.pt2", "text.pt2"]
    assert all(f["max_abs_diff"] <= TOLERANCE for f in manifest["files"])
    assert manifest["image_size"] == [3, 32, 32] and manifest["context_length"] == 16
    assert len(manifest["mean"]) == len(manifest["std"]) == 3
    assert manifest["tokenizer"]["vocab_size"] == 49408
    image, text = (f["inputs"] for f in manifest["files"])
    assert image == {"images": {"shape": ["batch", 3, 32, 32], "dtype": "float32"}}
    assert text["input_ids"] == {"shape": ["batch", 16], "dtype": "int64"}
    assert text["attention_mask"]["dtype"] == "bool"


def test_onnx_inputs_have_a_dynamic_batch(onnx_export):
    import onnxruntime

    path = onnx_export / "text.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert set(shapes) == {"input_ids", "attention_mask"}
    assert all(isinstance(s[0], str) and s[1:] == [16] for s in shapes.values())
    assert [o.name for o in session.get_outputs()] == ["text_embeddings"]


def test_padding_does_not_change_the_exported_text_embedding(loaded, pt2_export):
    """Ids behind the mask are ignored by the export as by eager."""
    run = load_runner(pt2_export / "text.pt2")
    inputs = example_inputs("text", input_spec(loaded), 4)
    noisy = dict(inputs, input_ids=inputs["input_ids"].masked_fill(~inputs["attention_mask"], 7))
    torch.testing.assert_close(run(noisy)[0], run(inputs)[0], rtol=0, atol=1e-6)


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'multimodal\[export\]'"):
        require_onnx()


def test_export_command_refuses_a_missing_checkpoint(tmp_path, capsys):
    code = export_main(["--checkpoint", str(tmp_path / "no.ckpt"), "--format", "pt2",
                        "--out", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "no.ckpt" in capsys.readouterr().err
