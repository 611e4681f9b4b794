"""Image towers: ViT patch encoder, timm backbones, image transforms."""
