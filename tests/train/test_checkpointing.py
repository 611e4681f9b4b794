"""Activation checkpointing (`grad_checkpointing=True` on every task): the same loss and
gradients as without it, with fewer activations kept for backward, for every task and for
the fusion stacks and the timm / open_clip blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import open_clip
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fusion import CoAttentionEncoder, GatedDecoder
from multimodal.layers import Transformer, TransformerConfig
from multimodal.models import CLIP, Captioner, VQAModel
from multimodal.tasks import (
    Captioning,
    CausalLM,
    ContrastivePretraining,
    ImageClassifier,
    MaskedLM,
    Seq2SeqLM,
    TextClassifier,
    VisualQuestionAnswering,
)
from multimodal.train import apply_activation_checkpointing
from multimodal.train.blocks import transformer_blocks
from text import DecoderLM, EncoderDecoderLM, EncoderLM, TextConfig, TextEncoder
from vision import TimmEncoder, ViT, ViTConfig

B, T, V = 4, 6, 30


def vit(dim: int = 32) -> ViT:
    return ViT(ViTConfig(image_size=16, patch_size=4, dim=dim, n_layers=2, n_heads=2))


def text_config(**transformer: Any) -> TextConfig:
    stack = TransformerConfig(dim=24, n_layers=2, n_heads=2, max_positions=16, **transformer)
    return TextConfig(vocab_size=V, bos_id=1, eos_id=2, transformer=stack)


def ids() -> Tensor:
    return torch.randint(3, V, (B, T))


def mask() -> Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, -2:] = False
    return m


def labels() -> Tensor:
    return ids().masked_fill(torch.rand(B, T) < 0.5, -100)


def clip_case(flag: bool) -> tuple[nn.Module, Any]:
    model = CLIP(vit(), TextEncoder(text_config(causal=True)), embed_dim=16)
    batch = {"images": torch.randn(B, 3, 16, 16), "input_ids": ids(), "attention_mask": mask()}
    return ContrastivePretraining(model, grad_checkpointing=flag), batch


def caption_case(flag: bool) -> tuple[nn.Module, Any]:  # CoCa-style: decoder + text tower
    decoder = DecoderLM(text_config(causal=True, cross_attention=True, context_dim=32))
    model = Captioner(vit(), decoder, text_tower=TextEncoder(text_config()), embed_dim=16)
    batch = {"images": torch.randn(B, 3, 16, 16), "input_ids": ids(), "attention_mask": mask()}
    return Captioning(model, grad_checkpointing=flag, val_generate=False), batch


def vqa_case(flag: bool) -> tuple[nn.Module, Any]:
    decoder = DecoderLM(text_config(causal=True, cross_attention=True, context_dim=32))
    fusion = TransformerConfig(dim=32, n_heads=2, n_layers=2, position="none")
    model = VQAModel(vit(), TextEncoder(text_config()), fusion, 5, answer_decoder=decoder)
    scores = torch.zeros(B, 5)
    scores[torch.arange(B), torch.randint(0, 5, (B,))] = 1.0
    batch = {
        "images": torch.randn(B, 3, 16, 16),
        "input_ids": ids(),
        "attention_mask": mask(),
        "answer_scores": scores,
        "answer_input_ids": ids(),
        "answer_attention_mask": mask(),
    }
    return VisualQuestionAnswering(model, grad_checkpointing=flag), batch


def causal_case(flag: bool) -> tuple[nn.Module, Any]:
    batch = {"input_ids": ids(), "attention_mask": mask(), "labels": labels()}
    return CausalLM(DecoderLM(text_config(causal=True)), grad_checkpointing=flag), batch


def masked_case(flag: bool) -> tuple[nn.Module, Any]:
    batch = {
        "input_ids": ids(),
        "attention_mask": mask(),
        "labels": labels(),
        "next_sentence_label": torch.randint(0, 2, (B,)),
    }
    encoder = EncoderLM(text_config())
    return MaskedLM(encoder, next_sentence=True, grad_checkpointing=flag), batch


def seq2seq_case(flag: bool) -> tuple[nn.Module, Any]:
    config = text_config(position="t5", norm="rmsnorm")
    batch = {
        "input_ids": ids(),
        "attention_mask": mask(),
        "decoder_input_ids": ids(),
        "decoder_attention_mask": mask(),
        "labels": labels(),
    }
    return Seq2SeqLM(EncoderDecoderLM(config), grad_checkpointing=flag), batch


def text_classifier_case(flag: bool) -> tuple[nn.Module, Any]:
    batch = {"input_ids": ids(), "attention_mask": mask(), "labels": torch.randint(0, 3, (B,))}
    return TextClassifier(EncoderLM(text_config()), 3, dropout=0.0, grad_checkpointing=flag), batch


def image_classifier_case(flag: bool) -> tuple[nn.Module, Any]:
    batch = (torch.randn(B, 3, 16, 16), torch.randint(0, 3, (B,)))
    return ImageClassifier(vit(), 3, grad_checkpointing=flag), batch


CASES: dict[str, Callable[[bool], tuple[nn.Module, Any]]] = {
    "ContrastivePretraining": clip_case,
    "Captioning": caption_case,
    "VisualQuestionAnswering": vqa_case,
    "CausalLM": causal_case,
    "MaskedLM": masked_case,
    "Seq2SeqLM": seq2seq_case,
    "TextClassifier": text_classifier_case,
    "ImageClassifier": image_classifier_case,
}


def run(model: nn.Module, step: Callable[[], Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
    """Loss, gradients, and the bytes of the tensors autograd kept for backward."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


