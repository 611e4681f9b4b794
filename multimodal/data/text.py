"""Text datamodules: synthetic copy/reverse sequences, plain text files (causal or masked LM)
and tab-separated pair files (seq2seq or classification).

Every datamodule yields dict batches built by one collate function (`TextCollator`):

- causal LM: `input_ids`, `attention_mask`, `labels` (B, T), labels aligned with the inputs
  (the task shifts them: position t predicts labels[t + 1]);
- masked LM: `input_ids`, `attention_mask`, `labels` (B, T), masked afresh in every batch,
  plus `segment_ids` (B, T) and `next_sentence_label` (B,) with next-sentence prediction;
- seq2seq: `input_ids`, `attention_mask`, `decoder_input_ids`, `decoder_attention_mask`,
  `labels` (B, T'), decoder inputs = [decoder_start_id] + target[:-1];
- classification: `input_ids`, `attention_mask` (B, T) and `labels` (B,).

Labels are -100 wherever nothing is predicted (padding, prompts, unmasked tokens). Attention
masks come from the sequence lengths, never from comparing ids with the pad id (CLIP pads
with 0, which is also the id of "!").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from multimodal.data.predict_inputs import rank_loader
from text.masking import IGNORE_INDEX, mask_tokens, span_corruption
from text.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

Example = dict[str, list[int] | int]  # one sample: id lists (padded in the batch) or ints

# the fixed vocabulary of SyntheticSequenceDataModule; symbols are SYMBOL_OFFSET + k
PAD, BOS, EOS, SEP, MASK = 0, 1, 2, 3, 4
SYMBOL_OFFSET = 5

SYNTHETIC_TASKS = ("copy", "reverse")
SYNTHETIC_OBJECTIVES = ("causal", "seq2seq")
FILE_OBJECTIVES = ("causal", "masked", "span_corruption")
PAIR_OBJECTIVES = ("seq2seq", "classification")

# how each padded key is padded (default: the pad id) and which key gets a mask from lengths
PAD_VALUES = {"labels": IGNORE_INDEX, "segment_ids": 0}
MASK_KEYS = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}
ENCODE_CHUNK = 1024  # lines tokenized per batch_encode call


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to the longest: (B, T) int64 ids and (B, T) bool mask, True = real."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (B, T)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = True
    return ids, mask


@dataclass
class TextCollator:
    """Examples (dicts of id lists and ints) -> a dict batch; the one collate of this module.

    Id lists are right-padded (`labels` with -100, `segment_ids` with 0, the rest with
    `pad_id`), `input_ids` and `decoder_input_ids` get their attention masks, ints become
    (B,) tensors. With `mask_id` set, the batch is masked for masked LM with `mask_tokens`
    (fresh at each call), never selecting padding or `special_ids`, and gets its `labels`.
    With `sentinel_ids` set, every example's ids are first span-corrupted (T5) into
    `input_ids` + `end_id` and `decoder_input_ids` / `labels`.
    A dataclass rather than a closure so that DataLoader workers can pickle it.
    """

    pad_id: int
    mask_id: int | None = None
    vocab_size: int = 0
    special_ids: tuple[int, ...] = ()
    mlm_probability: float = 0.15
    sentinel_ids: tuple[int, ...] = ()
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    end_id: int = EOS
    decoder_start_id: int = PAD

    def _corrupt(self, example: Example) -> Example:
        """T5 span corruption of one example's ids into a seq2seq example (fresh each call)."""
        source, target = span_corruption(
            example["input_ids"],
            sentinel_ids=self.sentinel_ids,
            noise_density=self.noise_density,
            mean_span_length=self.mean_span_length,
        )
        target = [*target, self.end_id]
        return {
            "input_ids": [*source, self.end_id],
            "decoder_input_ids": [self.decoder_start_id, *target[:-1]],
            "labels": target,
        }

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        if self.sentinel_ids:
            examples = [self._corrupt(example) for example in examples]
        batch: dict[str, Tensor] = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if isinstance(values[0], str):  # sample keys of predicted prompts
                batch[key] = values
                continue
            if isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
                continue
            batch[key], mask = pad_sequences(values, PAD_VALUES.get(key, self.pad_id))
            if key in MASK_KEYS:
                batch[MASK_KEYS[key]] = mask
        if self.mask_id is not None:
            ids = batch["input_ids"]
            special = ~batch["attention_mask"] | torch.isin(
                ids, torch.tensor(self.special_ids, dtype=torch.long)
            )
            batch["input_ids"], batch["labels"] = mask_tokens(
                ids,
                mask_id=self.mask_id,
                vocab_size=self.vocab_size,
                special_mask=special,
                probability=self.mlm_probability,
            )
        return batch


