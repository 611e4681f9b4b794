"""Zero-shot classification with a CLIP model: class prompts -> averaged, normalised text
embeddings (the classifier) -> image logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal.models.clip import CLIP
from text.tokenizer import Tokenizer


@torch.no_grad()
def zeroshot_classifier(
    model: CLIP,
    tokenizer: Tokenizer,
    class_prompts: Sequence[Sequence[str]],
    *,
    context_length: int = 77,
) -> Tensor:
    """(C, D): for each class, the mean of its prompts' normalised text embeddings (prompts
    are the class name in several templates), normalised again, as in CLIP's evaluation."""
    weights = []
    device = next(model.parameters()).device
    for prompts in class_prompts:
        batch = tokenizer.batch_encode(list(prompts), max_length=context_length)
        features = model.encode_text(batch.input_ids.to(device), batch.attention_mask.to(device))
        weights.append(F.normalize(features.float().mean(dim=0), dim=-1))
    return torch.stack(weights)


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """(B, D) normalised image embeddings, (C, D) classifier -> (B, C) cosine similarities."""
    return image_features.float() @ classifier.T
