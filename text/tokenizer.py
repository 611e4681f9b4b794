"""Tokenizers behind one interface: CLIP's BPE (open_clip's `SimpleTokenizer`) and WordPiece or
byte-level BPE trained with Hugging Face `tokenizers`.

Every tokenizer builds a sequence the same way: `[prefix] tokens [suffix]`, where the prefix is
CLS (or BOS where there is no CLS) and the suffix SEP (or EOS). Truncation to `max_length` cuts
the tokens and keeps the final special token, as open_clip's `tokenize` does, so a truncated
CLIP caption still ends with end-of-text.

Saved tokenizers are JSON only (`tokenizer.json` from `tokenizers` and our small
`multimodal_tokenizer.json`); nothing is pickled.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

TOKENIZER_KINDS = ("wordpiece", "bpe")
PADDINGS = ("longest", "max_length")
PAD_SIDES = ("right", "left")
METADATA_FILE = "multimodal_tokenizer.json"
HF_FILE = "tokenizer.json"
FORMAT_VERSION = 1

# role -> token string for each trainable kind; the order is the id order (pad is 0)
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "bpe": {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "mask": "<mask>"},
}


class BatchEncoding(NamedTuple):
    """A padded batch: `input_ids` (B, T) int64 and `attention_mask` (B, T) bool, True = real."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class Tokenizer(ABC):
    """One interface over every tokenizer.

    Subclasses set the special ids (None where the tokenizer has no such token; `pad_id` is
    always set) and implement `_tokenize` (text -> ids without special tokens), `decode`,
    `vocab_size` and `save`; special tokens, truncation and padding live here.
    """

    pad_id: int
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abstractmethod
    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids (a list or a 1-D tensor) -> text."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer to `directory` (created if missing) for `load_tokenizer`."""

    @property
    def _prefix(self) -> list[int]:
        first = self.cls_id if self.cls_id is not None else self.bos_id
        return [] if first is None else [first]

    @property
    def _suffix(self) -> list[int]:
        last = self.sep_id if self.sep_id is not None else self.eos_id
        return [] if last is None else [last]

    def _with_specials(
        self, tokens: list[int], add_special_tokens: bool, max_length: int | None
    ) -> list[int]:
        prefix, suffix = (self._prefix, self._suffix) if add_special_tokens else ([], [])
        if max_length is not None:
            budget = max_length - len(prefix) - len(suffix)
            if budget < 0:
                raise ValueError(
                    f"max_length={max_length} must be >= {len(prefix) + len(suffix)}, the "
                    f"number of special tokens {type(self).__name__} adds"
                )
            tokens = tokens[:budget]
        return prefix + tokens + suffix

    def encode(
        self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[int]:
        """Text -> ids, `[CLS|BOS] tokens [SEP|EOS]` with `add_special_tokens`.

        With `max_length` the sequence is cut to `max_length` ids keeping the final special
        token (EOS, SEP or CLIP's end-of-text stays last), as open_clip does; a `max_length`
        smaller than the number of special tokens raises ValueError.
        """
        return self._with_specials(self._tokenize([text])[0], add_special_tokens, max_length)

    def encode_pair(
        self, first: str, second: str, *, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """A BERT-style pair `[CLS] first [SEP] second [SEP]` -> (ids, segment ids).

        Segment ids are 0 up to and including the first [SEP], 1 after it. With `max_length`
        the texts are cut at their ends as Hugging Face's "longest_first" does: the longer one
        first; if both must be cut, each keeps half of the room (the longer one, or the second
        on a tie, gets the odd token). [CLS] and both [SEP] stay.
        """
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(
                f"encode_pair needs [CLS] and [SEP] tokens, which {type(self).__name__} does "
                "not have; use a 'wordpiece' tokenizer"
            )
        a, b = self._tokenize([first, second])
        if max_length is not None:
            if max_length < 3:
                raise ValueError(f"max_length={max_length} must be >= 3 for [CLS] a [SEP] b [SEP]")
            a, b = _truncate_pair(a, b, max_length - 3)
        ids = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
        return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding: str = "longest",
        pad_side: str = "right",
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Texts -> padded (B, T) ids and mask; each row truncated as in `encode`.

        `padding`: "longest" pads to the longest row, "max_length" to `max_length` (required).
        `pad_side`: "right", or "left" for decoder-only generation. The mask comes from the
        lengths, not from comparing ids with `pad_id` (CLIP's pad 0 is also the id of "!").
        """
        if padding not in PADDINGS:
            raise ValueError(f"padding={padding!r} must be one of {list(PADDINGS)}")
        if pad_side not in PAD_SIDES:
            raise ValueError(f"pad_side={pad_side!r} must be one of {list(PAD_SIDES)}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length=<int>")
        if isinstance(texts, str):
            raise TypeError("batch_encode takes a sequence of texts; got one str, wrap it in [ ]")
        rows = [
            self._with_specials(tokens, add_special_tokens, max_length)
            for tokens in self._tokenize(list(texts))
        ]
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if pad_side == "right" else slice(width - len(row), width)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = True
        return BatchEncoding(input_ids, attention_mask)


def _truncate_pair(a: list[int], b: list[int], room: int) -> tuple[list[int], list[int]]:
    """Hugging Face's "longest_first" truncation of a pair to `room` ids in all."""
    if len(a) + len(b) <= room:
        return a, b
    short = min(len(a), len(b))
    keep_short, keep_long = (
        (short, room - short) if 2 * short <= room else (room // 2, room - room // 2)
    )
    keep_a, keep_b = (keep_short, keep_long) if len(a) <= len(b) else (keep_long, keep_short)
    return a[:keep_a], b[:keep_b]


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode takes one sequence of ids; got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _write_metadata(directory: str | os.PathLike, kind: str) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {"format_version": FORMAT_VERSION, "kind": kind}
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return path


class ClipTokenizer(Tokenizer):
    """OpenAI CLIP's byte-pair encoding through open_clip's `SimpleTokenizer` (49,408 ids).

    Text is cleaned like open_clip (ftfy, HTML unescape, whitespace collapsed, lower-cased).
    bos = `<start_of_text>`, eos = `<end_of_text>`, pad = 0 as open_clip pads with 0, so
    `batch_encode(texts, max_length=77, padding="max_length").input_ids` equals
    `open_clip.tokenize(texts)`.
    """

    def __init__(self) -> None:
        # imported here: open_clip pulls in timm and builds its own tokenizer at import
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe: SimpleTokenizer = SimpleTokenizer()
        self.pad_id = 0
        self.bos_id = self._bpe.sot_token_id
        self.eos_id = self._bpe.eot_token_id

    @property
    def vocab_size(self) -> int:
        return self._bpe.vocab_size

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._bpe.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids -> lower-cased text; ids after the first end-of-text are padding and dropped.

        CLIP's vocabulary marks word ends, not spaces, so punctuation comes back separated
        ("a cat ." for "A cat.").
        """
        ids = _as_list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id) + 1]
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        return self._bpe.decode(ids).strip()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes only `multimodal_tokenizer.json`: the vocabulary ships with open_clip."""
        _write_metadata(directory, "clip")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` of one of `TOKENIZER_KINDS`.

    "wordpiece" is BERT-like: `[PAD] [UNK] [CLS] [SEP] [MASK]`, sequences `[CLS] ... [SEP]`,
    cased or uncased (uncased also strips accents, like BERT uncased). "bpe" is GPT-2-like
    byte-level BPE: `<pad> <unk> <s> </s> <mask>`, sequences `<s> ... </s>`, and any text
    (unicode, emoji, whitespace) decodes back exactly unless it was lower-cased.
    Build one with `train_tokenizer` or `load_tokenizer`.
    """

    def __init__(self, backend: HFBackend, kind: str) -> None:
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"kind={kind!r} must be one of {list(TOKENIZER_KINDS)}")
        self.backend = backend
        self.kind = kind
        for role, token in SPECIAL_TOKENS[kind].items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"a {kind!r} tokenizer needs the {role} token {token!r}")
            setattr(self, f"{role}_id", token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids -> text; `skip_special_tokens` leaves out every special token, pad and unk too."""
        return self.backend.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `tokenizer.json` (loadable by `tokenizers` alone) and our metadata."""
        path = _write_metadata(directory, self.kind)
        self.backend.save(str(path / HF_FILE))

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, kind: str) -> HFTokenizer:
        return cls(HFBackend.from_file(str(Path(directory) / HF_FILE)), kind)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """`"clip"` -> `ClipTokenizer`; a directory written by `Tokenizer.save` -> that tokenizer."""
    if name_or_path == "clip":
        return ClipTokenizer()
    metadata_path = Path(name_or_path) / METADATA_FILE
    if not metadata_path.is_file():
        raise ValueError(
            f"tokenizer {name_or_path!r} is neither a name nor a saved tokenizer; expected "
            f"'clip' or a directory written by Tokenizer.save (holding {METADATA_FILE})"
        )
    kind = json.loads(metadata_path.read_text()).get("kind")
    if kind == "clip":
        return ClipTokenizer()
    if kind in TOKENIZER_KINDS:
        return HFTokenizer.from_directory(name_or_path, kind)
    raise ValueError(
        f"{metadata_path} names kind={kind!r}; expected one of {['clip', *TOKENIZER_KINDS]}"
    )


def _untrained(
    kind: str, lowercase: bool, vocab_size: int, min_frequency: int
) -> tuple[HFBackend, trainers.Trainer]:
    """An empty backend of `kind` with its normaliser, pre-tokenizer, decoder and trainer."""
    common = {
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "special_tokens": list(SPECIAL_TOKENS[kind].values()),
        "show_progress": False,
    }
    if kind == "wordpiece":
        backend = HFBackend(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(continuing_subword_prefix="##", **common)
        return backend, trainer
    backend = HFBackend(models.BPE(unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    # no prefix space: decode(encode(text)) == text, GPT-2's choice
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
    return backend, trainer


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    *,
    kind: str,
    vocab_size: int,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a WordPiece or byte-level BPE tokenizer on plain UTF-8 text files.

    Args:
        files: text files, one or more sentences a line.
        kind: "wordpiece" (BERT-like) or "bpe" (byte-level, GPT-like); see `HFTokenizer`.
        vocab_size: the target number of ids, special tokens included. Byte-level BPE needs
            at least 256 + 5 (its byte alphabet and special tokens); a WordPiece vocabulary
            grows past the target if the corpus has more distinct characters.
        lowercase: lower-case the text first (uncased WordPiece also strips accents).
        min_frequency: pairs seen fewer times are not merged.

    BPE training is reproducible; WordPiece training may pick other merges on ties from one
    process to the next (huggingface/tokenizers#1794), so save a tokenizer and load it rather
    than training it again.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {list(TOKENIZER_KINDS)}")
    n_specials = len(SPECIAL_TOKENS[kind])
    smallest = 256 + n_specials if kind == "bpe" else n_specials + 1
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} must be >= {smallest} for kind={kind!r}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    paths = [str(f) for f in ([files] if isinstance(files, str | os.PathLike) else files)]
    if not paths:
        raise ValueError("files is empty; expected one or more text files")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training file {path!r} does not exist")
    backend, trainer = _untrained(kind, lowercase, vocab_size, min_frequency)
    backend.train(paths, trainer)
    names = SPECIAL_TOKENS[kind]
    first, last = names.get("cls", names.get("bos")), names.get("sep", names.get("eos"))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}",
        pair=f"{first} $A {last} $B:1 {last}:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in (first, last)],
    )
    return HFTokenizer(backend, kind)