class ExampleDataset(Dataset):
    """A list of examples held in memory."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {list(choices)}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name}={value} must be > 0")


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name}={value} must be in [0, 1)")


class _TextDataModule(LightningDataModule):
    """What every datamodule here shares: in-memory train/val datasets, one collate, loaders."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, ExampleDataset] = {}

    def collator(self) -> TextCollator:
        raise NotImplementedError

    def _loader(self, split: str) -> DataLoader:
        if not self.datasets:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for loaders")
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=split == "train",
            drop_last=split == "train" and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collator(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def predict_examples(self) -> list[Example]:
        """The prompts `multimodal predict` reads: examples with `input_ids` and a `key`."""
        raise NotImplementedError

    def predict_dataloader(self) -> DataLoader:
        """This rank's contiguous run of `predict_examples()` (every prompt once over all
        ranks, in order), right-padded, neither masked nor corrupted: `input_ids`,
        `attention_mask`, `keys`."""
        examples = [
            {"input_ids": e["input_ids"], "keys": e["key"]} for e in self.predict_examples()
        ]
        return rank_loader(
            ExampleDataset(examples),
            batch_size=self.batch_size,
            collate=TextCollator(pad_id=self.pad_id),
            trainer=self.trainer,
            num_workers=self.num_workers,
        )


def read_prompts(path: str | Path) -> list[tuple[int, str]]:
    """(line number from 1, text) of the non-blank lines of a prompt file; none: ValueError."""
    prompts = [(n, line.strip()) for n, line in enumerate(read_lines(path), start=1)]
    prompts = [(n, line) for n, line in prompts if line]
    if not prompts:
        raise ValueError(f"predict_file {str(path)!r} has no non-blank line (one prompt a line)")
    return prompts


class TokenizerMixin:
    """For datamodules that tokenize: the tokenizer named `tokenizer_name` ("clip" or a saved
    directory), loaded on first use, and the ids a model needs from it."""

    tokenizer_name: str
    _tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = _lazy_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id


class _TokenizedDataModule(TokenizerMixin, _TextDataModule):
    """A datamodule over text that a named tokenizer turns into ids."""

    def __init__(self, tokenizer: str, batch_size: int, num_workers: int) -> None:
        super().__init__(batch_size, num_workers)
        self.tokenizer_name = tokenizer

    @property
    def decoder_start_id(self) -> int:
        """First decoder input of seq2seq examples: BOS, else CLS, else PAD."""
        tok = self.tokenizer
        return next(i for i in (tok.bos_id, tok.cls_id, tok.pad_id) if i is not None)


# ---------------------------------------------------------------------------------------------
# synthetic sequences


class SyntheticSequenceDataModule(_TextDataModule):
    """Copy or reverse random symbol strings: a seconds-long check that a text model learns.

    Ids: PAD=0, BOS=1, EOS=2, SEP=3, MASK=4, symbols 5 .. 4 + n_symbols (`vocab_size` =
    5 + n_symbols). For a string x of min_length..max_length symbols and f = copy or reverse:

    - "causal": input `[BOS] x [SEP] f(x) [EOS]`, labels -100 on `[BOS] x [SEP]` and equal to
      the input on `f(x) [EOS]` (aligned, not shifted);
    - "seq2seq": source `x [EOS]`, target `f(x) [EOS]`, decoder start BOS.

    Samples are drawn once from `seed` (train and val from different streams).

    Args:
        task: "copy" or "reverse".
        objective: "causal" or "seq2seq".
        n_symbols: size of the alphabet.
        min_length, max_length: bounds of the string length (inclusive).
        n_train, n_val: number of samples.
        batch_size: samples per batch and device.
        seed: seed of the samples.

    `multimodal predict` reads the validation strings as prompts (`[BOS] x [SEP]` for
    "causal", `x [EOS]` for "seq2seq"), keys `val/<n>`.
    """

    pad_id, bos_id, eos_id, sep_id, mask_id = PAD, BOS, EOS, SEP, MASK
    decoder_start_id = BOS

    def __init__(
        self,
        task: str = "reverse",
        objective: str = "causal",
        n_symbols: int = 16,
        min_length: int = 4,
        max_length: int = 12,
        n_train: int = 20000,
        n_val: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers=0)
        _check_choice("task", task, SYNTHETIC_TASKS)
        _check_choice("objective", objective, SYNTHETIC_OBJECTIVES)
        _check_positive(n_symbols=n_symbols, min_length=min_length, n_train=n_train)
        if max_length < min_length:
            raise ValueError(f"max_length={max_length} must be >= min_length={min_length}")
        if n_val < 0:
            raise ValueError(f"n_val={n_val} must be >= 0")
        self.task, self.objective = task, objective
        self.n_symbols = n_symbols
        self.min_length, self.max_length = min_length, max_length
        self.sizes = {"train": n_train, "val": n_val}
        self.seed = seed

    @property
    def vocab_size(self) -> int:
        return SYMBOL_OFFSET + self.n_symbols

    def example(self, x: list[int]) -> Example:
        """The example of one symbol string `x`."""
        fx = x[::-1] if self.task == "reverse" else list(x)
        if self.objective == "causal":
            prompt, answer = [BOS, *x, SEP], [*fx, EOS]
            return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
        target = [*fx, EOS]
        return {"input_ids": [*x, EOS], "decoder_input_ids": [BOS, *target[:-1]], "labels": target}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for stream, (split, n) in enumerate(self.sizes.items()):
            rng = np.random.default_rng([self.seed, stream])
            lengths = rng.integers(self.min_length, self.max_length + 1, size=n)
            symbols = rng.integers(SYMBOL_OFFSET, self.vocab_size, size=(n, self.max_length))
            examples = [
                self.example(row[:k].tolist()) for row, k in zip(symbols, lengths, strict=True)
            ]
            self.datasets[split] = ExampleDataset(examples)

    def collator(self) -> TextCollator:
        return TextCollator(pad_id=PAD)

    def predict_examples(self) -> list[Example]:
        """The validation strings without their answers: `[BOS] x [SEP]` or `x [EOS]`."""
        self.setup("predict")
        examples = []
        for n, example in enumerate(self.datasets["val"].examples):
            ids = list(example["input_ids"])
            prompt = ids[: ids.index(SEP) + 1] if self.objective == "causal" else ids
            examples.append({"input_ids": prompt, "key": f"val/{n}"})
        return examples


# ---------------------------------------------------------------------------------------------
# reading and tokenizing files


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped, line ends stripped).

    Undecodable bytes become U+FFFD and are counted in a warning; a missing file raises
    FileNotFoundError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        # U+FFFD characters that were already in the file are not errors
        n_bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning("%s: %d invalid UTF-8 sequences replaced by U+FFFD", path, n_bad)
    return [line.rstrip("\r") for line in text.split("\n")]


