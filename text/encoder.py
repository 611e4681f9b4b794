"""Encoder-only model (BERT-like): bidirectional stack over tokens [+ segments]."""

from __future__ import annotations

from torch import Tensor, nn

from multimodal.layers import Transformer, TransformerOutput
from text.config import TextConfig
from text.embedding import TextEmbedding, fit_length, prepend_prompt


class EncoderLM(nn.Module):
    """Token (+ segment) embeddings -> bidirectional stack; heads live in `text.heads`.

    For BERT: learned positions, `transformer.norm_order="post"`, `input_norm=True`,
    `n_segments=2`, and inputs `[CLS] a [SEP] (b [SEP])` from the tokenizer.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if config.transformer.causal:
            raise ValueError("EncoderLM needs TextConfig.transformer.causal=False")
        self.config = config
        self.out_dim = config.dim
        self.embed = TextEmbedding(config)
        self.transformer = Transformer(config.transformer)
        # prompt tuning (multimodal.adapt.prompt): (P, dim) embeddings before the tokens
        self.prompt: nn.Parameter | None = None

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        return_attention: bool = False,
    ) -> TransformerOutput:
        """input_ids, attention_mask (True = real token), segment_ids: (B, T).

        return_attention: `attentions` holds every block's weights (B, H, T, T).
        With a soft prompt, `hidden` holds the tokens' states only (the attention weights, when
        asked for, cover the prompt too)."""
        n_prompt = 0 if self.prompt is None else self.prompt.shape[0]
        input_ids, attention_mask, segment_ids = fit_length(
            self.config, input_ids, attention_mask, segment_ids, reserved=n_prompt
        )
        x = self.embed(input_ids, segment_ids)
        if self.prompt is None:
            return self.transformer(
                x, key_padding_mask=attention_mask, return_attention=return_attention
            )
        x, attention_mask, positions = prepend_prompt(self.prompt, x, attention_mask, None)
        out = self.transformer(
            x,
            key_padding_mask=attention_mask,
            positions=positions,
            return_attention=return_attention,
        )
        return out._replace(hidden=out.hidden[:, n_prompt:])
