"""LightningModules, one per training objective."""

from multimodal.tasks.classification import ImageClassifier
from multimodal.tasks.optim import OptimConfig

__all__ = ["ImageClassifier", "OptimConfig"]
