"""LightningModules, one per training objective."""

from multimodal.tasks.captioning import Captioning
from multimodal.tasks.classification import ImageClassifier
from multimodal.tasks.contrastive import ContrastivePretraining
from multimodal.tasks.distillation import (
    CausalLMDistillation,
    ClipDistillation,
    TextClassifierDistillation,
)
from multimodal.tasks.language_modeling import CausalLM, MaskedLM, Seq2SeqLM, TextClassifier
from multimodal.tasks.loading import load_task
from multimodal.tasks.optim import OptimConfig
from multimodal.tasks.vqa import VisualQuestionAnswering

__all__ = [
    "Captioning",
    "CausalLM",
    "CausalLMDistillation",
    "ClipDistillation",
    "ContrastivePretraining",
    "ImageClassifier",
    "MaskedLM",
    "OptimConfig",
    "Seq2SeqLM",
    "TextClassifier",
    "TextClassifierDistillation",
    "VisualQuestionAnswering",
    "load_task",
]
