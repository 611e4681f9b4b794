"""Tokenizers: CLIP against open_clip, trained WordPiece / byte-level BPE against their
`tokenizers` backends and against round-trip definitions, padding, saving and the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from text.tokenizer import (
    TOKENIZER_KINDS,
    BatchEncoding,
    ClipTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]

WORDS = " ".join(
    (
        "the a an cat dog photo picture of on in under red blue green small large old young",
        "running jumps sits over near lazy quick brown fox street car tree house river",
        "mountain people man woman child playing with ball two three seven hundred is are was",
    )
).split()
UNICODE_LINES = (
    "Café crème brûlée à la française, déjà vu.",
    "Ünïcödé ñandú Straße façade naïve résumé.",
    "日本語のテキストです。中文句子。",
    "Emoji 🎉 🚀 👍🏽 ❤️ in a sentence!",
    "Ελληνικά και русский текст.",
)
CAPTIONS = (
    "A photo of a cat.",
    "Two dogs playing with a red ball in the park!",
    "an old man sits near the river, 1984",
    "",
)


def write_corpus(path: Path, n_lines: int = 400) -> Path:
    """Varied English with digits and punctuation, plus unicode lines; seeded."""
    rng = random.Random(0)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        line = " ".join(words).capitalize() + rng.choice(".!?,;") + f" {rng.randint(0, 2024)}"
        lines.append(line if i % 7 else UNICODE_LINES[i % len(UNICODE_LINES)])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def wordpiece(corpus) -> HFTokenizer:
    return train_tokenizer([corpus], kind="wordpiece", vocab_size=300)


@pytest.fixture(scope="module")
def bpe(corpus) -> HFTokenizer:
    return train_tokenizer([corpus], kind="bpe", vocab_size=400, lowercase=False)


@pytest.fixture(scope="module")
def clip() -> ClipTokenizer:
    return load_tokenizer("clip")


# CLIP


@pytest.mark.parametrize("context_length", [77, 8])
def test_clip_equals_open_clip_tokenize(clip, context_length):
    open_clip = pytest.importorskip("open_clip")
    texts = [*CAPTIONS, "a very long caption " * 20]
    expected = open_clip.tokenize(texts, context_length=context_length)
    batch = clip.batch_encode(texts, max_length=context_length, padding="max_length")
    assert torch.equal(batch.input_ids, expected)
    # open_clip pads with 0 after end-of-text; the mask covers up to and including it
    lengths = (expected == clip.eos_id).int().argmax(dim=1) + 1
    assert torch.equal(batch.attention_mask.sum(dim=1), lengths)
    assert clip.pad_id == 0 and clip.vocab_size == 49408


def test_clip_truncation_keeps_end_of_text_last(clip):
    open_clip = pytest.importorskip("open_clip")
    text = "a photo of " * 50
    ids = clip.encode(text, max_length=77)
    assert len(ids) == 77 and ids[0] == clip.bos_id and ids[-1] == clip.eos_id
    assert ids == open_clip.tokenize([text])[0].tolist()


def test_clip_decode_drops_specials_and_padding(clip):
    ids = clip.batch_encode(["A Photo of a CAT"], max_length=20, padding="max_length").input_ids
    # the pad id 0 is also "!": decoding stops at end-of-text
    assert clip.decode(ids[0]) == "a photo of a cat"
    assert (
        clip.encode("A Photo of a CAT", add_special_tokens=False)
        == clip.encode("a photo of a cat")[1:-1]
    )
    with pytest.raises(ValueError, match="encode_pair"):
        clip.encode_pair("a", "b")


# trained tokenizers: round trips


@pytest.mark.parametrize(
    "text",
    [
        "Plain English, with Capitals and digits 12345.",
        "naïve café — déjà vu, Ünïcödé Straße",
        "日本語のテキスト and 中文",
        "emoji 🎉🚀👍🏽 family 👨‍👩‍👧 never seen in training: 🦜🧬",
        "  leading, doubled  spaces,\ttabs and\nnewlines  ",
        "",
    ],
)
def test_byte_level_bpe_round_trips_exactly(bpe, text):
    # byte-level: every UTF-8 byte has an id, so nothing is unknown and decode inverts encode
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.decode(torch.tensor(bpe.encode(text))) == text


def test_uncased_wordpiece_decodes_to_the_lower_cased_text(wordpiece):
    # the normalizer lower-cases before the vocabulary sees the text, so the ids carry no
    # case and decode can only give the lower-cased text back
    text = "The Quick, brown FOX jumps over 12 lazy Dogs near the River."
    assert wordpiece.decode(wordpiece.encode(text)) == text.lower()


def test_cased_wordpiece_keeps_case(corpus):
    cased = train_tokenizer([corpus], kind="wordpiece", vocab_size=300, lowercase=False)
    text = "The Quick brown Fox."
    assert cased.decode(cased.encode(text)) == text


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_encode_matches_the_backend_with_and_without_truncation(request, kind):
    tokenizer = request.getfixturevalue(kind)
    backend = tokenizer.backend
    text = "Two dogs playing with a red ball in the park near the old river, 1984!"
    assert tokenizer.encode(text) == backend.encode(text).ids
    assert (
        tokenizer.encode(text, add_special_tokens=False)
        == backend.encode(text, add_special_tokens=False).ids
    )
    backend.enable_truncation(max_length=6)
    try:
        expected = backend.encode(text).ids
    finally:
        backend.no_truncation()
    ids = tokenizer.encode(text, max_length=6)
    last = tokenizer.sep_id if kind == "wordpiece" else tokenizer.eos_id
    assert ids == expected and len(ids) == 6 and ids[-1] == last


# special tokens and pairs


def test_special_token_ids(wordpiece, bpe, clip):
    vocab = wordpiece.backend.get_vocab()
    for role, token in {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]"}.items():
        assert getattr(wordpiece, f"{role}_id") == vocab[token]
    assert wordpiece.mask_id == vocab["[MASK]"] and wordpiece.bos_id is None
    vocab = bpe.backend.get_vocab()
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id) == tuple(
        vocab[t] for t in ("<pad>", "<s>", "</s>", "<mask>")
    )
    assert bpe.cls_id is None and bpe.sep_id is None
    ids = wordpiece.encode("a cat")
    assert ids[0] == wordpiece.cls_id and ids[-1] == wordpiece.sep_id
    ids = bpe.encode("a cat")
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    assert clip.cls_id is None and clip.mask_id is None
    assert wordpiece.pad_id == bpe.pad_id == clip.pad_id == 0


def test_encode_pair_segments(wordpiece):
    first, second = "a small cat sits", "the dog"
    ids, segments = wordpiece.encode_pair(first, second)
    a = wordpiece.encode(first, add_special_tokens=False)
    b = wordpiece.encode(second, add_special_tokens=False)
    assert ids == [wordpiece.cls_id, *a, wordpiece.sep_id, *b, wordpiece.sep_id]
    assert segments == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    reference = wordpiece.backend.encode(first, second)
    assert (ids, segments) == (reference.ids, reference.type_ids)


@pytest.mark.parametrize("max_length", [3, 5, 8, 11, 12, 40])
@pytest.mark.parametrize(
    "pair",
    [
        ("an old man sits near the river with two dogs", "a cat"),
        ("a cat", "an old man sits near the river with two dogs"),
        ("the red car on the street", "the blue car on the road"),
    ],
)
def test_encode_pair_truncates_like_longest_first(wordpiece, pair, max_length):
    backend = wordpiece.backend
    backend.enable_truncation(max_length=max_length, strategy="longest_first")
    try:
        reference = backend.encode(*pair)
    finally:
        backend.no_truncation()
    ids, segments = wordpiece.encode_pair(*pair, max_length=max_length)
    assert (ids, segments) == (reference.ids, reference.type_ids)
    assert len(ids) <= max_length and ids[-1] == wordpiece.sep_id


def test_pair_needs_cls_and_sep(bpe, wordpiece):
    with pytest.raises(ValueError, match="wordpiece"):
        bpe.encode_pair("a", "b")
    with pytest.raises(ValueError, match="max_length=2"):
        wordpiece.encode_pair("a", "b", max_length=2)


# batches


def _check_batch(tokenizer: Tokenizer, batch: BatchEncoding, rows: list[list[int]], left: bool):
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.bool
    width = batch.input_ids.shape[1]
    for i, row in enumerate(rows):
        mask = batch.attention_mask[i]
        assert int(mask.sum()) == len(row)
        assert batch.input_ids[i][mask].tolist() == row
        assert (batch.input_ids[i][~mask] == tokenizer.pad_id).all()
        real = torch.arange(width) >= width - len(row) if left else torch.arange(width) < len(row)
        assert torch.equal(mask, real)


@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("name", ["wordpiece", "bpe", "clip"])
def test_batch_encode_pads_to_the_longest(request, name, pad_side):
    tokenizer = request.getfixturevalue(name)
    batch = tokenizer.batch_encode(CAPTIONS, pad_side=pad_side)
    rows = [tokenizer.encode(t) for t in CAPTIONS]
    assert batch.input_ids.shape == (len(CAPTIONS), max(map(len, rows)))
    _check_batch(tokenizer, batch, rows, left=pad_side == "left")


@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("name", ["wordpiece", "bpe", "clip"])
def test_batch_encode_pads_and_truncates_to_max_length(request, name, pad_side):
    tokenizer = request.getfixturevalue(name)
    texts = [*CAPTIONS, "a photo of a very long caption " * 10]
    batch = tokenizer.batch_encode(texts, max_length=9, padding="max_length", pad_side=pad_side)
    assert batch.input_ids.shape == (len(texts), 9)
    rows = [tokenizer.encode(t, max_length=9) for t in texts]
    _check_batch(tokenizer, batch, rows, left=pad_side == "left")
    # the over-long caption is cut to 9 ids that still start and end with the special tokens
    full = tokenizer.encode(texts[-1])
    assert rows[-1] == full[:8] + full[-1:] and len(full) > 9


def test_batch_encode_without_special_tokens_and_longest_with_a_cap(bpe):
    batch = bpe.batch_encode(CAPTIONS, max_length=4, add_special_tokens=False)
    rows = [bpe.encode(t, add_special_tokens=False)[:4] for t in CAPTIONS]
    assert batch.input_ids.shape == (len(CAPTIONS), 4)
    _check_batch(bpe, batch, rows, left=False)


def test_bad_arguments_name_themselves(bpe):
    with pytest.raises(ValueError, match="padding='shortest'"):
        bpe.batch_encode(["a"], padding="shortest")
    with pytest.raises(ValueError, match="pad_side='middle'"):
        bpe.batch_encode(["a"], pad_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        bpe.batch_encode(["a"], padding="max_length")
    with pytest.raises(ValueError, match="max_length=1 must be >= 2"):
        bpe.encode("a cat", max_length=1)
    with pytest.raises(ValueError, match="shape"):
        bpe.decode(torch.zeros(2, 3, dtype=torch.long))


# saving, loading, training arguments


@pytest.mark.parametrize("name", ["wordpiece", "bpe", "clip"])
def test_save_and_load_give_identical_encodings(request, tmp_path, name):
    tokenizer = request.getfixturevalue(name)
    tokenizer.save(tmp_path / name)
    loaded = load_tokenizer(str(tmp_path / name))
    assert type(loaded) is type(tokenizer)
    texts = [*CAPTIONS, *UNICODE_LINES]
    expected = tokenizer.batch_encode(texts, max_length=12)
    actual = loaded.batch_encode(texts, max_length=12)
    assert torch.equal(actual.input_ids, expected.input_ids)
    assert torch.equal(actual.attention_mask, expected.attention_mask)
    if tokenizer.cls_id is not None:
        assert tokenizer.encode_pair("a cat", "a dog") == loaded.encode_pair("a cat", "a dog")
    roles = ("pad_id", "bos_id", "eos_id", "unk_id", "cls_id", "sep_id", "mask_id", "vocab_size")
    assert [getattr(loaded, r) for r in roles] == [getattr(tokenizer, r) for r in roles]
    # JSON only, no pickles
    metadata = json.loads((tmp_path / name / "multimodal_tokenizer.json").read_text())
    assert metadata["kind"] == name
    assert {p.suffix for p in (tmp_path / name).iterdir()} == {".json"}


def test_unknown_names_and_kinds_list_the_choices(tmp_path, corpus):
    with pytest.raises(ValueError, match="'clip'.*Tokenizer.save"):
        load_tokenizer("bert-base-uncased")
    with pytest.raises(ValueError, match="'clip'.*Tokenizer.save"):
        load_tokenizer(str(tmp_path))  # a directory without our metadata
    with pytest.raises(ValueError, match=r"kind='sentencepiece' must be one of \['wordpiece'"):
        train_tokenizer([corpus], kind="sentencepiece", vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 261"):
        train_tokenizer([corpus], kind="bpe", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], kind="bpe", vocab_size=300)


# command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "multimodal", "tokenizer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_trains_and_saves_a_loadable_tokenizer(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "wp"
    result = run_cli(
        "train", "--corpus", str(corpus), "--kind", "wordpiece", "--vocab-size", "200",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(str(out))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.kind == "wordpiece"
    assert str(tokenizer.vocab_size) in result.stdout and str(out) in result.stdout
    # not compared with a second training: WordPiece training breaks ties in hash-map order,
    # which changes between processes (huggingface/tokenizers#1794)
    text = "Two Dogs near the River, 1984."
    assert tokenizer.decode(tokenizer.encode(text)) == text.lower()


def test_cli_help(capsys):
    from multimodal.cli import main  # in process: a second subprocess would cost seconds

    for args in (["tokenizer", "--help"], ["tokenizer", "train", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "multimodal tokenizer" in out and "--vocab-size" in out and "--cased" in out
