"""The webdataset reading pipeline and the shard datamodules, on shards written here."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from multimodal.data import (
    ImageTextDataModule,
    ShardClassificationDataModule,
    ShardLoader,
    ShardPipelineConfig,
    SkippedSamplesLogger,
    SkipSample,
    VQADataModule,
    build_pipeline,
    decode_sample,
    expand_urls,
)
from multimodal.data.pipeline import shard_name
from multimodal.tasks import ImageClassifier
from tests.helpers import quiet_trainer
from text.tokenizer import load_tokenizer
from vision import ViT, ViTConfig
from vision.transforms import ImageTransformConfig

SMALL = ImageTransformConfig(image_size=32, normalization="openai_clip", hflip=0.0)


# ---------------------------------------------------------------------------------------------
# writing shards


def encode_image(seed: int, fmt: str = "PNG", size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def sample(key: str, n: int, *, caption: str | None = "a photo", meta: dict | None = None) -> dict:
    """A tar sample: image (jpg or png), caption, json with the label, cls."""
    fmt = "jpg" if n % 2 else "png"
    record: dict[str, Any] = {"__key__": key, fmt: encode_image(n, "JPEG" if n % 2 else "PNG")}
    if caption is not None:
        record["txt"] = f"{caption} {n}".encode()
    record["json"] = json.dumps({"label": n % 3, **(meta or {})}).encode()
    record["cls"] = str(n % 3).encode()
    return record


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for record in samples:
            writer.write(record)
    return str(path)


def write_shards(folder: Path, sizes: list[int], prefix: str = "train") -> list[str]:
    """Shards `prefix-000000.tar` ... with sizes[i] samples each; keys are unique."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, n = [], 0
    for index, size in enumerate(sizes):
        records = []
        for _ in range(size):
            records.append(sample(f"{prefix}{index:02d}_{n:05d}", n))
            n += 1
        urls.append(write_shard(folder / f"{prefix}-{index:06d}.tar", records))
    return urls


def all_keys(urls: list[str]) -> list[str]:
    keys = []
    for url in urls:
        keys += [raw["__key__"] for raw in wds.tarfile_samples(iter([{"url": url}]))]
    return keys


# module level so that workers can use them
def key_only(decoded: dict[str, Any]) -> str:
    return decoded["__key__"]


def key_batch(keys: list[str]) -> dict[str, Any]:
    return {"keys": keys}


def needs_caption(decoded: dict[str, Any]) -> str:
    if "image" not in decoded:
        raise SkipSample("missing image")
    if "txt" not in decoded:
        raise SkipSample("missing caption")
    return decoded["__key__"]


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


# ---------------------------------------------------------------------------------------------
# URLs and configuration


def test_expand_urls_braces_directories_lists_and_pipes(tmp_path):
    urls = write_shards(tmp_path / "shards", [1, 1, 1])
    folder = str(tmp_path / "shards")
    assert expand_urls(f"{folder}/train-{{000000..000002}}.tar") == urls
    assert expand_urls(folder) == urls  # a directory: all its *.tar, sorted
    assert expand_urls(f"{folder}/train-*.tar") == urls
    assert expand_urls([urls[2], urls[0]]) == [urls[2], urls[0]]
    piped = expand_urls("pipe:aws s3 cp s3://bucket/train-{000000..000001}.tar -")
    assert piped == [f"pipe:aws s3 cp s3://bucket/train-00000{i}.tar -" for i in range(2)]
    assert expand_urls("https://host/a-{0..1}.tar") == [
        "https://host/a-0.tar",
        "https://host/a-1.tar",
    ]


def test_bad_urls_raise_value_errors_that_say_what_was_expected(tmp_path):
    write_shards(tmp_path, [1, 1])
    with pytest.raises(ValueError, match="is empty; expected a brace pattern"):
        expand_urls([])
    with pytest.raises(ValueError, match="matched no existing shard"):
        expand_urls(f"{tmp_path}/val-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="matched 8 missing shards"):
        expand_urls(f"{tmp_path}/train-{{000000..000009}}.tar")  # a typo in the range
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory .* holds no"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="pipe:aws s3 cp s3://bucket/x.tar -"):
        expand_urls("s3://bucket/x.tar")
    with pytest.raises(ValueError, match="urls"):
        build_pipeline(ShardPipelineConfig(urls=[str(tmp_path / "nope.tar")]), key_only)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"urls": []}, "urls"),
        ({"batch_size": 0}, "batch_size"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
        ({"epoch_length": 0}, "epoch_length"),
        ({"resampled": True}, "epoch_length"),  # resampling never ends: it needs a length
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ShardPipelineConfig.{field}"):
        ShardPipelineConfig(**{"urls": "a.tar", **kwargs})


# ---------------------------------------------------------------------------------------------
# splitting, epoch length, resampling


def test_evaluation_reads_every_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path):
    urls = write_shards(tmp_path, [5, 3, 7, 4, 6, 2, 5, 4])
    config = ShardPipelineConfig(urls=urls, batch_size=3, shuffle_buffer=4, seed=1, training=False)
    seen = []
    for rank in range(2):
        dataset = build_pipeline(config, key_only, rank=rank, world_size=2, collate=key_batch)
        seen.append(keys_of(ShardLoader(dataset, num_workers=2)))
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    counts = Counter(seen[0] + seen[1])
    assert sorted(counts) == sorted(all_keys(urls)) and set(counts.values()) == {1}


