"""Composite vision-language models (CLIP, captioner, VQA): plain nn.Modules, no Lightning."""

from multimodal.models.classifier import ImageClassificationModel
from multimodal.models.clip import CLIP, CLIPOutput
from multimodal.models.open_clip import OpenCLIP

__all__ = ["CLIP", "CLIPOutput", "ImageClassificationModel", "OpenCLIP"]
