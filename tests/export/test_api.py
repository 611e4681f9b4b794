"""The inference API `multimodal.load`: each ability equals the model's own computation on the
same input (encode_image, Captioner.generate, the VQA classifier over the datamodule's own
batch, text generation), zero-shot `classify` equals `multimodal zeroshot`, a missing ability
is named, and `import multimodal` stays free of torch."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import uuid
from io import BytesIO
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import multimodal
from multimodal.data.shards_datamodules import VQACollator, VQASample
from multimodal.eval.class_names import class_names
from multimodal.eval.commands import zeroshot_main
from multimodal.eval.loading import instantiate_model_and_data
from multimodal.export.api import Predictor, load
from multimodal.export.quantize import load_quantized, quantize_int8, save_quantized
from multimodal.models import OpenCLIP
from multimodal.tasks import load_task
from multimodal.tasks.captioning import cut_at
from tests.helpers import CONFIGS, ROOT, save_task
from text import GenerationConfig, generate, load_tokenizer, train_tokenizer

SMALL = {"dim": 32, "n_heads": 2, "n_layers": 1}
DIGIT_QUESTIONS = ["what digit is this?", "is it even?", "is it greater than five?"]
DEMO_ANSWERS = [str(i) for i in range(11)] + ["yes", "no"]  # the demo's 13 answers


def noise_images(n: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def write_run(folder: Path, config: dict) -> Path:
    """A randomly initialised task of `config` saved as `folder/model.ckpt` with the config as
    `folder/config.yaml` (where `load` finds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    task, _ = instantiate_model_and_data(path)
    return save_task(task, folder / "model.ckpt")


def reference(checkpoint: Path):
    """The task (eval mode) and datamodule rebuilt without the API."""
    config = checkpoint.parent / "config.yaml"
    task = load_task(checkpoint, config).eval()
    _, data = instantiate_model_and_data(config)
    return task, data


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small WordPiece tokenizer of digit captions and questions ([PAD] 0, [CLS] 2, [SEP] 3,
    as the demo's)."""
    root = tmp_path_factory.mktemp("api_tokenizer")
    words = class_names("digits")
    lines = [f"a photo of the number {w}" for w in words] + DIGIT_QUESTIONS + DEMO_ANSWERS
    (root / "corpus.txt").write_text("\n".join(lines * 4))
    tokenizer = train_tokenizer([root / "corpus.txt"], kind="wordpiece", vocab_size=80)
    tokenizer.save(root / "tok")
    return root / "tok"


def small_vision_text(config: dict, tokenizer: Path) -> dict:
    """A caption or VQA config with a 1-layer, 32-wide image tower and the test tokenizer."""
    model = config["model"]["init_args"]["model"]["init_args"]
    model["image_tower"]["init_args"]["config"].update(SMALL)
    data = config["data"]["init_args"]
    data.update(tokenizer=str(tokenizer), num_workers=0)
    return model


@pytest.fixture(scope="module")
def captioner_checkpoint(tmp_path_factory, tokenizer_dir):
    config = yaml.safe_load((CONFIGS / "caption/digits.yaml").read_text())
    model = small_vision_text(config, tokenizer_dir)
    decoder = model["decoder"]["init_args"]["config"]
    decoder["vocab_size"] = load_tokenizer(str(tokenizer_dir)).vocab_size
    decoder["transformer"].update(SMALL)
    return write_run(tmp_path_factory.mktemp("api_captioner"), config)


@pytest.fixture(scope="module")
def vqa_checkpoint(tmp_path_factory, tokenizer_dir):
    config = yaml.safe_load((CONFIGS / "vqa/digits.yaml").read_text())
    model = small_vision_text(config, tokenizer_dir)
    model["text_tower"]["init_args"]["config"]["transformer"].update(SMALL)
    model["fusion"].update(SMALL)
    config["data"]["init_args"]["answer_vocab"] = DEMO_ANSWERS
    return write_run(tmp_path_factory.mktemp("api_vqa"), config)


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory):
    config = yaml.safe_load((CONFIGS / "text/gpt_reverse.yaml").read_text())
    model = config["model"]["init_args"]["model"]["init_args"]["config"]
    model["transformer"].update(SMALL, n_kv_heads=1, mlp_hidden_dim=64)
    return write_run(tmp_path_factory.mktemp("api_gpt"), config)


def test_import_multimodal_does_not_import_torch():
    code = "import sys, multimodal\nprint('torch' in sys.modules, 'load' in dir(multimodal))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True"]
    assert multimodal.load is load  # imported on first use
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        multimodal.lod  # noqa: B018