def test_epoch_length_gives_every_rank_the_same_batches_on_uneven_shards(tmp_path):
    urls = write_shards(tmp_path, [5, 17, 40])  # 3 shards for 2 ranks x 2 workers
    config = ShardPipelineConfig(urls=urls, batch_size=4, shuffle_buffer=8, epoch_length=7)
    for rank in range(2):
        dataset = build_pipeline(config, key_only, rank=rank, world_size=2, collate=key_batch)
        loader = ShardLoader(dataset, num_workers=2, persistent_workers=True)
        assert len(loader) == 7
        epochs = [[batch["keys"] for batch in loader] for _ in range(2)]
        for batches in epochs:
            assert len(batches) == 7 and all(len(keys) == 4 for keys in batches)
        assert epochs[0] != epochs[1]  # shards and buffer reshuffled for the new epoch


def test_shard_order_is_shared_by_ranks_reshuffled_per_epoch_and_reproducible(tmp_path):
    urls = write_shards(tmp_path, [1] * 8)
    config = ShardPipelineConfig(urls=urls, batch_size=1, shuffle_buffer=0, seed=3)
    pipelines = [
        build_pipeline(config, key_only, rank=r, world_size=2, collate=key_batch) for r in (0, 1)
    ]
    epochs = []
    for epoch in range(2):
        for p in pipelines:
            p.set_epoch(epoch)
        epochs.append([[k for b in p for k in b["keys"]] for p in pipelines])
    for ranks in epochs:  # the ranks split one order: together they hold every shard once
        assert sorted(ranks[0] + ranks[1]) == sorted(all_keys(urls))
    assert epochs[0] != epochs[1]
    pipelines[0].set_epoch(1)
    assert [k for b in pipelines[0] for k in b["keys"]] == epochs[1][0]  # reproducible


def test_resampled_yields_epoch_length_batches(tmp_path):
    urls = write_shards(tmp_path, [3, 4])
    config = ShardPipelineConfig(urls=urls, batch_size=5, resampled=True, epoch_length=6)
    dataset = build_pipeline(config, key_only, rank=1, world_size=2, collate=key_batch)
    batches = [batch["keys"] for batch in ShardLoader(dataset)]
    assert len(batches) == 6 and all(len(keys) == 5 for keys in batches)
    assert len(dataset) == 6


# ---------------------------------------------------------------------------------------------
# corrupt data


def corrupt_shards(folder: Path) -> tuple[list[str], set[str]]:
    """Two shards with 10 good samples, one with random bytes as jpg, one without caption."""
    folder.mkdir()
    bad_image = sample("bad_image", 1)
    bad_image["jpg"] = random.Random(0).randbytes(500)
    shards = [
        [sample(f"a{i}", i) for i in range(5)] + [bad_image],
        [sample("no_caption", 7, caption=None)] + [sample(f"b{i}", i) for i in range(5)],
    ]
    urls = [write_shard(folder / f"s-{i}.tar", records) for i, records in enumerate(shards)]
    return urls, {f"a{i}" for i in range(5)} | {f"b{i}" for i in range(5)}


def test_corrupt_image_and_missing_caption_are_skipped_and_counted_through_workers(tmp_path):
    urls, good = corrupt_shards(tmp_path / "shards")
    config = ShardPipelineConfig(urls=urls, batch_size=4, shuffle_buffer=0)
    loader = ShardLoader(build_pipeline(config, needs_caption, collate=key_batch), num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)
    assert sum(sum(b["skipped"].values()) for b in batches) == 2  # carried by the batches
    assert loader.skip_counter.take() == {"undecodable image": 1, "missing caption": 1}
    assert loader.skip_counter.total == 0