def _encode_lines(
    tokenizer: Tokenizer,
    lines: Sequence[str],
    *,
    max_length: int | None = None,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """Ids of each line (no padding), tokenized in chunks through `batch_encode`."""
    ids: list[list[int]] = []
    for start in range(0, len(lines), ENCODE_CHUNK):
        batch = tokenizer.batch_encode(
            lines[start : start + ENCODE_CHUNK],
            max_length=max_length,
            add_special_tokens=add_special_tokens,
        )
        lengths = batch.attention_mask.sum(dim=1).tolist()  # right padding
        ids += [row[:n] for row, n in zip(batch.input_ids.tolist(), lengths, strict=True)]
    return ids


def _held_out(n: int, fraction: float, seed: int, run: int = 1) -> np.ndarray:
    """A deterministic (n,) bool mask, True on about `fraction` of the items (at least one
    when fraction > 0 and n > 1), held out in runs of `run` consecutive items."""
    n_runs = -(-n // run)
    n_val = min(max(round(n_runs * fraction), 1), n_runs - 1) if fraction > 0 else 0
    val_runs = np.random.default_rng(seed).permutation(n_runs)[:n_val]
    held = np.zeros(n_runs, dtype=bool)
    held[val_runs] = True
    return np.repeat(held, run)[:n]


def _lazy_tokenizer(name: str) -> Tokenizer:
    try:
        return load_tokenizer(name)
    except ValueError as error:
        raise ValueError(f"tokenizer={name!r}: {error}") from error


# ---------------------------------------------------------------------------------------------
# plain text files


class TextFileDataModule(_TokenizedDataModule):
    """Language modelling on plain UTF-8 text files, one document or sentence a line.

    - "causal": every non-blank line is tokenized without special tokens, the lines are
      concatenated with EOS (or SEP) after each, and the stream is cut into blocks of
      `max_length` (the last block may be shorter); labels = input_ids.
    - "masked": one line per sample, `[CLS] line [SEP]` truncated to `max_length`, masked in
      the collate with `mask_tokens` (fresh in every batch, so every epoch). With
      `next_sentence`, a sample is `[CLS] line [SEP] next [SEP]` where next is the following
      line of the same file (label 1) or, with probability 0.5, a random line of the same
      split (label 0); the pairs are drawn once from `seed`. Lines that are last in their file
      start no pair. Needs a tokenizer with [CLS], [SEP] and [MASK] (a "wordpiece" one).
    - "span_corruption": T5 pretraining for an `EncoderDecoderLM`: one line per sample (at
      most `max_length` - 1 tokens), spans covering `noise_density` of it (mean length
      `mean_span_length`) replaced by sentinels, fresh in every batch; the target lists the
      sentinels and the spans. The `n_sentinels` sentinel ids are appended after the
      tokenizer's vocabulary, as T5's extra ids, so `vocab_size` grows by `n_sentinels`; the
      decoder starts from `decoder_start_id` (BOS, else CLS, else PAD).

    Without `val_files`, a deterministic `val_fraction` of the lines is held out for
    validation (in runs of 8 consecutive lines with `next_sentence`, so pairs stay whole).

    Args:
        train_files: text files to train on.
        val_files: text files to validate on (default: hold out lines of `train_files`).
        tokenizer: "clip" or a directory written by `Tokenizer.save`.
        objective: "causal", "masked" or "span_corruption".
        max_length: tokens per block (causal) or per sample (masked).
        batch_size: samples per batch and device.
        mlm_probability: fraction of the tokens masked (masked LM).
        next_sentence: add next-sentence prediction (masked LM).
        val_fraction: lines held out when `val_files` is None.
        num_workers: DataLoader worker processes.
        seed: seed of the held-out lines and the sentence pairs.
        noise_density, mean_span_length, n_sentinels: span corruption.
        predict_file: prompts for `multimodal predict`, one a line (key: the line number):
            "causal" continues the line's tokens; "masked" fills the [MASK] tokens written
            in it (`[CLS] line [SEP]`); "span_corruption" generates from `line [EOS]`.
    """

    NSP_RUN = 8  # consecutive lines held out together with next_sentence

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        tokenizer: str = "clip",
        objective: str = "causal",
        max_length: int = 128,
        batch_size: int = 32,
        mlm_probability: float = 0.15,
        next_sentence: bool = False,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        n_sentinels: int = 100,
        predict_file: str | None = None,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers)
        self.predict_file = predict_file
        if not 0 < noise_density < 1:
            raise ValueError(f"noise_density={noise_density} must be in (0, 1)")
        if mean_span_length < 1:
            raise ValueError(f"mean_span_length={mean_span_length} must be >= 1")
        _check_positive(n_sentinels=n_sentinels)
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.n_sentinels = n_sentinels
        train_files = [train_files] if isinstance(train_files, str) else list(train_files)
        if not train_files:
            raise ValueError("train_files is empty; expected one or more text files")
        if isinstance(val_files, str):
            val_files = [val_files]
        if val_files is not None and not val_files:
            raise ValueError("val_files is empty; give text files or None to hold out lines")
        _check_choice("objective", objective, FILE_OBJECTIVES)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2")
        if not 0 < mlm_probability <= 1:
            raise ValueError(f"mlm_probability={mlm_probability} must be in (0, 1]")
        if next_sentence and objective != "masked":
            raise ValueError(f"next_sentence=True needs objective='masked', got {objective!r}")
        _check_fraction("val_fraction", val_fraction)
        self.train_files, self.val_files = train_files, val_files
        self.objective = objective
        self.max_length = max_length
        self.mlm_probability = mlm_probability
        self.next_sentence = next_sentence
        self.val_fraction = val_fraction
        self.seed = seed

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed: the tokenizer's, plus the sentinels of span corruption."""
        extra = self.n_sentinels if self.objective == "span_corruption" else 0
        return self.tokenizer.vocab_size + extra

    def _check_tokenizer(self) -> None:
        tok, name = self.tokenizer, f"tokenizer={self.tokenizer_name!r}"
        if (
            self.objective in ("causal", "span_corruption")
            and tok.eos_id is None
            and tok.sep_id is None
        ):
            raise ValueError(f"{name} has neither EOS nor SEP to separate documents")
        if self.objective == "masked" and tok.mask_id is None:
            raise ValueError(f"{name} has no mask token; masked LM needs a 'wordpiece' one")
        if self.next_sentence and (tok.cls_id is None or tok.sep_id is None):
            raise ValueError(f"{name} has no [CLS]/[SEP]; next_sentence needs a 'wordpiece' one")

    @staticmethod
    def _read(files: Sequence[str]) -> list[list[str]]:
        """The non-blank lines of each file; a file without any raises ValueError."""
        documents = []
        for path in files:
            lines = [line.strip() for line in read_lines(path)]
            lines = [line for line in lines if line]
            if not lines:
                raise ValueError(f"text file {path!r} has no non-blank lines")
            documents.append(lines)
        return documents

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._check_tokenizer()
        # runs: lists of consecutive lines (a file, or the part of it in one split)
        train_runs = self._read(self.train_files)
        if self.val_files is not None:
            splits = {"train": train_runs, "val": self._read(self.val_files)}
        else:
            splits = self._hold_out(train_runs)
        for split, runs in splits.items():
            self.datasets[split] = ExampleDataset(self._examples(runs, split))
        log.info("text files: %s", {split: len(d) for split, d in self.datasets.items()})

    def _hold_out(self, files: list[list[str]]) -> dict[str, list[list[str]]]:
        """Split the lines of every file into train and val runs of consecutive lines."""
        lines = [(f, line) for f, file_lines in enumerate(files) for line in file_lines]
        run = self.NSP_RUN if self.next_sentence else 1
        held = _held_out(len(lines), self.val_fraction, self.seed, run)
        splits: dict[str, list[list[str]]] = {"train": [], "val": []}
        previous = None
        for (f, line), is_val in zip(lines, held, strict=True):
            split = "val" if is_val else "train"
            if (f, split) != previous:
                splits[split].append([])
                previous = (f, split)
            splits[split][-1].append(line)
        return splits

    def _examples(self, runs: list[list[str]], split: str) -> list[Example]:
        tok = self.tokenizer
        if self.objective == "causal":
            end = tok.eos_id if tok.eos_id is not None else tok.sep_id
            lines = [line for run in runs for line in run]
            stream: list[int] = []
            for ids in _encode_lines(tok, lines, add_special_tokens=False):
                stream += [*ids, end]  # EOS after every document
            size = self.max_length
            blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
            return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]
        if self.objective == "span_corruption":  # the collate corrupts; keep room for EOS
            lines = [line for run in runs for line in run]
            encoded = _encode_lines(tok, lines, add_special_tokens=False)
            return [{"input_ids": ids[: self.max_length - 1]} for ids in encoded if ids]
        if not self.next_sentence:
            lines = [line for run in runs for line in run]
            encoded = _encode_lines(tok, lines, max_length=self.max_length)
            return [{"input_ids": ids} for ids in encoded]
        return self._sentence_pairs(runs, split)

    def _sentence_pairs(self, runs: list[list[str]], split: str) -> list[Example]:
        """Next-sentence examples: each line with a successor in its run, paired with that
        successor (label 1) or a random other line of the split (label 0), with p = 0.5."""
        lines = [line for run in runs for line in run]
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
        examples = []
        start = 0
        for run in runs:
            for i in range(start, start + len(run) - 1):
                successor = i + 1
                if rng.random() < 0.5:
                    second, label = lines[successor], 1
                else:
                    j = int(rng.integers(len(lines) - 1))
                    second, label = lines[j if j < successor else j + 1], 0
                ids, segments = self.tokenizer.encode_pair(
                    lines[i], second, max_length=self.max_length
                )
                examples.append(
                    {"input_ids": ids, "segment_ids": segments, "next_sentence_label": label}
                )
            start += len(run)
        return examples

    def predict_examples(self) -> list[Example]:
        """The lines of `predict_file`, tokenized as the objective's training samples."""
        if self.predict_file is None:
            raise ValueError("TextFileDataModule has nothing to predict: set predict_file")
        numbers, lines = zip(*read_prompts(self.predict_file), strict=True)
        tok = self.tokenizer
        if self.objective == "masked":
            encoded = _encode_lines(tok, lines, max_length=self.max_length)
        else:
            encoded = _encode_lines(tok, lines, add_special_tokens=False)
            if self.objective == "span_corruption":
                end = tok.eos_id if tok.eos_id is not None else tok.sep_id
                encoded = [[*ids[: self.max_length - 1], end] for ids in encoded]
            else:  # the last max_length tokens, the end the model continues
                encoded = [ids[-self.max_length :] for ids in encoded]
        return [{"input_ids": ids, "key": str(n)} for n, ids in zip(numbers, encoded, strict=True)]

    def collator(self) -> TextCollator:
        tok = self.tokenizer
        if self.objective == "causal":
            return TextCollator(pad_id=tok.pad_id)
        if self.objective == "span_corruption":
            end = tok.eos_id if tok.eos_id is not None else tok.sep_id
            return TextCollator(
                pad_id=tok.pad_id,
                sentinel_ids=tuple(range(tok.vocab_size, tok.vocab_size + self.n_sentinels)),
                noise_density=self.noise_density,
                mean_span_length=self.mean_span_length,
                end_id=end,
                decoder_start_id=self.decoder_start_id,
            )
        specials = (tok.bos_id, tok.eos_id, tok.cls_id, tok.sep_id, tok.mask_id)
        return TextCollator(
            pad_id=tok.pad_id,
            mask_id=tok.mask_id,
            vocab_size=tok.vocab_size,
            special_ids=tuple(i for i in specials if i is not None),
            mlm_probability=self.mlm_probability,
        )