def test_embeddings_of_paths_and_images_equal_the_models_encoders(tiny_checkpoint, tmp_path):
    checkpoint, config = tiny_checkpoint  # config.yaml next to the checkpoint: found
    predictor = load(checkpoint)
    assert isinstance(predictor, Predictor) and not predictor.model.training
    assert predictor.abilities == ("embed_images", "embed_texts", "classify")
    images = noise_images(5)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    task, data = reference(checkpoint)
    pixels = torch.stack([data.transform.eval()(image) for image in images])  # (5, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(task.model.encode_image(pixels), dim=-1)
    from_images = predictor.embed_images(images, batch_size=2)  # 3 batches
    from_paths = predictor.embed_images([str(p) for p in paths], batch_size=4)
    assert from_images.shape == (5, 32)
    torch.testing.assert_close(from_images, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_paths, from_images, atol=1e-6, rtol=1e-5)
    assert torch.allclose(from_images.norm(dim=1), torch.ones(5))

    texts = ["a photo of the number one", "seven", "a handwritten 7 on paper"]
    tokens = data.tokenizer.batch_encode(texts, max_length=data.context_length)
    with torch.no_grad():
        expected_texts = task.model.encode_text(tokens.input_ids, tokens.attention_mask)
    got = predictor.embed_texts(texts, batch_size=2)
    torch.testing.assert_close(got, expected_texts, atol=1e-6, rtol=1e-5)

    with pytest.raises(TypeError, match="wrap it in"):
        predictor.embed_images(images[0])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor.embed_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="cannot caption: that needs a Captioner.*it can: "):
        predictor.caption(images)


