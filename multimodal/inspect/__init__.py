"""What a trained model attends to: attention rollout and per-layer / per-head maps over image
patches, a captioner's cross-attention per generated word, overlays and the
`multimodal attention` command."""

from multimodal.inspect.maps import (
    CaptionAttention,
    ImageAttention,
    caption_attention,
    image_attention,
    text_similarities,
)
from multimodal.inspect.overlay import display_image, heatmap, overlay, save_png
from multimodal.inspect.rollout import (
    PatchLayout,
    attention_rollout,
    cross_attention_maps,
    fuse_heads,
    layer_map,
    patch_map,
    rollout_map,
    select_head,
    vit_layout,
)

__all__ = [
    "CaptionAttention",
    "ImageAttention",
    "PatchLayout",
    "attention_rollout",
    "caption_attention",
    "cross_attention_maps",
    "display_image",
    "fuse_heads",
    "heatmap",
    "image_attention",
    "layer_map",
    "overlay",
    "patch_map",
    "rollout_map",
    "save_png",
    "select_head",
    "text_similarities",
    "vit_layout",
]
