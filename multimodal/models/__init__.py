"""Composite vision-language models (CLIP, captioner, VQA): plain nn.Modules, no Lightning."""

from multimodal.models.captioner import Captioner, CaptionerOutput
from multimodal.models.classifier import ImageClassificationModel
from multimodal.models.clip import CLIP, ClipLike, CLIPOutput
from multimodal.models.itm import ITMHead, ITMPairs, itm_pairs
from multimodal.models.open_clip import OpenCLIP
from multimodal.models.registry import create, list_models, register_model
from multimodal.models.vqa import VQAModel, VQAOutput

__all__ = [
    "CLIP",
    "CLIPOutput",
    "Captioner",
    "CaptionerOutput",
    "ClipLike",
    "ITMHead",
    "ITMPairs",
    "ImageClassificationModel",
    "OpenCLIP",
    "VQAModel",
    "VQAOutput",
    "create",
    "itm_pairs",
    "list_models",
    "register_model",
]
