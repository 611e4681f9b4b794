"""Text towers: tokenizers, encoder / decoder / encoder-decoder models, generation, heads."""

from text.config import TextConfig
from text.decoder import DecoderLM
from text.encoder import EncoderLM
from text.encoder_decoder import EncoderDecoderLM
from text.generation import GenerationConfig, GenerationOutput, generate
from text.heads import (
    MaskedLMHead,
    NextSentenceHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TextFeatures,
    TokenClassificationHead,
    best_spans,
)
from text.output import LMOutput
from text.pooling import pool_tokens
from text.text_encoder import TextEncoder
from text.tokenizer import BatchEncoding, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BatchEncoding",
    "DecoderLM",
    "EncoderDecoderLM",
    "EncoderLM",
    "GenerationConfig",
    "GenerationOutput",
    "LMOutput",
    "MaskedLMHead",
    "NextSentenceHead",
    "QuestionAnsweringHead",
    "SequenceClassificationHead",
    "TextConfig",
    "TextEncoder",
    "TextFeatures",
    "TokenClassificationHead",
    "Tokenizer",
    "best_spans",
    "generate",
    "load_tokenizer",
    "pool_tokens",
    "train_tokenizer",
]
