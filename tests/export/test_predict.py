"""`trainer.predict` with `PredictionWriter` for every task, on the inputs users give it (shards,
an image folder, a prompt file): one row per sample in key order, equal to the model's own
outputs computed directly, and under 2 DDP processes equal to 1 process.

The models are the configs' under configs/, shrunk to 1 layer of width 32, randomly
initialised (nothing trained)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from multimodal.data import TextFileDataModule
from multimodal.data.digits import DIGIT_NAMES
from multimodal.data.predict_inputs import RankRangeSampler, list_images
from multimodal.data.shards import encode_png, write_shards
from multimodal.eval.loading import instantiate_model_and_data
from multimodal.export.predict import (
    JSONL,
    PredictionWriter,
    ensure_writer,
    merge_parts,
    split_rows,
    write_part,
)
from multimodal.tasks.captioning import cut_at
from tests.helpers import CONFIGS, ROOT, quiet_trainer
from text.generation import GenerationConfig, generate
from text.tokenizer import load_tokenizer, train_tokenizer

N_SHARD_SAMPLES = 11  # 3 shards of at most 4: ranks of 6 and 5 items meet inside a shard
N_IMAGES = 5
ANSWERS = ["0", "1", "2", "yes", "no"]
CLIP_IDS = {"vocab_size": 49408, "bos_id": 49406, "eos_id": 49407, "pad_id": 0}
PROMPTS = "the cat sat on\n\na dog ran\nthe [MASK] sat on the mat\na [MASK] ran in the [MASK]\n"
PROMPT_LINES = ["1", "3", "4", "5"]  # line numbers of the non-blank lines


# ---------------------------------------------------------------------------------------------
# inputs and tiny tasks


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Shards of captioned, labelled noise images with two questions each, a folder of images
    (one in a subfolder, and a file that is not an image), a prompt file, a WordPiece
    tokenizer and a classification pair file."""
    root = tmp_path_factory.mktemp("predict_inputs")
    rng = np.random.default_rng(0)

    def noise() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))

    samples = (
        {
            "__key__": f"s-{i:04d}",
            "png": encode_png(noise()),
            "txt": f"a photo of the number {i % 3}",
            "json": {
                "label": i % 10,
                "split": "val",
                "vqa": [
                    {"question": "what number is it?", "answers": [str(i % 3)]},
                    {"question": "is it a digit?", "answers": ["yes"]},
                ],
            },
        }
        for i in range(N_SHARD_SAMPLES)
    )
    write_shards(samples, root / "shards", prefix="noise", max_samples=4, progress=False)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(N_IMAGES):
        noise().save(images / ("sub" if i % 2 else "") / f"im{i}.png")
    (images / "notes.txt").write_text("not an image")
    (root / "one_image").mkdir()
    shutil.copy(images / "im0.png", root / "one_image")
    (root / "prompts.txt").write_text(PROMPTS)
    corpus = root / "corpus.txt"
    corpus.write_text("the cat sat on the mat\na dog ran in the park\nthe bird sang\n" * 20)
    train_tokenizer([corpus], kind="wordpiece", vocab_size=120).save(root / "wordpiece")
    (root / "pairs.tsv").write_text("pos\tthe cat sat\nneg\ta dog ran\n")
    return {
        "shards": root / "shards" / "val",
        "images": images,
        "one_image": root / "one_image",
        "prompts": root / "prompts.txt",
        "corpus": corpus,
        "wordpiece": root / "wordpiece",
        "pairs": root / "pairs.tsv",
        "root": root,
    }


def shrink(node: object) -> None:
    """Every transformer of a config section: 1 layer, width 32, 2 heads."""
    if isinstance(node, dict):
        if "n_layers" in node:
            node.update(n_layers=1, n_heads=2)
            for name, value in (("dim", 32), ("n_kv_heads", 1), ("mlp_hidden_dim", 64)):
                if name in node:
                    node[name] = value
        if "embed_dim" in node:
            node["embed_dim"] = 32
        for value in node.values():
            shrink(value)
    elif isinstance(node, list):
        for value in node:
            shrink(value)


