"""Int8 quantization: the embeddings stay close to fp32, the file loads weights-only and
evaluates, and (slow) the trained digits CLIP keeps its zero-shot accuracy."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multimodal.cli import COMMANDS
from multimodal.eval.class_names import class_names, templates
from multimodal.eval.evaluate import eval_loader, run_zeroshot
from multimodal.eval.loading import load_model
from multimodal.export.commands import quantize_main
from multimodal.export.quantize import FORMAT, load_quantized, quantize_int8, size_bytes
from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from tests.helpers import CONFIGS
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig


def small_clip() -> CLIP:
    """Wide enough for int8 rounding to average out as in real towers (64 wide, 2 layers)."""
    vit = ViT(ViTConfig(image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4))
    text = TextEncoder(
        TextConfig(
            vocab_size=100,
            transformer=TransformerConfig(
                dim=64, n_layers=2, n_heads=4, causal=True, position="learned", max_positions=16
            ),
        )
    )
    return CLIP(vit, text, embed_dim=32).eval()


def test_int8_embeddings_stay_close_to_fp32():
    model = small_clip()
    int8 = quantize_int8(model)
    assert isinstance(model.image_projection, nn.Linear)  # the original is left fp32
    linear = [m for m in int8.modules() if type(m) is nn.Linear]
    assert not linear, "every Linear is quantized"
    images = torch.randn(16, 3, 32, 32)
    ids = torch.randint(1, 100, (16, 16))
    mask = torch.arange(16) < torch.randint(3, 17, (16, 1))
    with torch.no_grad():
        pairs = [
            (model.encode_image(images), int8.encode_image(images)),
            (model.encode_text(ids, mask), int8.encode_text(ids, mask)),
        ]
    for fp32, quantized in pairs:
        assert F.cosine_similarity(fp32, quantized).min() >= 0.99
    assert size_bytes(int8) < 0.5 * size_bytes(model)


def test_quantize_command_writes_a_file_that_loads_and_evaluates(
    tiny_checkpoint, few_digits, tmp_path, capsys
):
    checkpoint, config = tiny_checkpoint
    out, report = tmp_path / "int8.pt", tmp_path / "report"
    args = ["--checkpoint", str(checkpoint), "--config", str(config), "--out", str(out)]
    data = ["--data", str(few_digits), "--classes", "digits", "--report", str(report)]
    assert COMMANDS["quantize"].run([*args, *data, "--num-workers", "0", "--no-progress"]) == 0
    assert f"report: {report / 'report.html'}" in capsys.readouterr().out

    content = torch.load(out, weights_only=True)  # nothing unpickled
    assert content["format"] == FORMAT
    loaded = load_quantized(out)
    assert not [m for m in loaded.model.modules() if type(m) is nn.Linear]
    assert loaded.context_length == 16

    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["fp32"]["n_samples"] == metrics["int8"]["n_samples"] == 40
    change = 100 * (metrics["int8"]["top1"] - metrics["fp32"]["top1"])
    assert metrics["top1_change_points"] == pytest.approx(change)
    # the reported accuracies are those of the checkpoint and of the file written, loaded as
    # the evaluation commands load them (`multimodal zeroshot --checkpoint int8.pt` works)
    int8 = load_model(out)
    assert not [m for m in int8.model.modules() if type(m) is nn.Linear]
    with pytest.raises(ValueError, match="int8 model of `multimodal quantize`"):
        load_model(out, config=config)
    for name, model in (("fp32", load_model(checkpoint, config=config)), ("int8", int8)):
        loaders = partial(eval_loader, str(few_digits), model, num_workers=0)
        run = run_zeroshot(model, loaders, class_names("digits"), templates("digits"),
                           n_examples=0, progress=False)  # fmt: skip
        assert run.metrics["top1"] == metrics[name]["top1"]


def test_quantize_command_without_data_only_writes_the_file(tiny_checkpoint, tmp_path, capsys):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "sub" / "int8.pt"
    assert quantize_main(["--checkpoint", str(checkpoint), "--config", str(config),
                          "--out", str(out)]) == 0  # fmt: skip
    assert out.is_file() and "int8 model:" in capsys.readouterr().out


def test_quantize_command_refuses_a_checkpoint_without_config(tmp_path, capsys):
    checkpoint = tmp_path / "lonely.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    assert quantize_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.pt")]) == 2
    assert "pass --config" in capsys.readouterr().err


def int8_top1_drop_points(checkpoint, config, shards, out) -> float:
    """`multimodal quantize` with the zero-shot check on `shards`: fp32 top-1 - int8 top-1, in
    points (the logic of the slow test, also checked on a tiny model)."""
    args = ["--checkpoint", str(checkpoint), "--config", str(config), "--out", str(out / "i8.pt")]
    data = ["--data", str(shards), "--classes", "digits", "--report", str(out / "report")]
    assert quantize_main([*args, *data, "--num-workers", "0", "--no-progress"]) == 0
    return -json.loads((out / "report/metrics.json").read_text())["top1_change_points"]


@pytest.mark.slow
@pytest.mark.xdist_group("trained_digits_clip")  # one worker trains the shared CLIP
def test_int8_digits_clip_zero_shot_drops_at_most_one_point(
    trained_digits_clip, demo_shards, tmp_path
):
    _, checkpoint = trained_digits_clip
    config = CONFIGS / "clip/digits.yaml"
    assert int8_top1_drop_points(checkpoint, config, demo_shards / "test", tmp_path) <= 1.0


@pytest.mark.slow
@pytest.mark.xdist_group("trained_digits_clip")  # one worker trains the shared CLIP
def test_onnx_int8_image_tower_keeps_the_digits_clip_zero_shot(
    trained_digits_clip, demo_shards, tmp_path
):
    """`multimodal export --format onnx --int8`'s image file (ONNX Runtime's dynamic int8)
    classifies the 270 test digits zero-shot, against the eager model's text classifier,
    within one point of the eager image tower."""
    pytest.importorskip("onnxruntime", reason="the optional extra multimodal[export]")
    pytest.importorskip("onnxscript", reason="the optional extra multimodal[export]")
    from multimodal.eval.class_names import render_prompts
    from multimodal.eval.zeroshot import zeroshot_classifier
    from multimodal.export.export import export_towers, load_runner

    _, checkpoint = trained_digits_clip
    loaded = load_model(checkpoint, config=CONFIGS / "clip/digits.yaml")
    manifest = export_towers(loaded, tmp_path, format="onnx", towers=("image",), int8=True)
    assert [f.file for f in manifest.files] == ["image.onnx", "image.int8.onnx"]
    int8 = load_runner(tmp_path / "image.int8.onnx")
    prompts = render_prompts(class_names("digits"), templates("digits"))
    classifier = zeroshot_classifier(
        loaded.model, loaded.tokenizer, prompts, context_length=loaded.context_length
    )
    correct = {"fp32": 0, "int8": 0}
    total = 0
    for batch in eval_loader(str(demo_shards / "test"), loaded, num_workers=0):
        with torch.no_grad():
            features = {
                "fp32": loaded.model.encode_image(batch["images"]),
                "int8": int8({"images": batch["images"]})[0],
            }
        for name, feature in features.items():
            predicted = (feature @ classifier.T).argmax(1)
            correct[name] += (predicted == batch["labels"]).sum().item()
        total += len(batch["labels"])
    assert total == 270
    top1 = {name: n / total for name, n in correct.items()}
    print(f"zero-shot top-1 fp32 {top1['fp32']:.4f}, ONNX int8 image tower {top1['int8']:.4f}")
    assert top1["fp32"] >= 0.9 and 100 * (top1["fp32"] - top1["int8"]) <= 1.0