def test_skipped_samples_are_logged_with_shard_and_key(tmp_path, caplog):
    urls, _ = corrupt_shards(tmp_path / "shards")
    config = ShardPipelineConfig(urls=urls, batch_size=4, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="multimodal.data.pipeline"):
        list(ShardLoader(build_pipeline(config, needs_caption, collate=key_batch)))
    text = caplog.text
    assert "'bad_image'" in text and urls[0] in text and "undecodable image" in text
    assert "'no_caption'" in text and urls[1] in text and "missing caption" in text


def test_truncated_tar_does_not_crash(tmp_path):
    good = write_shards(tmp_path / "good", [6])
    cut = write_shards(tmp_path / "cut", [10], prefix="cut")[0]
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) // 2])
    config = ShardPipelineConfig(urls=[cut, *good], batch_size=4, shuffle_buffer=0)
    loader = ShardLoader(build_pipeline(config, needs_caption, collate=key_batch))
    keys = keys_of(loader)
    cut_keys = [k for k in keys if k.startswith("cut")]
    assert sorted(k for k in keys if not k.startswith("cut")) == sorted(all_keys(good))
    assert 0 < len(cut_keys) < 10  # the complete samples before the cut
    assert cut_keys == sorted(cut_keys)


class _SetsFlagWhenUnpickled:
    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def test_pickles_in_samples_are_never_loaded(tmp_path):
    flag = tmp_path / "unpickled"
    payload = pickle.dumps(_SetsFlagWhenUnpickled(flag))
    pickle.loads(payload)  # the payload works: unpickling it creates the flag
    assert flag.exists()
    flag.unlink()
    records = [sample(f"k{i}", i) for i in range(3)]
    for record in records:
        record["pyd"] = record["pickle"] = payload
    urls = [write_shard(tmp_path / "p.tar", records)]
    config = ShardPipelineConfig(urls=urls, batch_size=2, shuffle_buffer=0)
    assert sorted(keys_of(ShardLoader(build_pipeline(config, key_only, collate=key_batch)))) == [
        "k0",
        "k1",
        "k2",
    ]
    decoded = decode_sample({"__key__": "x", "pyd": payload, "txt": b"hi", "cls": b"3"})
    assert decoded == {"__key__": "x", "__url__": None, "txt": "hi", "cls": 3}
    assert not flag.exists()


# ---------------------------------------------------------------------------------------------
# datamodules


@pytest.fixture(scope="module")
def clip_tokenizer():
    return load_tokenizer("clip")


def test_image_text_datamodule_batches(tmp_path, clip_tokenizer):
    train = write_shards(tmp_path / "train", [6, 6])
    val = write_shards(tmp_path / "val", [3], prefix="val")
    records = [sample("c0", 0, meta={"captions": ["a red square"]}), sample("c1", 1)]
    records[1]["json"] = b'{"captions": ["x"]}'  # no label
    del records[1]["cls"]
    extra = write_shard(tmp_path / "captions.tar", records)
    dm = ImageTextDataModule(
        [*train, extra], val, context_length=16, transform=SMALL, batch_size=4, num_workers=0
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["keys"]) for b in batches] == [4, 4, 4, 2]  # 14 samples: one pass
    batch = batches[0]
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (4, 16) and batch["attention_mask"].dtype == torch.bool
    assert batch["labels"].shape == (4,) and batch["labels"].dtype == torch.long
    assert batch["skipped"] == {}
    ids = batch["input_ids"][batch["attention_mask"]]
    assert ids[0] == clip_tokenizer.bos_id and (ids == clip_tokenizer.eos_id).sum() == 4
    by_key = {k: i for b in batches for i, k in enumerate(b["keys"])}
    assert len(by_key) == 14

    val_batches = list(dm.val_dataloader())  # in order, partial batch kept
    assert [b["keys"] for b in val_batches] == [["val00_00000", "val00_00001", "val00_00002"]]
    assert val_batches[0]["labels"].tolist() == [0, 1, 2]

    # a caption drawn from json captions in training, the txt at validation; -1 without label
    mapped = dm.map_sample("train")(
        decode_sample(next(wds.tarfile_samples(iter([{"url": extra}]))))
    )
    assert clip_tokenizer.decode(mapped["input_ids"]) == "a red square"
    check = ImageTextDataModule(extra, extra, transform=SMALL, batch_size=2, num_workers=0)
    (val_batch,) = list(check.val_dataloader())
    assert val_batch["labels"].tolist() == [0, -1]
    assert clip_tokenizer.decode(val_batch["input_ids"][0]) == "a photo 0"


