"""Decoder-only language model (GPT-like), also the text decoder of image-conditioned models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multimodal.layers import BlockCache, Transformer
from text.config import TextConfig
from text.embedding import TextEmbedding, fit_length, prepend_prompt
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
        # prompt tuning (multimodal.adapt.prompt): (P, dim) embeddings before the tokens
        self.prompt: nn.Parameter | None = None

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
        return_attention: bool = False,
    ) -> LMOutput:
        """input_ids (B, T); attention_mask (B, T) bool, True = real token (with a cache: over
        cached + new tokens); positions (B, T) for left-padded batches; context (B, S, D).
        return_attention: `attentions` (and with a context `cross_attentions`) hold every
        block's weights (B, H, T, Tk) and (B, H, T, S).

        With a soft prompt (`self.prompt`), it is put before the first tokens fed (the cache
        then holds it once) and logits / hidden states cover the tokens only."""
        offset = cache[0].self_attn.length if cache else 0
        n_prompt = 0 if self.prompt is None else self.prompt.shape[0]
        if cache:  # the attention mask then also covers the cached tokens
            input_ids, positions = fit_length(self.config, input_ids, positions, offset=offset)
        else:
            input_ids, attention_mask, positions = fit_length(
                self.config, input_ids, attention_mask, positions, reserved=n_prompt
            )
        x = self.embed(input_ids)
        if self.prompt is not None:
            n_tokens = max(offset - n_prompt, 0)  # tokens (not prompt) already in the cache
            if positions is None:  # the tokens keep the positions they have without a prompt
                T = input_ids.shape[1]
                positions = torch.arange(n_tokens, n_tokens + T, device=x.device)
                positions = positions.expand(input_ids.shape[0], T)
            if offset == 0:
                x, attention_mask, positions = prepend_prompt(
                    self.prompt, x, attention_mask, positions
                )
            elif attention_mask is not None:  # the cached prompt is always visible
                ones = attention_mask.new_ones(attention_mask.shape[0], n_prompt)
                attention_mask = torch.cat([ones, attention_mask], dim=1)
        out = self.transformer(
            x,
            key_padding_mask=attention_mask,
            positions=positions,
            cache=cache,
            context=context,
            context_padding_mask=context_padding_mask,
            return_attention=return_attention,
        )
        hidden = out.hidden[:, n_prompt:] if self.prompt is not None and offset == 0 else out.hidden
        return LMOutput(
            self.lm_head(hidden), hidden, out.aux_loss, out.attentions, out.cross_attentions
        )