def merge(into: dict, changes: dict) -> None:
    """Merge nested `changes` into the dict `into`."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def clip_vocabulary(path: str) -> dict:
    """`{path: {"init_args": {"config": CLIP_IDS}}}` nested along the dotted `path`."""
    changes: dict = {"config": CLIP_IDS}
    for part in reversed(path.split(".")):
        changes = {part: {"init_args": changes}}
    return changes


def tiny(
    folder: Path,
    name: str,
    data: dict,
    model: dict | None = None,
    config: str = "",
    data_class: str | None = None,
):
    """(task, datamodule, config path) of configs/<config>, shrunk, with `model` merged into
    the model's init args and `data` into the data's (or, with `data_class`, the data
    section `{class_path: data_class, init_args: data}`); weights seeded."""
    content = yaml.safe_load((CONFIGS / config).read_text())
    shrink(content["model"])
    merge(content["model"]["init_args"], model or {})
    if data_class is not None:
        content["data"] = {"class_path": data_class, "init_args": data}
    else:
        merge(content["data"]["init_args"], data)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    torch.manual_seed(0)
    task, datamodule = instantiate_model_and_data(path)
    return task.eval(), datamodule, path


def predict(task, datamodule, out: Path) -> Path:
    """One-process `trainer.predict` with the writer into `out`."""
    trainer = quiet_trainer(precision="32-true", callbacks=[PredictionWriter(out)])
    trainer.predict(task, datamodule=datamodule, return_predictions=False)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_keys(folder: Path) -> list[str]:
    return (folder / "keys.txt").read_text().splitlines()


def folder_images(inputs: dict[str, Path], transform) -> tuple[list[str], torch.Tensor]:
    """The folder's keys (sorted relative paths of the image files) and images, by hand."""
    keys = sorted(["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"])
    pixels = [transform(Image.open(inputs["images"] / k).convert("RGB")) for k in keys]
    return keys, torch.stack(pixels)


def shard_batches(datamodule) -> list[dict]:
    """The validation batches of the shards (what predicting reads: the same items, in order)."""
    datamodule.setup("validate")
    return list(datamodule.val_dataloader())