def test_shard_name_is_the_file_name_wherever_the_shard_is():
    for url in (
        "/data/train/a-000.tar",
        "a-000.tar",
        "s3://bucket/x/a-000.tar",
        "https://host/x/a-000.tar",
        "pipe:curl -s -L https://host/x/a-000.tar",
    ):
        assert shard_name(url) == "a-000.tar", url
    assert shard_name(None) is None


def test_the_same_shards_in_another_folder_give_the_same_augmented_batches(tmp_path):
    """Augmentations and the caption drawn per sample are seeded by the shard's file name and
    the key, not its path: `make demo` in another checkout (or a test's tmp_path) trains on
    the same batches, and a job that resumes with its shards staged elsewhere (a node's local
    disk) goes on exactly. A different seed must change them, so the equality is not vacuous."""
    records = [
        sample(f"s{n:03d}", n, meta={"captions": [f"first {n}", f"second {n}", f"third {n}"]})
        for n in range(12)
    ]
    here = tmp_path / "here"
    here.mkdir()
    write_shard(here / "train-000000.tar", records[:7])
    write_shard(here / "train-000001.tar", records[7:])
    there = shutil.copytree(here, tmp_path / "a" / "copy" / "elsewhere")
    augment = ImageTransformConfig(image_size=32, train_scale=(0.3, 1.0), hflip=0.5)

    def loader(folder: Path, seed: int = 0):
        dm = ImageTextDataModule(
            str(folder), str(folder), context_length=8, transform=augment, batch_size=4,
            num_workers=0, seed=seed,
        )  # fmt: skip
        dm.setup("fit")
        return dm.train_dataloader()

    def same(a: list[dict], b: list[dict]) -> bool:
        return all(
            x["keys"] == y["keys"]
            and torch.equal(x["images"], y["images"])
            and torch.equal(x["input_ids"], y["input_ids"])
            for x, y in zip(a, b, strict=True)
        )

    reference = list(loader(here))
    assert len(reference) == 3
    assert same(reference, list(loader(there)))
    assert not same(reference, list(loader(here, seed=1)))

    interrupted = loader(here)
    next(iter(interrupted))
    resumed = loader(there)
    resumed.load_state_dict(interrupted.state_dict())
    assert same(reference[1:], list(resumed))


def vqa_shard(folder: Path) -> str:
    folder.mkdir()
    answers = ["yes"] * 2 + ["no"] * 8
    records = [
        sample("q0", 0, meta={"vqa": [{"question": "Is it red?", "answers": answers}]}),
        sample(
            "q1",
            1,
            meta={
                "vqa": [
                    {"question": "What color?", "answers": ["Red", "red ", "blue", "red", "green"]},
                    {"question": "How many?", "answers": ["2", "two", "3"]},
                ]
            },
        ),
        sample("q2", 2),  # no vqa: skipped
    ]
    return write_shard(folder / "vqa-000000.tar", records)


