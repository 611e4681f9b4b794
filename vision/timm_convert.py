"""timm VisionTransformer -> our ViT: the config read off the model, the weights renamed."""

from __future__ import annotations

from timm.layers import Mlp, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from vision.vit import ViT, ViTConfig

_POOLS = {"token": "token", "avg": "avg", "map": "attn"}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"cannot convert this timm VisionTransformer: {what}")


def _activation(act: nn.Module) -> str:
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise _unsupported(f"activation {act!r} has no counterpart here")


def vit_config_from_timm(model: VisionTransformer) -> ViTConfig:
    """Read a ViTConfig off a timm VisionTransformer; raise for features we do not have."""
    if not isinstance(model, VisionTransformer):
        raise _unsupported(f"expected timm's VisionTransformer, got {type(model).__name__}")
    block = model.blocks[0]
    for name, module in (
        ("layer scale", block.ls1),
        ("q/k norm", block.attn.q_norm),
        ("attention out-norm", block.attn.norm),
        ("patch norm", model.patch_embed.norm),
    ):
        if not isinstance(module, nn.Identity):
            raise _unsupported(f"{name} is not supported")
    if not isinstance(block.mlp, Mlp) or not isinstance(block.mlp.norm, nn.Identity):
        raise _unsupported(f"MLP {type(block.mlp).__name__} is not supported (plain Mlp only)")
    if block.attn.qkv.bias is None:
        raise _unsupported("qkv without bias is not supported")
    if model.global_pool not in _POOLS:
        raise _unsupported(f"global_pool={model.global_pool!r}; supported: {sorted(_POOLS)}")
    if model.attn_pool is not None and model.pool_include_prefix:
        raise _unsupported("attention pooling over the class/register tokens is not supported")
    patch_h, patch_w = model.patch_embed.patch_size
    img_h, img_w = model.patch_embed.img_size
    if patch_h != patch_w or img_h != img_w:
        raise _unsupported("non-square images or patches")
    return ViTConfig(
        image_size=img_h,
        patch_size=patch_h,
        in_channels=model.patch_embed.proj.in_channels,
        dim=model.embed_dim,
        n_layers=len(model.blocks),
        n_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        activation=_activation(block.mlp.act),
        class_token=model.cls_token is not None,
        n_registers=model.num_reg_tokens,
        pool=_POOLS[model.global_pool],
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pos_embed="learned" if model.pos_embed is not None else "none",
        prefix_pos_embed=not model.no_embed_class,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        patch_bias=model.patch_embed.proj.bias is not None,
        norm_eps=block.norm1.eps,
    )


def vit_state_dict_from_timm(model: VisionTransformer) -> dict[str, Tensor]:
    """timm parameter names -> ours (the classifier head is left out)."""
    renames = {
        "cls_token": "cls_token",
        "reg_token": "registers",
        "pos_embed": "pos_embed",
        "patch_embed.proj.": "patch_embed.proj.",
        "norm_pre.": "pre_norm.",
        "blocks.": "encoder.blocks.",
        "norm.": "encoder.norm.",
        "fc_norm.": "fc_norm.",
        "attn_pool.latent": "attn_pool.query",
        "attn_pool.q.": "attn_pool.attn.q.",
        "attn_pool.kv.": "attn_pool.attn.kv.",
        "attn_pool.proj.": "attn_pool.attn.proj.",
        "attn_pool.norm.": "attn_pool.norm.",
        "attn_pool.mlp.": "attn_pool.mlp.",
    }
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            continue
        for old, new in renames.items():
            if name.startswith(old):
                state[new + name[len(old) :]] = tensor
                break
        else:
            raise _unsupported(f"no counterpart for parameter {name!r}")
    return state


def vit_from_timm(model: VisionTransformer) -> ViT:
    """A ViT with the configuration and weights of a timm VisionTransformer."""
    vit = ViT(vit_config_from_timm(model))
    vit.load_state_dict(vit_state_dict_from_timm(model), strict=True)
    return vit
