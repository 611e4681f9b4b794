"""Visual question answering: the question and the image fused in one stream (ViLT,
VisualBERT), an answer classifier over an answer vocabulary trained with soft scores, and
optionally a decoder that writes the answer (generative VQA)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fusion import SingleStreamEncoder
from multimodal.layers import TransformerConfig, with_pooled_token
from text.decoder import DecoderLM
from text.generation import GenerationConfig, GenerationOutput, generate


class VQAOutput(NamedTuple):
    logits: Tensor  # (B, num_answers): answer scores (sigmoid: soft-score targets)
    fused: Tensor  # (B, T + N, dim): the joint question and image tokens
    fused_mask: Tensor  # (B, T + N) True = real token
    answer_logits: Tensor | None  # (B, T_a, vocab) with an answer decoder and answer ids


class VQAModel(nn.Module):
    """Image tower + question encoder -> single-stream fusion -> answer classifier.

    Args:
        image_tower: returns `TowerOutput` with `tokens`, has `out_dim`.
        text_tower: a `text.TextEncoder` for the question (its tokens, width
            `text_tower.config.dim`, carry the question's positions).
        fusion: the joint stack over [question; image] (`position="none"`, bidirectional);
            both modalities are projected to `fusion.dim`.
        num_answers: size of the answer vocabulary (the datamodule's `num_answers`).
        answer_decoder: a `DecoderLM` with cross-attention to the fused tokens
            (`context_dim` = fusion.dim, bos_id/eos_id set) that writes answers as text.
        pool: what the classifier reads: "mean" over the real fused tokens (learns fastest
            from scratch: the image tokens reach it directly), or "cls" (the first question
            token, ViLT / VisualBERT with pretrained towers).
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        fusion: TransformerConfig,
        num_answers: int,
        *,
        answer_decoder: DecoderLM | None = None,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if num_answers <= 0:
            raise ValueError(f"num_answers={num_answers} must be > 0")
        if answer_decoder is not None:
            c = answer_decoder.config
            context_dim = c.transformer.context_dim or c.dim
            if not c.transformer.cross_attention or context_dim != fusion.dim:
                raise ValueError(
                    "answer_decoder needs transformer.cross_attention=True and "
                    f"context_dim={fusion.dim} (the fusion width), got "
                    f"cross_attention={c.transformer.cross_attention}, context_dim={context_dim}"
                )
            if c.bos_id is None or c.eos_id is None:
                raise ValueError("answer_decoder needs TextConfig.bos_id and eos_id")
        self.num_answers = num_answers
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = _to_width(image_tower.out_dim, fusion.dim)
        self.text_projection = _to_width(text_tower.config.dim, fusion.dim)
        self.fusion = SingleStreamEncoder(fusion, pool=pool)
        self.classifier = nn.Sequential(  # the VQA head of ViLT / BUTD: dim -> 2 dim -> answers
            nn.Linear(fusion.dim, 2 * fusion.dim),
            nn.LayerNorm(2 * fusion.dim),
            nn.GELU(),
            nn.Linear(2 * fusion.dim, num_answers),
        )
        self.answer_decoder = answer_decoder

    def fuse(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (pooled (B, dim), fused tokens (B, T + N, dim), their mask (B, T + N))."""
        image = with_pooled_token(self.image_tower(images))  # (B, 1 + N, image dim)
        text = self.text_tower(input_ids, attention_mask).tokens
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=text.device)
        attention_mask = attention_mask.bool()
        out = self.fusion(
            self.text_projection(text),
            self.image_projection(image),
            text_padding_mask=attention_mask,
        )
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        mask = torch.cat([attention_mask, image_mask], dim=1)
        return out.pooled, torch.cat([out.text, out.image], dim=1), mask

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        answer_ids: Tensor | None = None,
        answer_mask: Tensor | None = None,
    ) -> VQAOutput:
        """images (B, C, H, W); question ids / mask (B, T); with an answer decoder, answer
        ids (B, T_a) (BOS ... EOS) get next-token logits."""
        pooled, fused, mask = self.fuse(images, input_ids, attention_mask)
        answer_logits = None
        if answer_ids is not None:
            if self.answer_decoder is None:
                raise ValueError("answer_ids given, but the model has no answer_decoder")
            answer_logits = self.answer_decoder(
                answer_ids, attention_mask=answer_mask, context=fused, context_padding_mask=mask
            ).logits
        return VQAOutput(self.classifier(pooled), fused, mask, answer_logits)

    @torch.no_grad()
    def generate_answers(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        config: GenerationConfig | None = None,
    ) -> GenerationOutput:
        """Answers written by the answer decoder from BOS (default: greedy, at most 8 tokens)."""
        if self.answer_decoder is None:
            raise ValueError("generate_answers needs a VQAModel built with answer_decoder")
        _, fused, mask = self.fuse(images, input_ids, attention_mask)
        limit = self.answer_decoder.config.max_positions - 1
        config = config or GenerationConfig(max_new_tokens=min(limit, 8))
        bos = torch.full((images.shape[0], 1), self.answer_decoder.config.bos_id)
        return generate(
            self.answer_decoder,
            bos.to(images.device),
            context=fused,
            context_padding_mask=mask,
            config=config,
        )


def _to_width(width: int, dim: int) -> nn.Module:
    return nn.Identity() if width == dim else nn.Linear(width, dim)