def shard_images(folder: Path) -> tuple[list[Image.Image], list[int]]:
    """The images and labels of every sample of a shard folder, in the order the evaluation
    reads them (shards sorted by name, samples in file order)."""
    images, labels = [], []
    for shard in sorted(folder.glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in samples.values():
            with Image.open(BytesIO(sample["png"])) as image:
                images.append(image.convert("RGB"))
            labels.append(json.loads(sample["json"])["label"])
    return images, labels


def assert_classify_equals_zeroshot(predictor, checkpoint, config, shards, out, images):
    """`classify` of `images` (the shards' samples, in order) against `multimodal zeroshot`
    on the shards: the same top-1, top-5 and mean per-class recall."""
    args = ["--checkpoint", str(checkpoint), "--config", str(config), "--data", str(shards)]
    args += ["--classes", "digits", "--out", str(out), "--batch-size", "64"]
    assert zeroshot_main([*args, "--num-workers", "0", "--no-progress", "--examples", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["zeroshot"]
    _, labels = shard_images(shards)
    labels = torch.tensor(labels)
    result = predictor.classify(images, "digits", batch_size=64)
    assert len(result.indices) == metrics["n_samples"] == len(images)
    right = result.indices == labels
    assert int(right.sum()) / len(right) == metrics["top1"]  # as ZeroShotMetrics counts
    top5 = (result.similarities.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    assert int(top5.sum()) / len(top5) == metrics["top5"]
    recalls = [right[labels == c].double().mean() for c in labels.unique()]
    assert float(torch.stack(recalls).mean()) == pytest.approx(metrics["mean_per_class_recall"])
    names = class_names("digits")
    assert result.names == [names[i] for i in result.indices.tolist()]
    torch.testing.assert_close(result.probabilities.sum(dim=1), torch.ones(len(images)))
    assert torch.equal(result.probabilities.argmax(dim=1), result.indices)
    return metrics["top1"]


def test_classify_equals_the_zeroshot_command(tiny_checkpoint, few_digits, tmp_path):
    checkpoint, config = tiny_checkpoint
    predictor = load(checkpoint, config=config)
    images, _ = shard_images(few_digits)
    assert_classify_equals_zeroshot(predictor, checkpoint, config, few_digits, tmp_path, images)
    # a plain list of names with the default template is the classifier of that prompt
    result = predictor.classify(images[:3], ["cat", "dog"])
    prompts = predictor.embed_texts(["a photo of a cat.", "a photo of a dog."])
    expected = predictor.embed_images(images[:3]) @ prompts.T
    torch.testing.assert_close(result.similarities, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("trained_digits_clip")  # one worker trains the shared CLIP
def test_classify_of_the_trained_digits_clip_equals_zeroshot(
    trained_digits_clip, demo_shards, tmp_path
):
    _, checkpoint = trained_digits_clip
    config = CONFIGS / "clip/digits.yaml"
    images, _ = shard_images(demo_shards / "test")
    paths = []
    for i, image in enumerate(images):  # through files, as users call it
        paths.append(tmp_path / "images" / f"{i:04d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        image.save(paths[-1])
    predictor = load(checkpoint, config=config)
    out = tmp_path / "report"
    top1 = assert_classify_equals_zeroshot(
        predictor, checkpoint, config, demo_shards / "test", out, paths
    )
    print(f"zero-shot top-1 through classify and multimodal zeroshot: {top1:.4f}")
    assert top1 >= 0.9  # a trained model: the equality is not that of chance predictions


def test_captions_equal_the_captioners_generate(captioner_checkpoint):
    predictor = load(captioner_checkpoint)
    assert predictor.abilities == ("caption",)
    task, data = reference(captioner_checkpoint)
    images = noise_images(3, seed=1)
    pixels = torch.stack([data.transform.eval()(image) for image in images])
    eos = task.model.decoder.config.eos_id
    for options in ({}, {"strategy": "beam", "num_beams": 3, "max_new_tokens": 6}):
        config = GenerationConfig(**options) if options else None
        ids = task.model.generate(pixels, config).sequences
        expected = [data.tokenizer.decode(cut_at(row, eos)) for row in ids]
        assert predictor.caption(images, batch_size=2, **options) == expected
    assert any(expected), "the random captioner writes some words"
    with pytest.raises(ValueError, match=r"cannot classify: .*; it can: caption$"):
        predictor.classify(images, ["cat", "dog"])
    with pytest.raises(ValueError, match="unknown generation option.*'beams'"):
        predictor.caption(images, beams=2)


def test_answers_equal_the_vqa_classifier_on_the_datamodules_batch(vqa_checkpoint):
    predictor = load(vqa_checkpoint)
    assert predictor.abilities == ("answer",)
    task, data = reference(vqa_checkpoint)
    images = noise_images(3, seed=2)
    # the datamodule's own sample map and collate over the same images and questions
    sample = VQASample(
        transform=data.transform.eval(),
        tokenizer=data.tokenizer,
        context_length=data.context_length,
        answer_index={a: i for i, a in enumerate(data.answer_vocab)},
    )
    items = [
        sample({"image": image, "json": {"vqa": [{"question": q, "answers": []}]}, "__key__": "k"})
        for image, q in zip(images, DIGIT_QUESTIONS, strict=True)
    ]
    batch = VQACollator(data.pad_id, data.context_length, data.num_answers)(
        [item for found in items for item in found]
    )
    with torch.no_grad():
        logits = task.model(batch["images"], batch["input_ids"], batch["attention_mask"]).logits
    result = predictor.answer(images, DIGIT_QUESTIONS, batch_size=2)
    assert torch.equal(result.indices, logits.argmax(dim=1))
    assert result.answers == [DEMO_ANSWERS[i] for i in logits.argmax(dim=1).tolist()]
    torch.testing.assert_close(result.scores, logits.sigmoid(), atol=1e-6, rtol=1e-5)
    same = predictor.answer(images, DIGIT_QUESTIONS[0])  # one question for every image
    assert torch.equal(same.indices[:1], result.indices[:1])
    with pytest.raises(ValueError, match="2 questions for 3 images"):
        predictor.answer(images, DIGIT_QUESTIONS[:2])
    with pytest.raises(ValueError, match="cannot generate: .*; it can: answer$"):
        predictor.generate("what digit is this?")


def test_generate_equals_text_generation(gpt_checkpoint):
    predictor = load(gpt_checkpoint)
    assert predictor.abilities == ("generate",)
    task, _ = reference(gpt_checkpoint)
    prompt = [1, 5, 9, 7, 3]  # [BOS] x [SEP] of the reverse task
    eos = task.model.config.eos_id
    for options in ({}, {"strategy": "beam", "num_beams": 2, "num_return_sequences": 2}):
        config = GenerationConfig(max_new_tokens=28, **options)  # 32 positions - 5 + 1
        out = generate(task.model, torch.tensor([prompt]), config=config)
        got = predictor.generate(prompt, **options)
        assert [c.ids for c in got] == [cut_at(row, eos) for row in out.sequences]
        assert [c.score for c in got] == pytest.approx(out.scores.tolist())
        assert all(c.text is None for c in got)  # the synthetic data has no tokenizer
    with pytest.raises(ValueError, match="pass the prompt as a list of token ids"):
        predictor.generate("abc")
    with pytest.raises(ValueError, match=r"ints in \[0, 15\)"):
        predictor.generate([1, 99])
    with pytest.raises(ValueError, match="cannot embed_images: .*; it can: generate$"):
        predictor.embed_images(noise_images(1))


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def test_open_clip_architecture_with_local_weights(tmp_path):
    name = f"test-api-clip-{uuid.uuid4().hex[:8]}"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)

    predictor = load(name, pretrained=weights)
    assert predictor.abilities == ("embed_images", "embed_texts", "classify")
    reference_model = OpenCLIP(name, checkpoint=weights).eval()
    images = noise_images(3, seed=3, size=40)
    pixels = torch.stack([reference_model.preprocess(image) for image in images])
    with torch.no_grad():
        expected = reference_model.encode_image(pixels)
    torch.testing.assert_close(predictor.embed_images(images), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="pass pretrained=TAG"):
        load(name)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load(name, pretrained=tmp_path / "missing.pt")


def test_int8_file_of_quantize(tiny_checkpoint, tmp_path):
    checkpoint, config = tiny_checkpoint
    task = load_task(checkpoint, config)
    path = save_quantized(
        quantize_int8(task.model), yaml.safe_load(Path(config).read_text()), tmp_path / "i8.pt"
    )
    predictor = load(path)
    assert predictor.abilities == ("embed_images", "embed_texts", "classify")
    loaded = load_quantized(path)
    images = noise_images(3, seed=4)
    pixels = torch.stack([loaded.transform(image) for image in images])
    with torch.no_grad():
        expected = F.normalize(loaded.model.encode_image(pixels), dim=-1)
    torch.testing.assert_close(predictor.embed_images(images), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no --config"):
        load(path, config=config)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt' does not exist"):
        load(tmp_path / "nothing.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt"):
        load(text)
    lonely = tmp_path / "lonely" / "model.ckpt"
    lonely.parent.mkdir()
    torch.save({"state_dict": {}}, lonely)
    with pytest.raises(FileNotFoundError, match="no config for checkpoint"):
        load(lonely)
