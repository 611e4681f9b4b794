"""Task variants beyond the configs: ContrastivePretraining with an image-text matching head
(matches and hard negatives next to the CLIP loss) and VQA with an answer decoder."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP, ITMHead, VQAModel
from multimodal.tasks import ContrastivePretraining, VisualQuestionAnswering
from tests.helpers import quiet_trainer
from text import DecoderLM, TextConfig, TextEncoder
from vision import ViT, ViTConfig


def batches(n: int = 3, size: int = 6) -> list[dict[str, torch.Tensor]]:
    mask = torch.ones(size, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return [
        {
            "images": torch.randn(size, 3, 16, 16),
            "input_ids": torch.randint(1, 30, (size, 5)),
            "attention_mask": mask,
        }
        for _ in range(n)
    ]


def test_itm_head_trains_next_to_the_clip_loss():
    image = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2))
    text = TextEncoder(
        TextConfig(
            vocab_size=30,
            transformer=TransformerConfig(dim=24, n_layers=1, n_heads=2, max_positions=8),
        )
    )
    head = ITMHead(image_dim=32, text_dim=24, config=TransformerConfig(dim=16, n_heads=2))
    task = ContrastivePretraining(CLIP(image, text, embed_dim=16), itm_head=head, itm_weight=0.5)
    before = [p.detach().clone() for p in head.parameters()]
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(task, DataLoader(batches(), batch_size=None))
    metrics = trainer.callback_metrics
    assert {"train/itm_loss", "train/itm_acc", "train/loss"} <= set(metrics)
    # 6 matches + 12 hard negatives: the loss is a 2-way cross-entropy near ln 2 at the start
    assert 0.2 < float(metrics["train/itm_loss"]) < 1.5
    assert all(not p.detach().equal(b) for p, b in zip(head.parameters(), before, strict=True))


def test_vqa_with_an_answer_decoder_trains_both_heads():
    image = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2))
    question = TextEncoder(
        TextConfig(vocab_size=30, transformer=TransformerConfig(dim=24, n_heads=2))
    )
    decoder = DecoderLM(
        TextConfig(
            vocab_size=30,
            bos_id=1,
            eos_id=2,
            transformer=TransformerConfig(
                dim=16, n_heads=2, causal=True, cross_attention=True, context_dim=32
            ),
        )
    )
    fusion = TransformerConfig(dim=32, n_heads=2, position="none")
    model = VQAModel(image, question, fusion, num_answers=4, answer_decoder=decoder)
    task = VisualQuestionAnswering(model, answer_loss_weight=0.5)
    data = []
    for batch in batches():
        scores = torch.zeros(6, 4)
        scores[torch.arange(6), torch.randint(0, 4, (6,))] = 1.0
        answers = torch.randint(3, 30, (6, 4))
        answers[:, 0], answers[:, -1] = 1, 2
        data.append(
            {
                **batch,
                "answer_scores": scores,
                "answer_input_ids": answers,
                "answer_attention_mask": torch.ones(6, 4, dtype=torch.bool),
            }
        )
    before = [p.detach().clone() for p in decoder.parameters()]
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(task, DataLoader(data, batch_size=None))
    assert {"train/answer_loss", "train/decoder_loss", "train/acc"} <= set(trainer.callback_metrics)
    assert all(not p.detach().equal(b) for p, b in zip(decoder.parameters(), before, strict=True))
