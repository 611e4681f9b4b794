"""Vision-language losses as pure functions, correct under DDP.

Contrastive losses gather features across ranks themselves (`multimodal.models.distributed`);
they are the identity of their single-process form when `torch.distributed` is not initialised.
Learnable temperature / bias live in the model; here they are plain tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal.models.distributed import gather_features, rank_and_world


def clip_logits(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    across_ranks: bool = True,
) -> tuple[Tensor, Tensor]:
    """(logits_per_image, logits_per_text) of a CLIP batch, laid out as `clip_loss` lays out
    its own: the features of every rank are gathered (in rank order), so the logits cover the
    global batch: (N, N), or (B, N) this rank's rows against every column with `local_loss`.
    A teacher's features go through the same call, so its logits match the student's entry
    for entry. Without `torch.distributed` (or with across_ranks=False) N = B.
    """
    all_images, all_texts = image_features, text_features
    if across_ranks and rank_and_world()[1] > 1:
        all_images = gather_features(image_features, with_grad=gather_with_grad)  # (N, D)
        all_texts = gather_features(text_features, with_grad=gather_with_grad)  # (N, D)
    if local_loss:
        return (
            logit_scale * image_features @ all_texts.T,  # (B, N)
            logit_scale * text_features @ all_images.T,  # (B, N)
        )
    logits_per_image = logit_scale * all_images @ all_texts.T  # (N, N)
    return logits_per_image, logits_per_image.T


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    across_ranks: bool = True,
) -> Tensor:
    """Symmetric InfoNCE of CLIP, as open_clip's `ClipLoss` with the same flags.

    With x_i, y_j the L2-normalised image / text features and s the (already exponentiated)
    logit scale, logits l_ij = s * x_i . y_j and

        L = 1/2 * [ CE(l, labels) + CE(l^T, labels) ],  CE(l, t) = -1/n sum_i log softmax(l_i)_t_i

    Global (default): both sides are gathered and every rank computes the full (N, N) logits,
    labels = arange(N). local_loss: local images vs all texts and local texts vs all images,
    (B, N) logits, labels = arange(B) + rank * B; cheaper, and its mean over ranks is the global
    loss. With gather_with_grad=True the gradient averaged over ranks (as DDP does) equals the
    single-process gradient on the global batch for both modes; with False each rank drops the
    other ranks' contributions to its features (global mode: the averaged gradient is 1/W of the
    single-process one), which is open_clip's default.

    Args:
        image_features: (B, D) local, L2-normalised.
        text_features: (B, D) local, L2-normalised.
        logit_scale: scalar multiplier s (exp of the learnable log temperature).
        local_loss: compute only the local rows against the gathered columns.
        gather_with_grad: autograd-aware gather (see `gather_features`).
        across_ranks: False: this rank's batch alone, no collective (validation, whose ranks
            may hold different numbers of batches and items).
    """
    logits_per_image, logits_per_text = clip_logits(
        image_features,
        text_features,
        logit_scale,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        across_ranks=across_ranks,
    )
    rank = rank_and_world()[0] if across_ranks and local_loss else 0
    offset = rank * image_features.shape[0]  # local_loss: this rank's rows of the global batch
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device) + offset
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    across_ranks: bool = True,
) -> Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023), normalised by the local batch.

        L = -1/B * sum_{i local} sum_{j all} log sigmoid(z_ij * (s * x_i . y_j + b))

    with z_ij = +1 for the matching pair (j = i + rank * B) and -1 otherwise. Text features are
    gathered with grad, so the mean of L over ranks (and of the gradients, as DDP does) equals
    the single-process loss on the global batch. Matches open_clip's `SigLipLoss`.

    Args:
        image_features: (B, D) local, L2-normalised.
        text_features: (B, D) local, L2-normalised.
        logit_scale: scalar multiplier s (already exponentiated).
        logit_bias: scalar bias b.
        across_ranks: False: this rank's batch alone, no collective (validation).
    """
    rank, all_texts = 0, text_features
    if across_ranks:
        rank, _ = rank_and_world()
        all_texts = gather_features(text_features, with_grad=True)  # (N, D)
    b = image_features.shape[0]
    logits = logit_scale * image_features @ all_texts.T + logit_bias  # (B, N)
    idx = torch.arange(b, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[idx, idx + rank * b] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


def caption_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Token cross-entropy, mean over the tokens whose label is not `ignore_index`.

        L = -1/|M| * sum_{(b,t) in M} sum_v q_btv log softmax(logits_bt)_v,
        q = (1 - eps) * onehot(labels_bt) + eps / V

    Under DDP each rank averages its own tokens (the mean over ranks weighs ranks equally, not
    tokens).

    Args:
        logits: (B, T, V), already aligned with labels (shift done by the caller).
        labels: (B, T) token ids, `ignore_index` on padding.
        label_smoothing: eps.
        ignore_index: label value excluded from the loss and from the count.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),  # (B*T, V)
        labels.reshape(-1),  # (B*T,)
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def vqa_loss(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """VQA soft-score loss: BCE-with-logits summed over answers, mean over the batch.

        L = -1/B * sum_b sum_a [ t_ba log sigmoid(l_ba) + (1 - t_ba) log sigmoid(-l_ba) ]

    i.e. the element-wise mean BCE times the number of answers A (as in the VQA literature).

    Args:
        logits: (B, A).
        soft_targets: (B, A) soft scores in [0, 1] (e.g. min(#annotators / 3, 1)).
    """
    return F.binary_cross_entropy_with_logits(logits, soft_targets) * logits.shape[-1]


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching: L = -1/B * sum_b log softmax(logits_b)_{labels_b}.

    Args:
        logits: (B, 2) scores of (not matching, matching).
        labels: (B,) 1 for a matching pair, 0 otherwise.
    """
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def hard_negatives(
    similarity: Tensor, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample ITM hard negatives as ALBEF / BLIP do.

    Image i gets text j != i with probability exp(S_ij) / sum_{k != i} exp(S_ik); text j gets
    image i != j with probability exp(S_ij) / sum_{k != j} exp(S_kj), where S = similarity
    (already scaled by the temperature, i.e. logits).

    Args:
        similarity: (B, B) image-to-text similarity, S[i, j] = image i vs text j, B >= 2.
        generator: random generator for reproducible draws.

    Returns:
        (negative text index per image (B,), negative image index per text (B,)).
    """
    b = similarity.shape[0]
    if similarity.shape != (b, b) or b < 2:
        raise ValueError(f"similarity must be (B, B) with B >= 2, got {tuple(similarity.shape)}")
    off_diag = ~torch.eye(b, dtype=torch.bool, device=similarity.device)
    logits = similarity.float()  # fp32: exp numerics
    masked = logits.masked_fill(~off_diag, float("-inf"))
    # unnormalised exp(S - max over the non-matching entries); torch.multinomial normalises
    w_i2t = torch.where(off_diag, (logits - masked.amax(dim=1, keepdim=True)).exp(), 0.0)
    w_t2i = torch.where(off_diag, (logits - masked.amax(dim=0, keepdim=True)).exp(), 0.0)
    w_t2i = w_t2i.T.contiguous()  # (B, B) rows: texts
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image