def image_text_data(inputs: dict[str, Path], **extra) -> dict:
    return {
        "train_urls": str(inputs["shards"]),
        "val_urls": str(inputs["shards"]),
        "tokenizer": "clip",
        "context_length": 16,
        "batch_size": 4,
        "num_workers": 0,
        "transform": {"image_size": 32, "normalization": "openai_clip", "crop_pct": 1.0},
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# contrastive and captioning (their outputs are also the 1-process references of the DDP test)


@pytest.fixture(scope="module")
def clip_run(inputs):
    """A tiny CLIP's predictions on the shards and on the image folder."""
    folder = inputs["root"] / "clip"
    folder.mkdir()
    task, datamodule, config = tiny(
        folder, "clip", image_text_data(inputs), config="clip/digits.yaml"
    )
    datamodule.num_workers = 2  # batches arrive from the workers in turn: sorted back
    shards = predict(task, datamodule, folder / "shards")
    datamodule.num_workers = 0
    datamodule.predict_images = str(inputs["images"])
    images = predict(task, datamodule, folder / "images")
    datamodule.predict_images = None
    return {"task": task, "datamodule": datamodule, "config": config, "outs": (shards, images)}


@pytest.fixture(scope="module")
def caption_run(inputs):
    """A tiny captioner's captions of the image folder."""
    folder = inputs["root"] / "caption"
    folder.mkdir()
    data = image_text_data(inputs, predict_images=str(inputs["images"]))
    model = clip_vocabulary("model.decoder")
    task, datamodule, config = tiny(folder, "caption", data, model, "caption/digits.yaml")
    return {
        "task": task,
        "datamodule": datamodule,
        "config": config,
        "out": predict(task, datamodule, folder / "out"),
    }


def test_clip_embeddings_of_shards_and_folder_equal_encode_in_key_order(clip_run, inputs):
    task, datamodule = clip_run["task"], clip_run["datamodule"]
    shards, images = clip_run["outs"]
    batches = shard_batches(datamodule)
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [f"s-{i:04d}" for i in range(N_SHARD_SAMPLES)]
    assert read_keys(shards) == keys
    with torch.no_grad():
        image_ref = torch.cat([task.model.encode_image(b["images"]) for b in batches])
        text_ref = torch.cat(
            [task.model.encode_text(b["input_ids"], b["attention_mask"]) for b in batches]
        )
    np.testing.assert_allclose(np.load(shards / "image_embeddings.npy"), image_ref, atol=1e-5)
    np.testing.assert_allclose(np.load(shards / "text_embeddings.npy"), text_ref, atol=1e-5)

    keys, pixels = folder_images(inputs, datamodule.transform.eval())
    assert read_keys(images) == keys
    with torch.no_grad():
        reference = task.model.encode_image(pixels)
    np.testing.assert_allclose(np.load(images / "image_embeddings.npy"), reference, atol=1e-5)
    files = ["image_embeddings.npy", "keys.txt", "manifest.json"]
    assert sorted(p.name for p in images.iterdir()) == files
    manifest = json.loads((images / "manifest.json").read_text())
    assert manifest == {"files": {"image_embeddings.npy": 5, "keys.txt": 5}, "ranks": 1}


def test_captions_of_an_image_folder_equal_generate(caption_run, inputs):
    task, datamodule = caption_run["task"], caption_run["datamodule"]
    keys, pixels = folder_images(inputs, datamodule.transform.eval())
    sequences = task.model.generate(pixels).sequences
    eos = task.model.decoder.config.eos_id
    captions = [datamodule.tokenizer.decode(cut_at(row, eos)) for row in sequences]
    rows = read_jsonl(caption_run["out"] / "predictions.jsonl")
    assert rows == [{"key": k, "caption": c} for k, c in zip(keys, captions, strict=True)]


# ---------------------------------------------------------------------------------------------
# VQA and classification


def test_vqa_answers_every_question_once_equal_to_the_classifier(inputs, tmp_path):
    data = {**image_text_data(inputs), "answer_vocab": ANSWERS, "max_answers": None}
    model = clip_vocabulary("model.text_tower")
    merge(model, {"model": {"init_args": {"num_answers": len(ANSWERS)}}})
    task, datamodule, _ = tiny(tmp_path, "vqa", data, model, config="vqa/digits.yaml")
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    batches = shard_batches(datamodule)
    with torch.no_grad():
        logits = torch.cat(
            [task.model(b["images"], b["input_ids"], b["attention_mask"]).logits for b in batches]
        )
    score, index = logits.sigmoid().max(dim=-1)
    keys = [f"s-{i:04d}/{q}" for i in range(N_SHARD_SAMPLES) for q in (0, 1)]
    assert [r["key"] for r in rows] == keys
    assert [r["answer_id"] for r in rows] == index.tolist()
    assert [r["answer"] for r in rows] == [ANSWERS[i] for i in index.tolist()]
    np.testing.assert_allclose([r["score"] for r in rows], score, atol=1e-6)


def test_image_classifier_rows_of_a_folder_equal_softmax(inputs, tmp_path):
    data = {"batch_size": 2, "predict_images": str(inputs["images"])}
    task, datamodule, _ = tiny(tmp_path, "vit", data, config="vision/vit_digits.yaml")
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    keys, pixels = folder_images(inputs, datamodule.transform.eval())
    with torch.no_grad():
        probability, index = task(pixels).softmax(dim=-1).max(dim=-1)
    assert [r["key"] for r in rows] == keys
    assert [r["class_index"] for r in rows] == index.tolist()
    assert [r["class_name"] for r in rows] == [DIGIT_NAMES[i] for i in index.tolist()]
    np.testing.assert_allclose([r["probability"] for r in rows], probability, atol=1e-6)


def test_image_classifier_rows_of_shards_are_keyed_and_equal_softmax(inputs, tmp_path):
    shards = str(inputs["shards"])
    data = {"train_urls": shards, "val_urls": shards, "batch_size": 4, "num_workers": 0}
    task, datamodule, _ = tiny(tmp_path, "vit", data, config="vision/vit_digits_shards.yaml")
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    images = torch.cat([images for images, _ in shard_batches(datamodule)])  # (images, labels)
    with torch.no_grad():
        probability, index = task(images).softmax(dim=-1).max(dim=-1)
    assert [r["key"] for r in rows] == [f"s-{i:04d}" for i in range(N_SHARD_SAMPLES)]
    assert [r["class_index"] for r in rows] == index.tolist()
    assert "class_name" not in rows[0]  # the shards name no classes
    np.testing.assert_allclose([r["probability"] for r in rows], probability, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# language models


def test_causal_lm_continues_each_line_of_a_prompt_file_as_generate_does(inputs, tmp_path):
    data = {
        "train_files": [str(inputs["corpus"])],
        "tokenizer": "clip",
        "objective": "causal",
        "max_length": 16,
        "batch_size": 3,  # prompts of different lengths share a batch: left-padded
        "predict_file": str(inputs["prompts"]),
    }
    model = clip_vocabulary("model")
    task, datamodule, _ = tiny(
        tmp_path, "gpt", data, model, "text/gpt_reverse.yaml", "multimodal.data.TextFileDataModule"
    )
    task.generation = GenerationConfig(max_new_tokens=5)
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    tokenizer = load_tokenizer("clip")
    lines = [line for line in PROMPTS.splitlines() if line]
    assert [r["key"] for r in rows] == PROMPT_LINES
    for row, line in zip(rows, lines, strict=True):
        prompt = torch.tensor([tokenizer.encode(line, add_special_tokens=False)])
        new = generate(task.model, prompt, config=task.generation).sequences[0]
        assert row["continuation_ids"] == cut_at(new, CLIP_IDS["eos_id"])
        assert row["continuation"] == tokenizer.decode(row["continuation_ids"])


def test_seq2seq_outputs_of_the_synthetic_strings_equal_generate(tmp_path):
    data = {"task": "reverse", "objective": "seq2seq", "n_train": 4, "n_val": 7, "batch_size": 3}
    task, datamodule, _ = tiny(tmp_path, "t5", data, config="text/t5_reverse.yaml")
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    assert [r["key"] for r in rows] == [f"val/{n}" for n in range(7)]
    eos = task.model.config.eos_id
    for row, example in zip(rows, datamodule.datasets["val"].examples, strict=True):
        source = torch.tensor([example["input_ids"]])
        config = GenerationConfig(max_new_tokens=task.model.config.transformer.max_positions - 1)
        new = generate(task.model, source, config=config).sequences[0]
        assert row["output_ids"] == cut_at(new, eos)
        assert "output" not in row  # the synthetic data has no tokenizer: ids only


def test_masked_lm_fills_the_masks_of_each_prompt_with_the_most_likely_token(inputs, tmp_path):
    data = {
        "train_files": [str(inputs["corpus"])],
        "tokenizer": str(inputs["wordpiece"]),
        "objective": "masked",
        "next_sentence": False,
        "max_length": 16,
        "batch_size": 2,
        "predict_file": str(inputs["prompts"]),
    }
    model = {"next_sentence": False}
    task, datamodule, _ = tiny(tmp_path, "bert", data, model, config="text/bert_mlm.yaml")
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    tokenizer = datamodule.tokenizer
    lines = [line for line in PROMPTS.splitlines() if line]
    assert [r["key"] for r in rows] == PROMPT_LINES
    n_masks = 0
    for row, line in zip(rows, lines, strict=True):
        ids = torch.tensor([tokenizer.encode(line)])
        with torch.no_grad():
            best = task.mlm_head(task.encoder(ids).hidden).argmax(dim=-1)[0]
        masked = ids[0] == tokenizer.mask_id
        n_masks += int(masked.sum())
        assert row["filled_ids"] == torch.where(masked, best, ids[0]).tolist()
        assert row["predicted"] == [tokenizer.decode([i]) for i in best[masked].tolist()]
        assert row["filled"] == tokenizer.decode(row["filled_ids"])
    assert n_masks == 3


def test_text_classifier_rows_of_a_prompt_file_equal_softmax(inputs, tmp_path):
    data = {
        "train_file": str(inputs["pairs"]),
        "tokenizer": str(inputs["wordpiece"]),
        "objective": "classification",
        "labels": ["neg", "pos"],
        "batch_size": 3,
        "predict_file": str(inputs["prompts"]),
    }
    model = {"init_from": None}
    task, datamodule, _ = tiny(tmp_path, "cls", data, model, config="text/bert_classifier.yaml")
    rows = read_jsonl(predict(task, datamodule, tmp_path / "out") / "predictions.jsonl")
    tokenizer = datamodule.tokenizer
    lines = [line for line in PROMPTS.splitlines() if line]
    assert [r["key"] for r in rows] == PROMPT_LINES
    for row, line in zip(rows, lines, strict=True):
        ids = torch.tensor([tokenizer.encode(line)])
        with torch.no_grad():
            probability, index = (
                task(ids, torch.ones_like(ids, dtype=torch.bool)).softmax(-1)[0].max(dim=-1)
            )
        assert row["class_index"] == int(index)
        assert row["class_name"] == ["neg", "pos"][int(index)]
        assert row["probability"] == pytest.approx(float(probability), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# two processes


def test_two_ddp_processes_write_what_one_process_writes(clip_run, caption_run, inputs, tmp_path):
    """One DDP launch predicts the CLIP's shards (ranks of 6 and 5 samples, 2 workers each)
    and images (3 and 2) and the captioner's images; the merged files equal the 1-process
    ones. A folder of one image leaves rank 1 without a batch."""
    runs, specs = [], []
    for name, run, data, reference in (
        ("clip_shards", clip_run, {"num_workers": 2}, clip_run["outs"][0]),
        ("clip_images", clip_run, {"predict_images": str(inputs["images"])}, clip_run["outs"][1]),
        ("caption", caption_run, {}, caption_run["out"]),
        ("clip_one_image", clip_run, {"predict_images": str(inputs["one_image"])}, None),
    ):
        weights, out = tmp_path / f"{name}.pt", tmp_path / name
        torch.save(run["task"].state_dict(), weights)
        runs.append((reference, out))
        specs.append(
            {"config": str(run["config"]), "weights": str(weights), "data": data, "out": str(out)}
        )
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(specs))
    result = subprocess.run(
        [sys.executable, "-m", "tests.export.predict_ddp", str(spec_path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    one = runs.pop()[1]  # rank 1 had nothing to predict
    assert read_keys(one) == ["im0.png"]
    np.testing.assert_allclose(
        np.load(one / "image_embeddings.npy"),
        np.load(clip_run["outs"][1] / "image_embeddings.npy")[:1],
        atol=1e-5,
    )
    for reference, out in runs:
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
        for path in reference.iterdir():
            if path.suffix == ".npy":
                np.testing.assert_allclose(np.load(out / path.name), np.load(path), atol=1e-5)
            elif path.name == "manifest.json":
                two, one = (json.loads(p.read_text()) for p in (out / path.name, path))
                assert two == {**one, "ranks": 2}
            else:
                assert (out / path.name).read_text() == path.read_text(), path.name


# ---------------------------------------------------------------------------------------------
# the parts, by hand


def test_rank_ranges_cover_every_index_once_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            runs = [list(RankRangeSampler(n, rank, world)) for rank in range(world)]
            assert [i for run in runs for i in run] == list(range(n))
            assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_split_rows_drops_padded_items_and_sends_arrays_and_text_apart():
    prediction = {
        "keys": ["a", "b", "c"],
        "valid": torch.tensor([True, False, True]),
        "image_embeddings": torch.arange(6.0).reshape(3, 2),
        "caption": ["x", "y", "z"],
        "class_index": torch.tensor([4, 5, 6]),
    }
    keys, arrays, records = split_rows(prediction)
    assert keys == ["a", "c"]
    np.testing.assert_array_equal(arrays["image_embeddings"], [[0, 1], [4, 5]])
    assert records == [
        {"key": "a", "caption": "x", "class_index": 4},
        {"key": "c", "caption": "z", "class_index": 6},
    ]
    with pytest.raises(ValueError, match="sample `keys`"):
        split_rows({"caption": ["x"]})


def test_merge_concatenates_the_parts_in_rank_order_and_removes_a_previous_runs_files(
    tmp_path,
):
    def write_parts(rows_per_rank: list[list[str]], with_text: bool) -> None:
        for rank, keys in enumerate(rows_per_rank):
            prediction = {"keys": keys, "text_embeddings": torch.ones(len(keys), 2) * rank}
            if with_text:
                prediction["caption"] = [f"caption {k}" for k in keys]
            write_part(tmp_path, rank, *split_rows(prediction))

    write_parts([["a", "b"], ["c"], []], with_text=True)  # the last rank got nothing
    assert merge_parts(tmp_path, 3) == {"text_embeddings.npy": 3, "keys.txt": 3, JSONL: 3}
    assert read_keys(tmp_path) == ["a", "b", "c"]
    np.testing.assert_array_equal(np.load(tmp_path / "text_embeddings.npy")[:, 0], [0, 0, 1])
    assert [r["caption"] for r in read_jsonl(tmp_path / JSONL)] == [
        "caption a",
        "caption b",
        "caption c",
    ]
    assert not (tmp_path / ".parts").exists()
    write_parts([["d"], ["e"]], with_text=False)
    merge_parts(tmp_path, 2)
    assert not (tmp_path / JSONL).exists()  # the first run's, not written again
    assert read_keys(tmp_path) == ["d", "e"]


def test_ensure_writer_adds_one_or_points_the_configured_one_at_the_out_folder(tmp_path):
    trainer = quiet_trainer(default_root_dir=str(tmp_path))
    writer = ensure_writer(trainer)
    assert writer in trainer.callbacks and writer.folder(trainer) == tmp_path / "predictions"
    configured = PredictionWriter(tmp_path / "configured")
    trainer = quiet_trainer(callbacks=[configured])
    assert ensure_writer(trainer, tmp_path / "given") is configured
    assert configured.folder(trainer) == tmp_path / "given"
    assert sum(isinstance(c, PredictionWriter) for c in trainer.callbacks) == 1


def test_an_image_folder_without_images_and_a_text_module_without_prompts_are_refused(
    tmp_path, inputs
):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a folder"):
        list_images(tmp_path / "missing")
    datamodule = TextFileDataModule(train_files=[str(inputs["corpus"])])
    with pytest.raises(ValueError, match="set predict_file"):
        datamodule.predict_dataloader()
