"""Composite vision-language models (CLIP, captioner, VQA): plain nn.Modules, no Lightning."""

from multimodal.models.classifier import ImageClassificationModel
from multimodal.models.clip import CLIP, CLIPOutput

__all__ = ["CLIP", "CLIPOutput", "ImageClassificationModel"]