def assert_same_gradients(
    plain: tuple[Tensor, dict[str, Tensor], int],
    checkpointed: tuple[Tensor, dict[str, Tensor], int],
) -> None:
    torch.testing.assert_close(checkpointed[0], plain[0], atol=1e-6, rtol=0)
    assert checkpointed[1].keys() == plain[1].keys() and plain[1]
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, atol=1e-6, rtol=0, msg=name)
    assert checkpointed[2] < 0.8 * plain[2], (checkpointed[2], plain[2])  # fewer activations


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("name", list(CASES))
def test_task_gradients_equal_without_checkpointing(name: str) -> None:
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        task, batch = CASES[name](flag)
        task.configure_model()  # what the Trainer calls: applies the task's block options
        assert task.block_options.grad_checkpointing == flag
        results.append(run(task, lambda task=task, batch=batch: task.training_step(batch, 0)))
    assert_same_gradients(*results)


MODULES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Tensor]]] = {
    "co_attention": (
        lambda: CoAttentionEncoder(TransformerConfig(dim=16, n_heads=2, n_layers=2)),
        lambda m: sum(
            x.sum() for x in m(torch.randn(2, 5, 16), torch.randn(2, 7, 16))[:2]
        ),  # the text and image streams (the attention fields are None)
    ),
    "gated_decoder": (
        lambda: GatedDecoder(Transformer(TransformerConfig(dim=16, n_heads=2, n_layers=2)), 12),
        lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 7, 12)).hidden.pow(2).sum(),
    ),
    "timm_vit": (
        lambda: VisionTransformer(16, 4, embed_dim=32, depth=2, num_heads=2, num_classes=0),
        lambda m: m(torch.randn(2, 3, 16, 16)).pow(2).sum(),
    ),
    "open_clip": (
        lambda: open_clip.CLIP(
            16,
            open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=16),
            open_clip.CLIPTextCfg(context_length=8, vocab_size=V, width=16, heads=2, layers=2),
        ),
        lambda m: sum(
            x.pow(2).sum() for x in m(torch.randn(2, 3, 16, 16), torch.randint(3, V, (2, 8)))[:2]
        ),
    ),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_fusion_timm_and_open_clip_blocks_are_checkpointed(name: str) -> None:
    build, loss = MODULES[name]
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build()
        if flag:
            assert apply_activation_checkpointing(model) == len(transformer_blocks(model)) > 0
        torch.manual_seed(1)
        results.append(run(model, lambda model=model: loss(model)))
    assert_same_gradients(*results)


def test_a_timm_cnn_tower_uses_timm_checkpointing() -> None:
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        tower = TimmEncoder("resnet10t")
        if flag:  # no transformer blocks: timm's own switch, once for the whole tower
            assert not transformer_blocks(tower)
            assert apply_activation_checkpointing(tower) == 1 and tower.model.grad_checkpointing
        x = torch.randn(2, 3, 32, 32)
        results.append(run(tower, lambda tower=tower, x=x: tower(x).pooled.pow(2).sum()))
    assert_same_gradients(*results)
