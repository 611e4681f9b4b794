"""Decoder-only language model (GPT-like), also the text decoder of image-conditioned models."""

from __future__ import annotations

from torch import Tensor, nn

from multimodal.layers import BlockCache, Transformer
from text.config import TextConfig
from text.embedding import TextEmbedding, fit_length
from text.output import LMOutput


class DecoderLM(nn.Module):
    """Causal LM: embeddings -> causal stack -> (tied) output projection.

    Any position type, GQA/MQA and sliding windows come from `config.transformer`. With
    `transformer.cross_attention=True` every block also attends to a `context` (encoder
    output, image tokens): the decoder of seq2seq models and captioners.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if not config.transformer.causal:
            raise ValueError("DecoderLM needs TextConfig.transformer.causal=True")
        self.config = config
        self.embed = TextEmbedding(config)
        self.transformer = Transformer(config.transformer)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight

    def init_cache(self, capacity: int = 64) -> list[BlockCache]:
        """Empty KV caches for `generate`."""
        return self.transformer.init_cache(capacity)

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: list[BlockCache] | None = None,
        context: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
    ) -> LMOutput:
        """input_ids (B, T); attention_mask (B, T) bool, True = real token (with a cache: over
        cached + new tokens); positions (B, T) for left-padded batches; context (B, S, D)."""
        if cache:  # the attention mask then also covers the cached tokens
            offset = cache[0].self_attn.length
            input_ids, positions = fit_length(self.config, input_ids, positions, offset=offset)
        else:
            input_ids, attention_mask, positions = fit_length(
                self.config, input_ids, attention_mask, positions
            )
        out = self.transformer(
            self.embed(input_ids),
            key_padding_mask=attention_mask,
            positions=positions,
            cache=cache,
            context=context,
            context_padding_mask=context_padding_mask,
        )
        return LMOutput(self.lm_head(out.hidden), out.hidden, out.aux_loss)
