"""Encoder-decoder model (T5-like): a bidirectional encoder, a causal decoder cross-attending to
it, one shared embedding."""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from multimodal.layers import BlockCache, Transformer, TransformerOutput
from text.config import TextConfig
from text.embedding import TextEmbedding, fit_length, prepend_prompt
from text.output import LMOutput


class EncoderDecoderLM(nn.Module):
    """Encoder and decoder share `config.transformer` (the decoder adds causal masking and
    cross-attention and has `decoder_layers` blocks); T5 uses position "t5", RMSNorm, ReLU and
    no biases. The tied output projection scales the hidden state by dim^-0.5, as T5 does.

    Args:
        config: vocabulary and encoder stack (`transformer.causal` must be False).
        decoder_layers: decoder depth (default: the encoder's).
        decoder_start_id: first decoder input (default: bos_id, else pad_id, as T5).
    """

    def __init__(
        self,
        config: TextConfig,
        decoder_layers: int | None = None,
        decoder_start_id: int | None = None,
    ) -> None:
        super().__init__()
        enc = config.transformer
        if enc.causal or enc.cross_attention:
            raise ValueError(
                "EncoderDecoderLM takes the encoder's config: TextConfig.transformer.causal and "
                "cross_attention must be False (the decoder sets both)"
            )
        self.config = config
        self.decoder_start_id = (
            decoder_start_id
            if decoder_start_id is not None
            else (config.bos_id if config.bos_id is not None else config.pad_id)
        )
        dec = replace(
            enc, causal=True, cross_attention=True, n_layers=decoder_layers or enc.n_layers
        )
        self.embed = TextEmbedding(config)
        self.encoder = Transformer(enc)
        self.decoder = Transformer(dec)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output_scale = config.dim**-0.5 if config.tie_embeddings else 1.0
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight
        # prompt tuning (multimodal.adapt.prompt): (P, dim) embeddings before the source tokens
        self.prompt: nn.Parameter | None = None

    def init_cache(self, capacity: int = 64) -> list[BlockCache]:
        """Empty decoder KV caches for `generate` (cross-attention keys filled on first use)."""
        return self.decoder.init_cache(capacity)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Source ids (B, S) -> encoder states (B, S, dim), computed once per generation."""
        return self._encode(input_ids, attention_mask).hidden

    def _encode(
        self, input_ids: Tensor, attention_mask: Tensor | None, return_attention: bool = False
    ) -> TransformerOutput:
        """The encoder over the source; with a soft prompt before it, whose states are dropped
        (the decoder attends to the source tokens only, with the source's padding mask)."""
        n_prompt = 0 if self.prompt is None else self.prompt.shape[0]
        input_ids, attention_mask = fit_length(
            self.config, input_ids, attention_mask, reserved=n_prompt
        )
        x = self.embed(input_ids)
        if self.prompt is None:
            return self.encoder(
                x, key_padding_mask=attention_mask, return_attention=return_attention
            )
        x, attention_mask, positions = prepend_prompt(self.prompt, x, attention_mask, None)
        out = self.encoder(
            x,
            key_padding_mask=attention_mask,
            positions=positions,
            return_attention=return_attention,
        )
        return out._replace(hidden=out.hidden[:, n_prompt:])

    def decode(
        self,
        input_ids: Tensor,
        *,
        context: Tensor,
        context_padding_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: list[BlockCache] | None = None,
        return_attention: bool = False,
    ) -> LMOutput:
        """Decoder ids (B, T) attending to encoder states `context` (B, S, dim).

        return_attention: every decoder block's self- and cross-attention weights."""
        offset = cache[0].self_attn.length if cache else 0
        input_ids, positions = fit_length(self.config, input_ids, positions, offset=offset)
        out = self.decoder(
            self.embed(input_ids),
            context=context,
            context_padding_mask=context_padding_mask,
            key_padding_mask=attention_mask,
            positions=positions,
            cache=cache,
            return_attention=return_attention,
        )
        return LMOutput(
            self.lm_head(out.hidden * self.output_scale),
            out.hidden,
            out.aux_loss,
            out.attentions,
            out.cross_attentions,
        )

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> LMOutput:
        """Teacher forcing: source (B, S), decoder inputs (B, T) -> logits (B, T, vocab).

        return_attention: the decoder's self- and cross-attention and the encoder's
        self-attention weights, per block (`attentions`, `cross_attentions`,
        `encoder_attentions`)."""
        n_prompt = 0 if self.prompt is None else self.prompt.shape[0]
        input_ids, attention_mask = fit_length(
            self.config, input_ids, attention_mask, reserved=n_prompt
        )
        encoded = self._encode(input_ids, attention_mask, return_attention)
        out = self.decode(
            decoder_input_ids,
            context=encoded.hidden,
            context_padding_mask=attention_mask,
            attention_mask=decoder_attention_mask,
            return_attention=return_attention,
        )
        return out._replace(
            aux_loss=out.aux_loss + encoded.aux_loss, encoder_attentions=encoded.attentions
        )
