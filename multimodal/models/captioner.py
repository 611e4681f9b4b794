"""Image captioning: an image tower whose patch tokens a causal text decoder cross-attends to
(SimVLM / CoCa's captioning half), optionally trained jointly with a contrastive loss (CoCa)."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.layers import with_pooled_token
from text.decoder import DecoderLM
from text.generation import GenerationConfig, GenerationOutput, generate


class CaptionerOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab): next-token scores at every input position
    aux_loss: Tensor  # the decoder's mixture-of-experts balance loss (0 without experts)
    image_features: Tensor | None  # (B, embed_dim) normalised, with a contrastive head
    text_features: Tensor | None  # (B, embed_dim) normalised, with a contrastive head
    logit_scale: Tensor | None  # the contrastive logit multiplier
    # with return_attention=True, per block: the image tower's self-attention (None for a tower
    # without them), the decoder's self-attention (B, H, T, T) and its cross-attention
    # (B, H, T, 1 + N) over [pooled image token; N patch tokens]
    image_attentions: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class Captioner(nn.Module):
    """Image tower -> [pooled; patch tokens] -> `DecoderLM` with cross-attention -> logits.

    With `text_tower` (a `text.TextEncoder`) the model is CoCa-style: the image tower's pooled
    output and the text tower's are projected to `embed_dim` for a contrastive loss next to
    the captioning loss, and the model has CLIP's `encode_image` / `encode_text` (zero-shot,
    retrieval). CoCa splits one decoder into unimodal and multimodal halves; here the unimodal
    text encoder is a separate tower, so any `TextEncoder` serves.

    Args:
        image_tower: returns `TowerOutput` with `tokens` (`vision.ViT`, `vision.TimmEncoder`
            with a token map) and has `out_dim`.
        decoder: a `DecoderLM` whose config has `transformer.cross_attention=True`,
            `bos_id` (generation starts from it) and `eos_id` (it stops there).
        text_tower: for the contrastive head (None: captioning only).
        embed_dim: width of the contrastive space (needed with text_tower).
        init_logit_scale: initial contrastive temperature multiplier (clamped at 100).
    """

    def __init__(
        self,
        image_tower: nn.Module,
        decoder: DecoderLM,
        *,
        text_tower: nn.Module | None = None,
        embed_dim: int | None = None,
        init_logit_scale: float = 1 / 0.07,
    ) -> None:
        super().__init__()
        config = decoder.config
        if not config.transformer.cross_attention:
            raise ValueError(
                "the decoder needs TextConfig.transformer.cross_attention=True to attend to "
                "the image tokens"
            )
        if config.bos_id is None or config.eos_id is None:
            raise ValueError(
                f"the decoder needs TextConfig.bos_id and eos_id to generate captions, got "
                f"bos_id={config.bos_id}, eos_id={config.eos_id}"
            )
        context_dim = config.transformer.context_dim or config.dim
        if image_tower.out_dim != context_dim:
            raise ValueError(
                f"image_tower.out_dim={image_tower.out_dim} must equal the decoder's "
                f"transformer.context_dim={context_dim} (set context_dim)"
            )
        if (text_tower is None) != (embed_dim is None):
            raise ValueError("text_tower and embed_dim go together (the contrastive head)")
        self.image_tower = image_tower
        self._tower_attention = _takes_return_attention(image_tower)
        self.decoder = decoder
        self.text_tower = text_tower
        self.embed_dim = embed_dim
        if text_tower is not None:
            self.image_projection = nn.Linear(image_tower.out_dim, embed_dim, bias=False)
            self.text_projection = nn.Linear(text_tower.out_dim, embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = None  # the CLIP interface (no SigLIP bias)

    @property
    def contrastive(self) -> bool:
        return self.text_tower is not None

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"} if self.contrastive else set()

    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> what the decoder attends to: the pooled embedding and the patch
        tokens (B, 1 + N, context_dim)."""
        return with_pooled_token(self.image_tower(images))

    def encode_image(self, images: Tensor, *, normalize: bool = True) -> Tensor:
        """(B, C, H, W) -> (B, embed_dim), the contrastive image embedding."""
        self._need_contrastive("encode_image")
        features = self.image_projection(self.image_tower(images).pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        """(B, T) -> (B, embed_dim), the contrastive text embedding."""
        self._need_contrastive("encode_text")
        features = self.text_projection(self.text_tower(input_ids, attention_mask).pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> Tensor:
        self._need_contrastive("scale")
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def _need_contrastive(self, what: str) -> None:
        if not self.contrastive:
            raise ValueError(f"{what} needs a Captioner built with text_tower and embed_dim")

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_attention: bool = False,
    ) -> CaptionerOutput:
        """images (B, C, H, W); input_ids (B, T) captions (BOS ... EOS, padded); attention_mask
        (B, T) True = real token. logits[:, t] predicts input_ids[:, t + 1].

        return_attention: also every block's attention weights of the image tower (when it
        takes `return_attention`, as `vision.ViT`) and of the decoder; cross_attentions[l][:, :,
        t] is where the decoder looked at the image when predicting input_ids[:, t + 1]."""
        image = (
            self.image_tower(images, return_attention=True)
            if return_attention and self._tower_attention
            else self.image_tower(images)
        )
        context = with_pooled_token(image)  # (B, 1 + N, context_dim)
        out = self.decoder(
            input_ids,
            attention_mask=attention_mask,
            context=context,
            return_attention=return_attention,
        )
        attentions = (
            (image.attentions, out.attentions, out.cross_attentions)
            if return_attention
            else (None, None, None)
        )
        if not self.contrastive:
            return CaptionerOutput(out.logits, out.aux_loss, None, None, None, *attentions)
        image_features = F.normalize(self.image_projection(image.pooled), dim=-1)
        text_features = self.encode_text(input_ids, attention_mask)
        return CaptionerOutput(
            out.logits, out.aux_loss, image_features, text_features, self.scale(), *attentions
        )

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        config: GenerationConfig | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        """Captions for (B, C, H, W) images, starting from BOS (greedy, beam or sampling as
        `config` says; default: greedy up to max_positions); returns the new tokens
        (B * copies, T_new), eos then pad at the end."""
        context = self.image_tokens(images)
        config = config or GenerationConfig(max_new_tokens=self.decoder.config.max_positions - 1)
        bos = torch.full((images.shape[0], 1), self.decoder.config.bos_id, device=images.device)
        return generate(self.decoder, bos, context=context, config=config, generator=generator)


def _takes_return_attention(tower: nn.Module) -> bool:
    """Whether an image tower's forward accepts `return_attention` (our ViT does, timm
    backbones do not)."""
    try:
        return "return_attention" in inspect.signature(tower.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False
