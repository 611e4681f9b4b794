"""`multimodal tokenizer`: train a WordPiece or byte-level BPE tokenizer on text files."""

from __future__ import annotations

import argparse

from text.tokenizer import TOKENIZER_KINDS, train_tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal tokenizer",
        description="Train tokenizers; load the result with text.tokenizer.load_tokenizer(DIR).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a tokenizer on plain text files and save it to a directory",
        description="Train a tokenizer on plain UTF-8 text files and save it to --out.",
    )
    train.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="text files")
    train.add_argument("--kind", required=True, choices=TOKENIZER_KINDS)
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to save to")
    train.add_argument("--cased", action="store_true", help="keep case (default: lower-case)")
    train.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="rarest pair merged (2)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Parse `argv` (the arguments after `tokenizer`), train, save, report; returns 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        tokenizer = train_tokenizer(
            args.corpus,
            kind=args.kind,
            vocab_size=args.vocab_size,
            lowercase=not args.cased,
            min_frequency=args.min_frequency,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    tokenizer.save(args.out)
    print(f"trained a {args.kind} tokenizer of {tokenizer.vocab_size} ids, saved to {args.out}")
    return 0