# ---------------------------------------------------------------------------------------------
# tab-separated pairs


@dataclass
class SkippedLine:
    """A line of a pair file that was left out, and why."""

    path: str
    line: int  # 1-based
    reason: str


class TextPairFileDataModule(_TokenizedDataModule):
    """Seq2seq or classification on tab-separated text files, one example a line.

    - "seq2seq": `source<TAB>target`; the source is `[CLS|BOS] source [SEP|EOS]` cut to
      `max_source_length`, the target `target [EOS|SEP]` cut to `max_target_length`, and the
      decoder starts from `decoder_start_id` (BOS, else CLS, else PAD).
    - "classification": `label<TAB>text`; label names map to ids in the order of `labels`,
      or in sorted order of the names in `train_file` when `labels` is None.

    Blank lines are ignored. Malformed lines (not exactly two non-empty fields, an unknown
    label) are skipped, listed in `skipped_lines` and logged in one warning per file; a file
    with no valid line raises ValueError. Without `val_file`, a deterministic `val_fraction`
    of the train lines is held out.

    Args:
        train_file: tab-separated training examples.
        val_file: tab-separated validation examples (default: hold out train lines).
        tokenizer: "clip" or a directory written by `Tokenizer.save`.
        objective: "seq2seq" or "classification".
        max_source_length: tokens of a source (seq2seq) or text (classification).
        max_target_length: tokens of a target (seq2seq).
        batch_size: samples per batch and device.
        labels: the class names in id order (classification).
        val_fraction: lines held out when `val_file` is None.
        num_workers: DataLoader worker processes.
        seed: seed of the held-out lines.
        predict_file: sources (seq2seq) or texts (classification) for `multimodal predict`,
            one a line, encoded as the training ones (key: the line number).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer: str = "clip",
        objective: str = "seq2seq",
        max_source_length: int = 128,
        max_target_length: int = 128,
        batch_size: int = 32,
        labels: list[str] | None = None,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        predict_file: str | None = None,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers)
        self.predict_file = predict_file
        _check_choice("objective", objective, PAIR_OBJECTIVES)
        _check_positive(max_source_length=max_source_length, max_target_length=max_target_length)
        if objective == "seq2seq" and max_target_length < 2:
            raise ValueError(f"max_target_length={max_target_length} must be >= 2 (text + EOS)")
        if labels is not None:
            if objective != "classification":
                raise ValueError(f"labels are for objective='classification', got {objective!r}")
            if not labels or len(set(labels)) != len(labels):
                raise ValueError(f"labels={labels} must be a non-empty list of distinct names")
        _check_fraction("val_fraction", val_fraction)
        self.train_file, self.val_file = train_file, val_file
        self.objective = objective
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.labels = list(labels) if labels is not None else None
        self.val_fraction = val_fraction
        self.seed = seed
        self.skipped_lines: list[SkippedLine] = []
        self._label_names: list[str] | None = None
        self._parsed: dict[str, list[tuple[int, str, str]]] = {}

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order (classification; reads `train_file` if `labels` is None)."""
        if self.objective != "classification":
            return None
        if self._label_names is None:
            seen = {first for _, first, _ in self._parse(self.train_file)}
            self._label_names = self.labels if self.labels is not None else sorted(seen)
        return self._label_names

    @property
    def num_classes(self) -> int | None:
        names = self.label_names
        return None if names is None else len(names)

    def _parse(self, path: str) -> list[tuple[int, str, str]]:
        """(line number, first field, second field) of the well-formed lines, cached; the
        malformed ones are added to `skipped_lines`."""
        if path not in self._parsed:
            rows = []
            for number, line in enumerate(read_lines(path), start=1):
                if not line.strip():
                    continue
                fields = [field.strip() for field in line.split("\t")]
                if len(fields) == 2 and all(fields):
                    rows.append((number, fields[0], fields[1]))
                else:
                    reason = f"expected 2 non-empty tab-separated fields, got {len(fields)}"
                    self.skipped_lines.append(SkippedLine(path, number, reason))
            self._parsed[path] = rows
        return self._parsed[path]

    def _valid_rows(self, path: str) -> list[tuple[str, str]]:
        """The usable (first, second) fields of a file; warns about the skipped lines."""
        rows = self._parse(path)
        if self.objective == "classification":
            known = set(self.label_names or ())
            for number, label, _ in rows:
                if label not in known:
                    reason = f"unknown label {label!r}, expected one of {self.label_names}"
                    self.skipped_lines.append(SkippedLine(path, number, reason))
            rows = [row for row in rows if row[1] in known]
        skipped = [s for s in self.skipped_lines if s.path == path]
        if skipped:
            shown = "; ".join(f"line {s.line}: {s.reason}" for s in skipped[:5])
            more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
            log.warning("%s: skipped %d malformed lines: %s%s", path, len(skipped), shown, more)
        if not rows:
            raise ValueError(f"pair file {path!r} has no valid tab-separated line")
        return [(first, second) for _, first, second in rows]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        tok = self.tokenizer
        if self.objective == "seq2seq" and tok.eos_id is None and tok.sep_id is None:
            raise ValueError(f"tokenizer={self.tokenizer_name!r} has neither EOS nor SEP")
        train = self._valid_rows(self.train_file)
        if self.val_file is not None:
            splits = {"train": train, "val": self._valid_rows(self.val_file)}
        else:
            held = _held_out(len(train), self.val_fraction, self.seed)
            splits = {
                "train": [row for row, h in zip(train, held, strict=True) if not h],
                "val": [row for row, h in zip(train, held, strict=True) if h],
            }
        for split, rows in splits.items():
            self.datasets[split] = ExampleDataset(self._examples(rows))
        log.info("text pairs: %s", {split: len(d) for split, d in self.datasets.items()})

    def _examples(self, rows: list[tuple[str, str]]) -> list[Example]:
        tok = self.tokenizer
        firsts, seconds = [r[0] for r in rows], [r[1] for r in rows]
        if self.objective == "classification":
            label_ids = {name: i for i, name in enumerate(self.label_names or ())}
            texts = _encode_lines(tok, seconds, max_length=self.max_source_length)
            return [
                {"input_ids": ids, "labels": label_ids[label]}
                for ids, label in zip(texts, firsts, strict=True)
            ]
        end = tok.eos_id if tok.eos_id is not None else tok.sep_id
        sources = _encode_lines(tok, firsts, max_length=self.max_source_length)
        targets = _encode_lines(tok, seconds, add_special_tokens=False)
        examples = []
        for source, target in zip(sources, targets, strict=True):
            target = [*target[: self.max_target_length - 1], end]
            examples.append(
                {
                    "input_ids": source,
                    "decoder_input_ids": [self.decoder_start_id, *target[:-1]],
                    "labels": target,
                }
            )
        return examples

    def collator(self) -> TextCollator:
        return TextCollator(pad_id=self.tokenizer.pad_id)

    def predict_examples(self) -> list[Example]:
        """The lines of `predict_file`, encoded as training sources or texts."""
        if self.predict_file is None:
            raise ValueError("TextPairFileDataModule has nothing to predict: set predict_file")
        numbers, lines = zip(*read_prompts(self.predict_file), strict=True)
        encoded = _encode_lines(self.tokenizer, lines, max_length=self.max_source_length)
        return [{"input_ids": ids, "key": str(n)} for n, ids in zip(numbers, encoded, strict=True)]
