"""Image towers: ViT patch encoder, timm backbones, image transforms."""

from vision.timm_encoder import TimmEncoder, create_timm_model
from vision.transforms import NORMALIZATIONS, ImageTransformConfig
from vision.vit import ViT, ViTConfig

__all__ = [
    "NORMALIZATIONS",
    "ImageTransformConfig",
    "TimmEncoder",
    "ViT",
    "ViTConfig",
    "create_timm_model",
]
