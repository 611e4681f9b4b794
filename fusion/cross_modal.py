"""One modality attending to another: a bidirectional `Transformer` whose blocks add
cross-attention over the other modality's tokens.

No class of its own: `Transformer(config)` with `cross_attention=True` already is this encoder
(self-attention, cross-attention to the context, feed-forward per block; padding masks for both
sequences), so this module only builds it. Text attending to image tokens and the reverse are
two encoders with the arguments swapped:

    text_to_image = cross_modal_encoder(config, context_dim=image_dim)
    text = text_to_image(text, context=image, key_padding_mask=text_mask,
                         context_padding_mask=image_mask).hidden          # (B, T, dim)
"""

from __future__ import annotations

from dataclasses import replace

from multimodal.layers import Transformer, TransformerConfig


def cross_modal_encoder(config: TransformerConfig, context_dim: int | None = None) -> Transformer:
    """A `Transformer` over x (B, T, dim) whose every block also attends to a context (B, S, C).

    Args:
        config: the stack; `cross_attention` is switched on here. It must not be causal: a
            causal stack with cross-attention is a captioning decoder, built from its config
            directly.
        context_dim: width C of the context tokens (default: `config.context_dim`, else dim).

    Call it as `encoder(x, context=context, key_padding_mask=(B, T), context_padding_mask=(B, S))`;
    `.hidden` of the result is (B, T, dim).
    """
    if config.causal:
        raise ValueError(
            "TransformerConfig.causal=True: a cross-modal encoder is bidirectional; build a "
            "Transformer with cross_attention=True directly for a causal decoder"
        )
    return Transformer(
        replace(
            config,
            cross_attention=True,
            context_dim=context_dim if context_dim is not None else config.context_dim,
        )
    )