def test_vqa_datamodule_one_item_per_question_and_soft_scores(tmp_path):
    url = vqa_shard(tmp_path / "vqa")
    dm = VQADataModule(url, url, context_length=12, transform=SMALL, batch_size=8, num_workers=0)
    dm.setup("fit")
    # ranked by the number of questions answered, ties alphabetically
    assert dm.answer_vocab == ["2", "3", "blue", "green", "no", "red", "yes"]  # "two" counts as "2"
    (batch,) = list(dm.val_dataloader())
    assert batch["images"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape == (3, 12) and batch["attention_mask"].dtype == torch.bool
    assert batch["keys"] == ["q0/0", "q1/0", "q1/1"]
    assert batch["answers"][2] == ["2", "two", "3"]
    scores = batch["answer_scores"]
    assert scores.shape == (3, 7)
    vocab = {a: i for i, a in enumerate(dm.answer_vocab)}
    expected = torch.zeros(3, 7)
    expected[0, vocab["yes"]], expected[0, vocab["no"]] = 2 / 3, 1.0  # min(count / 3, 1)
    expected[1, vocab["red"]], expected[1, vocab["blue"]], expected[1, vocab["green"]] = (
        1,
        1 / 3,
        1 / 3,
    )
    expected[2, vocab["2"]], expected[2, vocab["3"]] = 2 / 3, 1 / 3  # "2" and "two"
    torch.testing.assert_close(scores, expected)
    assert batch["answer_ids"].tolist() == [vocab["no"], vocab["red"], vocab["2"]]
    assert batch["skipped"] == {"missing vqa": 1}

    fixed = VQADataModule(url, answer_vocab=["Red", "no"], transform=SMALL, num_workers=0)
    item = fixed.map_sample("val")(decode_sample(next(wds.tarfile_samples(iter([{"url": url}])))))
    assert item[0]["answer_id"] == 1 and item[0]["scores"] == {1: 1.0}


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")
def test_classification_datamodule_trains_an_image_classifier(tmp_path):
    train = write_shards(tmp_path / "train", [10, 10])
    val = write_shards(tmp_path / "val", [5], prefix="val")
    records = [sample("nolabel", 3)]
    del records[0]["cls"]
    records[0]["json"] = b"{}"
    unlabelled = write_shard(tmp_path / "unlabelled.tar", records)
    transform = ImageTransformConfig(image_size=16, hflip=0.0)
    dm = ShardClassificationDataModule(
        [*train, unlabelled],
        val,
        num_classes=3,
        transform=transform,
        batch_size=4,
        num_workers=1,
        epoch_length=3,
    )
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,) and labels.dtype == torch.long
    assert set(labels.tolist()) <= {0, 1, 2}

    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, pool="avg"))
    task = ImageClassifier(vit, num_classes=3)
    run = quiet_trainer(max_epochs=1, callbacks=[SkippedSamplesLogger()])
    run.fit(task, datamodule=dm)
    assert run.global_step == 3
    assert "val/acc1" in run.callback_metrics
    assert "data/skipped" in run.callback_metrics and "data/val_skipped" in run.callback_metrics
    assert run.callback_metrics["data/val_skipped"] == 0


def test_datamodules_validate_their_arguments(tmp_path):
    url = write_shards(tmp_path, [1])[0]
    with pytest.raises(ValueError, match="train_urls"):
        ImageTextDataModule([])
    with pytest.raises(ValueError, match="context_length"):
        ImageTextDataModule(url, context_length=1)
    with pytest.raises(ValueError, match="ShardPipelineConfig.epoch_length"):
        ImageTextDataModule(url, resampled=True)
    with pytest.raises(ValueError, match="answer_vocab"):
        VQADataModule(url, answer_vocab=["yes", "Yes"])
    with pytest.raises(ValueError, match="tokenizer='nope'"):
        _ = ImageTextDataModule(url, tokenizer="nope").tokenizer
    with pytest.raises(ValueError, match="matched no existing shard"):
        ShardClassificationDataModule(os.path.join(tmp_path, "x-{0..3}.tar")).setup("fit")


def test_ddp_epochs_are_sized_from_the_writer_manifest_or_the_tar_headers(tmp_path):
    from multimodal.data.pipeline import manifest_samples
    from multimodal.data.shards import ShardWriter

    with ShardWriter(tmp_path, "train", max_samples=5) as writer:  # shards of 5,5,5,5,3
        for n in range(23):
            record = sample(f"s{n:03d}", n)
            writer.write({k: v for k, v in record.items() if k != "cls"})
    urls = [str(p) for p in writer.summary.shards]
    assert manifest_samples(urls) == 23
    config = ShardPipelineConfig(urls=urls, batch_size=2, shuffle_buffer=0)
    for manifest in (True, False):
        if not manifest:  # counted from the tar headers instead
            (tmp_path / "train.manifest.json").unlink()
            assert manifest_samples(urls) == 23
        one = build_pipeline(config, key_only, rank=0, world_size=1, collate=key_batch)
        assert len(one) == 12  # one rank: one pass, the last batch partial
        ranks = [
            build_pipeline(config, key_only, rank=r, world_size=2, collate=key_batch)
            for r in (0, 1)
        ]
        batches = [[b["keys"] for b in ShardLoader(p)] for p in ranks]
        # 12 + 11 samples: 6 full batches each, rank 1 padded with one sample of rank 0
        assert [len(b) for b in batches] == [6, 6] == [len(p) for p in ranks]
        assert all(len(keys) == 2 for rank in batches for keys in rank)
        seen = Counter(k for rank in batches for keys in rank for k in keys)
        assert sorted(seen) == sorted(all_keys(urls)) and sum(seen.values()) == 24
    with pytest.raises(ValueError, match="epoch_length"):  # remote shards of unknown size
        build_pipeline(
            ShardPipelineConfig(urls=[f"pipe:cat {u}" for u in urls], batch_size=2),
            key_only,
            rank=0,
            world_size=2,
        )
