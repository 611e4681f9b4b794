"""Configuration of the text models: a vocabulary around one transformer stack."""

from __future__ import annotations

from dataclasses import dataclass, field

from multimodal.layers import TransformerConfig


@dataclass
class TextConfig:
    """A text model's vocabulary and special ids around its `TransformerConfig`.

    `transformer.max_positions` is the longest input: longer inputs raise ValueError, or are
    cut to their first max_positions tokens when `truncate=True`. `n_segments` > 0 adds
    segment (sentence A/B) embeddings, as BERT. `tie_embeddings` shares the input embedding
    with the output projection. `bos_id` / `eos_id` are the defaults of generation.
    """

    vocab_size: int = 32000
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    pad_id: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    n_segments: int = 0
    tie_embeddings: bool = True
    truncate: bool = False

    def __post_init__(self) -> None:
        prefix = "TextConfig."
        if isinstance(self.transformer, dict):  # from YAML / JSON
            self.transformer = TransformerConfig(**self.transformer)
        if self.vocab_size <= 0:
            raise ValueError(f"{prefix}vocab_size={self.vocab_size} must be > 0")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{prefix}{name}={value} must be in [0, vocab_size={self.vocab_size})"
                )
        if self.n_segments < 0:
            raise ValueError(f"{prefix}n_segments={self.n_segments} must be >= 0")

    @property
    def dim(self) -> int:
        return self.transformer.dim

    @property
    def max_positions(self) -> int:
        return self.transformer.max_positions
