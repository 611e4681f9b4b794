"""Prompt tuning: learned input tokens. Soft prompts for text towers (Lester et al. 2021) and
visual prompts for the ViT (VPT, Jia et al. 2022).

Text: P embeddings go before the token embeddings, at the very front (before BOS and before
the left padding of generation batches: rows stay contiguous and no tower needs to know
whether its inputs start with BOS); the attention mask gets P ones. The prompt takes position
0 and the tokens keep the positions they have without it, so a pretrained tower's absolute or
rotary positions are untouched (relative biases see the prompt at index distance). Outputs
cover the original tokens only: TextEncoder pools (EOT / cls / mean) over its tokens,
EncoderLM's `hidden` and DecoderLM's logits have the input's length (the decoder's KV cache
holds the prompt once, from the first call), EncoderDecoderLM's encoder drops the prompt's
states so the decoder's context keeps the source's length and padding mask. The prompt counts
against `max_positions` (fit_length reserves it). Depth "deep" is for the ViT only.

ViT: P tokens after the class and register tokens (at the front without them), at the input of
the first block: no position embedding, no pre-norm. "deep" replaces them by a fresh set
before every later block. Pooling ignores them: the class token, the mean of the patch tokens
or the attention pool over the patch tokens; the returned tokens are the patch tokens.

Prompts change the outputs at initialisation (every token attends to them); there is no
zero-init variant (a prefix with `gate=True` is the method for an unchanged start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from multimodal.adapt.prefix import TOWERS, check_selection, find_towers
from vision.vit import ViT

DEPTHS = ("shallow", "deep")
INITS = ("random", "vocab")


@dataclass
class PromptConfig:
    """Prompt tuning of our text towers and ViTs.

    Args:
        length: P, learned tokens per tower (and per block with depth "deep").
        depth: "shallow" (input only) or "deep" (a new set before every block; ViT only).
        init: text towers: "random" (normal, std 0.02) or "vocab" (copies of the embeddings
            of P token ids drawn uniformly from the vocabulary, pad excluded). The ViT's
            prompts always start uniform in +-sqrt(6 / (channels * patch^2 + dim)), as VPT.
        towers: "all" (every ViT / TextEncoder / EncoderLM / DecoderLM / EncoderDecoderLM in
            the model, or the model itself) or submodule names (["text_tower"]).
    """

    length: int = 8
    depth: str = "shallow"
    init: str = "random"
    towers: str | list[str] = "all"

    def __post_init__(self) -> None:
        p = "PromptConfig."
        if self.length < 1:
            raise ValueError(f"{p}length={self.length} must be >= 1")
        if self.depth not in DEPTHS:
            raise ValueError(f"{p}depth={self.depth!r} must be one of {list(DEPTHS)}")
        if self.init not in INITS:
            raise ValueError(f"{p}init={self.init!r} must be one of {list(INITS)}")
        self.towers = check_selection(self.towers, f"{p}towers", str)


def _vit_prompts(vit: ViT, *shape: int) -> nn.Parameter:
    c = vit.config
    bound = math.sqrt(6.0 / (c.in_channels * c.patch_size**2 + c.dim))
    weight = vit.patch_embed.proj.weight
    prompts = torch.empty(*shape, c.dim, device=weight.device, dtype=weight.dtype)
    return nn.Parameter(prompts.uniform_(-bound, bound))


def _text_prompt(tower: nn.Module, config: PromptConfig) -> nn.Parameter:
    table = tower.embed.token.weight  # (V, dim)
    if config.init == "vocab":
        pad = tower.config.pad_id
        ids = torch.randint(0, table.shape[0] - 1, (config.length,), device=table.device)
        ids = ids + (ids >= pad).long()  # every id but pad, uniformly
        return nn.Parameter(table.detach()[ids].clone())
    return nn.Parameter(torch.randn(config.length, table.shape[1]).to(table) * 0.02)


def add_prompts(model: nn.Module, config: PromptConfig) -> list[str]:
    """Give the chosen towers learned prompt tokens; return the new parameter names.

    ValueError for towers it cannot reach (timm, open_clip), depth "deep" on a text tower and
    a tower that already has prompts (add_prompts called twice)."""
    towers = find_towers(model, config.towers, "prompt tuning", TOWERS)
    for name, tower in towers:
        where = name or "the model"
        if tower.prompt is not None:
            raise ValueError(f"{where} already has prompts: add_prompts was called twice")
        if config.depth == "deep" and not isinstance(tower, ViT):
            raise ValueError(
                f"PromptConfig.depth='deep' is supported for the ViT only, not for {where} "
                f"({type(tower).__name__}): use 'shallow' or prefix tuning"
            )
    added: list[str] = []
    for name, tower in towers:
        dot = f"{name}." if name else ""
        if isinstance(tower, ViT):
            tower.prompt = _vit_prompts(tower, 1, config.length)
            added.append(f"{dot}prompt")
            n_later = len(tower.encoder.blocks) - 1
            if config.depth == "deep" and n_later > 0:
                tower.encoder.deep_prompts = _vit_prompts(tower, n_later, config.length)
                tower.encoder.prompt_start = tower.config.n_prefix
                added.append(f"{dot}encoder.deep_prompts")
        else:
            tower.prompt = _text_prompt(tower, config)
            added.append(f"{dot}prompt")
    return added
