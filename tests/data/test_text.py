"""Text datamodules: synthetic copy/reverse layouts, text files (causal, masked, next sentence),
tab-separated pairs (seq2seq, classification) and their errors."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from multimodal.data import (
    SyntheticSequenceDataModule,
    TextCollator,
    TextFileDataModule,
    TextPairFileDataModule,
    pad_sequences,
)
from multimodal.data.text import BOS, EOS, PAD, SEP, SYMBOL_OFFSET
from text.tokenizer import load_tokenizer, train_tokenizer

CAUSAL_KEYS = {"input_ids", "attention_mask", "labels"}
SEQ2SEQ_KEYS = {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
SEQ2SEQ_KEYS |= {"labels"}

# --------------------------------------------------------------------------------------------
# shared padding


def test_pad_sequences_and_collator():
    ids, mask = pad_sequences([[5, 6, 7], [8], []], pad_value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    batch = TextCollator(pad_id=9)(
        [{"input_ids": [1, 2], "labels": 3}, {"input_ids": [4], "labels": 0}]
    )
    assert batch["input_ids"].tolist() == [[1, 2], [4, 9]]
    assert batch["attention_mask"].tolist() == [[True, True], [True, False]]
    assert batch["labels"].tolist() == [3, 0]


# --------------------------------------------------------------------------------------------
# synthetic sequences


def _synthetic(**kwargs) -> SyntheticSequenceDataModule:
    dm = SyntheticSequenceDataModule(**{"n_train": 256, "n_val": 64, "batch_size": 32, **kwargs})
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("task", ["reverse", "copy"])
def test_synthetic_causal_layout(task):
    dm = _synthetic(task=task, objective="causal", n_symbols=10, min_length=3, max_length=7)
    assert dm.vocab_size == SYMBOL_OFFSET + 10 == 15
    assert (dm.pad_id, dm.bos_id, dm.eos_id, dm.sep_id) == (PAD, BOS, EOS, SEP)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == CAUSAL_KEYS and batch["input_ids"].shape[0] == 32
    assert batch["attention_mask"].dtype == torch.bool and batch["labels"].dtype == torch.long
    rows = zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)
    for ids, mask, labels in rows:
        n = int(mask.sum())
        assert not mask[n:].any() and (ids[n:] == PAD).all() and (labels[n:] == -100).all()
        seq = ids[:n].tolist()
        sep = seq.index(SEP)
        x, fx = seq[1:sep], seq[sep + 1 : -1]
        assert seq[0] == BOS and seq[-1] == EOS and 3 <= len(x) <= 7
        assert all(SYMBOL_OFFSET <= s < dm.vocab_size for s in x)
        assert fx == (x[::-1] if task == "reverse" else x)
        # labels aligned with the inputs: -100 on [BOS] x [SEP], the token itself on f(x) [EOS]
        assert (labels[: sep + 1] == -100).all()
        assert labels[sep + 1 : n].tolist() == seq[sep + 1 :] == [*fx, EOS]
    # shift convention: the logits at position t are scored against labels[t + 1]
    shifted = batch["labels"][:, 1:]
    scored = shifted != -100
    assert torch.equal(shifted[scored], batch["input_ids"][:, 1:][scored])
    assert (batch["input_ids"][:, :-1][scored] != PAD).all()


def test_synthetic_seq2seq_teacher_forcing():
    dm = _synthetic(objective="seq2seq")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == SEQ2SEQ_KEYS
    assert dm.decoder_start_id == BOS
    dec, dec_mask, labels = (
        batch["decoder_input_ids"],
        batch["decoder_attention_mask"],
        batch["labels"],
    )
    assert torch.equal(dec_mask, labels != -100)
    assert (dec[:, 0] == BOS).all()
    # decoder_input_ids = [BOS] + labels[:-1] wherever not padding
    assert torch.equal(dec[:, 1:][dec_mask[:, 1:]], labels[:, :-1][dec_mask[:, 1:]])
    for src, src_mask, tgt, tgt_mask in zip(
        batch["input_ids"], batch["attention_mask"], labels, dec_mask, strict=True
    ):
        x = src[src_mask].tolist()
        y = tgt[tgt_mask].tolist()
        assert x[-1] == EOS and y[-1] == EOS and y[:-1] == x[:-1][::-1]
        assert (src[~src_mask] == PAD).all() and (tgt[~tgt_mask] == -100).all()


def test_synthetic_is_deterministic_from_the_seed():
    a, b, c = _synthetic(seed=3), _synthetic(seed=3), _synthetic(seed=4)
    for split in ("train", "val"):
        assert a.datasets[split].examples == b.datasets[split].examples
        assert a.datasets[split].examples != c.datasets[split].examples
    assert a.datasets["train"].examples[:64] != a.datasets["val"].examples  # other stream
    assert len(a.datasets["train"]) == 256 and len(a.datasets["val"]) == 64


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"task": "sort"}, "task"),
        ({"objective": "masked"}, "objective"),
        ({"min_length": 5, "max_length": 4}, "max_length"),
        ({"n_symbols": 0}, "n_symbols"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_synthetic_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticSequenceDataModule(**kwargs)


# --------------------------------------------------------------------------------------------
# text files

WORDS = [
    *("the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "over", "under", "near", "big"),
    *("small", "red", "green", "blue", "quickly", "slowly", "house", "tree", "river", "stone"),
    *("light", "night", "morning", "garden", "window"),
]


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = {" ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + "." for _ in range(n)}
    return sorted(lines, key=lambda _: rng.random())  # unique lines, random order


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    paths = {}
    for name, (n, seed) in {"a": (150, 0), "b": (100, 1), "val": (40, 2)}.items():
        paths[name] = root / f"{name}.txt"
        paths[name].write_text("\n".join(_sentences(n, seed)) + "\n\n", encoding="utf-8")
    files = [paths["a"], paths["b"]]
    for kind in ("wordpiece", "bpe"):
        paths[kind] = root / kind
        train_tokenizer(files, kind=kind, vocab_size=300).save(paths[kind])
    return paths


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]


def test_text_file_causal_blocks(corpus):
    dm = TextFileDataModule(
        [str(corpus["a"]), str(corpus["b"])],
        val_files=[str(corpus["val"])],
        tokenizer=str(corpus["bpe"]),
        objective="causal",
        max_length=32,
        batch_size=8,
    )
    dm.setup("fit")
    tok = load_tokenizer(str(corpus["bpe"]))
    assert dm.vocab_size == tok.vocab_size and dm.pad_id == tok.pad_id
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == CAUSAL_KEYS
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    assert batch["attention_mask"].all() and torch.equal(batch["labels"], batch["input_ids"])
    # the blocks are the token stream of the lines with EOS after each, cut every 32 tokens
    for split, files in {"train": ["a", "b"], "val": ["val"]}.items():
        stream = []
        for line in [line for f in files for line in _lines(corpus[f])]:
            stream += [*tok.encode(line, add_special_tokens=False), tok.eos_id]
        blocks = [e["input_ids"] for e in dm.datasets[split].examples]
        assert all(len(b) == 32 for b in blocks[:-1]) and 1 < len(blocks[-1]) <= 32
        assert [i for b in blocks for i in b] == stream[: sum(map(len, blocks))]
        assert len(stream) - sum(map(len, blocks)) <= 1  # at most a 1-token tail dropped


def test_text_file_holds_out_lines_deterministically(corpus):
    def held_out(seed: int) -> list[list[int]]:
        dm = TextFileDataModule(
            [str(corpus["a"])],
            tokenizer=str(corpus["wordpiece"]),
            objective="masked",
            val_fraction=0.1,
            seed=seed,
        )
        dm.setup()
        assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 150
        return [e["input_ids"] for e in dm.datasets["val"].examples]

    val = held_out(0)
    assert len(val) == 15 and val == held_out(0) and val != held_out(1)


def test_text_file_masked(corpus):
    dm = TextFileDataModule(
        [str(corpus["a"]), str(corpus["b"])],
        val_files=[str(corpus["val"])],
        tokenizer=str(corpus["wordpiece"]),
        objective="masked",
        max_length=12,
        batch_size=64,
        mlm_probability=0.3,
    )
    dm.setup("fit")
    tok = dm.tokenizer
    examples = dm.datasets["train"].examples[:64]
    collate = dm.collator()
    batch = collate(examples)
    assert set(batch) == CAUSAL_KEYS
    original, _ = pad_sequences([e["input_ids"] for e in examples], tok.pad_id)
    assert original.shape[1] <= 12 and batch["input_ids"].shape == original.shape
    labels, mask = batch["labels"], batch["attention_mask"]
    selected = labels != -100
    assert 0.15 < selected.sum() / (mask.sum() - 2 * 64) < 0.45  # about 30% of the words
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(batch["input_ids"][~selected], original[~selected])
    assert (batch["input_ids"][selected] == tok.mask_id).any()
    special = torch.isin(original, torch.tensor([tok.cls_id, tok.sep_id])) | ~mask
    assert not (selected & special).any()
    assert not torch.equal(collate(examples)["labels"], labels)  # fresh masking at each call
    assert (original[:, 0] == tok.cls_id).all()


def test_text_file_next_sentence(corpus):
    dm = TextFileDataModule(
        [str(corpus["a"]), str(corpus["b"])],
        tokenizer=str(corpus["wordpiece"]),
        objective="masked",
        next_sentence=True,
        max_length=40,
        batch_size=32,
    )
    dm.setup("fit")
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == CAUSAL_KEYS | {"segment_ids", "next_sentence_label"}
    assert batch["segment_ids"].shape == batch["input_ids"].shape
    assert batch["next_sentence_label"].shape == (32,)
    for segments, mask in zip(batch["segment_ids"], batch["attention_mask"], strict=True):
        n = int(mask.sum())
        first = int((segments[:n] == 1).nonzero()[0])  # first token of the second segment
        assert (segments[:first] == 0).all() and (segments[first:n] == 1).all()
        assert (segments[n:] == 0).all()
    # pairs: label 1 exactly for a line and the one after it in the same file
    consecutive = set()
    for path in ("a", "b"):
        lines = _lines(corpus[path])
        pairs = zip(lines[:-1], lines[1:], strict=True)
        consecutive |= {tuple(tok.encode_pair(x, y, max_length=40)[0]) for x, y in pairs}
    examples = dm.datasets["train"].examples + dm.datasets["val"].examples
    labels = [e["next_sentence_label"] for e in examples]
    assert 0.35 < sum(labels) / len(labels) < 0.65
    for e in examples:
        ids, segments = e["input_ids"], e["segment_ids"]
        sep = ids.index(tok.sep_id)
        assert segments == [0] * (sep + 1) + [1] * (len(ids) - sep - 1) and ids[-1] == tok.sep_id
        assert (tuple(ids) in consecutive) == (e["next_sentence_label"] == 1)
    # 248 lines, pairs need a successor in the same file and split
    assert 200 < len(examples) < 248


def test_text_file_errors(corpus, tmp_path, caplog):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextFileDataModule([str(missing)], tokenizer=str(corpus["bpe"])).setup()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        TextFileDataModule([str(corpus["a"]), str(empty)], tokenizer=str(corpus["bpe"])).setup()
    with pytest.raises(ValueError, match="next_sentence"):
        TextFileDataModule([str(corpus["a"])], next_sentence=True)
    with pytest.raises(ValueError, match="objective"):
        TextFileDataModule([str(corpus["a"])], objective="seq2seq")
    with pytest.raises(ValueError, match="val_fraction"):
        TextFileDataModule([str(corpus["a"])], val_fraction=1.0)
    with pytest.raises(ValueError, match="mask"):  # byte-level BPE here has <mask>, CLIP not
        TextFileDataModule([str(corpus["a"])], tokenizer="clip", objective="masked").setup()
    # undecodable bytes are replaced and counted, never fatal
    broken = tmp_path / "broken.txt"
    broken.write_bytes("caf\u00e9 and tea\n".encode() + b"bad \xff\xfe bytes\n")
    with caplog.at_level(logging.WARNING, logger="multimodal.data.text"):
        dm = TextFileDataModule(
            [str(broken)], val_files=[str(broken)], tokenizer=str(corpus["bpe"]), max_length=8
        )
        dm.setup()
    assert "2 invalid UTF-8 sequences" in caplog.text and "broken.txt" in caplog.text
    assert len(dm.datasets["train"]) > 0


# --------------------------------------------------------------------------------------------
# tab-separated pairs


def test_pair_file_seq2seq_skips_malformed_lines(corpus, tmp_path, caplog):
    rows = [f"{s}\t{s.upper()}" for s in _sentences(30, 3)]
    rows.insert(4, "only one field")  # line 5
    rows.insert(10, "one\ttwo\tthree")  # line 11
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="multimodal.data.text"):
        dm = TextPairFileDataModule(
            str(path),
            None,
            str(corpus["bpe"]),
            "seq2seq",
            max_source_length=16,
            max_target_length=10,
            batch_size=4,
            val_fraction=0.2,
        )
        dm.setup("fit")
    assert [(s.line, Path(s.path).name) for s in dm.skipped_lines] == [
        (5, "pairs.tsv"),
        (11, "pairs.tsv"),
    ]
    assert "pairs.tsv: skipped 2 malformed lines" in caplog.text and "line 11" in caplog.text
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 6
    tok = dm.tokenizer
    assert dm.decoder_start_id == tok.bos_id and dm.num_classes is None
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == SEQ2SEQ_KEYS
    assert batch["input_ids"].shape[1] <= 16 and batch["labels"].shape[1] <= 10
    dec, labels, dec_mask = (
        batch["decoder_input_ids"],
        batch["labels"],
        batch["decoder_attention_mask"],
    )
    assert (dec[:, 0] == tok.bos_id).all()
    assert torch.equal(dec[:, 1:][dec_mask[:, 1:]], labels[:, :-1][dec_mask[:, 1:]])
    lengths = dec_mask.sum(1)
    assert (labels[torch.arange(4), lengths - 1] == tok.eos_id).all()
    assert (labels[~dec_mask] == -100).all()


def test_pair_file_classification(corpus, tmp_path, caplog):
    path = tmp_path / "labelled.tsv"
    texts = _sentences(40, 4)
    rows = [f"{'pos' if i % 3 else 'neg'}\t{text}" for i, text in enumerate(texts)]
    rows[7] = "maybe\tnot a known label"  # line 8
    path.write_text("\n".join(rows) + "\n")
    common = {"tokenizer": str(corpus["wordpiece"]), "objective": "classification", "batch_size": 8}
    dm = TextPairFileDataModule(str(path), str(path), **common)
    assert dm.label_names == ["maybe", "neg", "pos"] and dm.num_classes == 3  # sorted, before setup
    with caplog.at_level(logging.WARNING, logger="multimodal.data.text"):
        dm = TextPairFileDataModule(str(path), None, labels=["pos", "neg"], **common)
        dm.setup()
    assert [s.line for s in dm.skipped_lines] == [8] and "unknown label 'maybe'" in caplog.text
    assert dm.num_classes == 2 and dm.label_names == ["pos", "neg"]
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 39
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == CAUSAL_KEYS and batch["labels"].shape == (8,)
    # label ids in the order of `labels`: "pos" -> 0, "neg" -> 1
    tok = dm.tokenizer
    expected = {tuple(tok.encode(t)): 0 if i % 3 else 1 for i, t in enumerate(texts) if i != 7}
    examples = dm.datasets["train"].examples + dm.datasets["val"].examples
    assert {tuple(e["input_ids"]): e["labels"] for e in examples} == expected
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tabs here\nnor here\n")
    with pytest.raises(ValueError, match="bad.tsv"):
        TextPairFileDataModule(str(bad), None, **common).setup()
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        TextPairFileDataModule(str(tmp_path / "nothing.tsv"), None, **common).setup()
    with pytest.raises(ValueError, match="labels"):
        TextPairFileDataModule(str(path), None, labels=["a", "a"], **common)
