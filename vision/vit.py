"""Vision Transformer (Dosovitskiy et al. 2021) on the shared transformer layers, with a
converter from timm's VisionTransformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimodal.layers import (
    AttentionPool,
    TowerOutput,
    Transformer,
    TransformerConfig,
    create_norm,
)
from vision.patch_embed import PatchEmbed
from vision.pos_embed import resample_pos_embed, sincos_2d_pos_embed
from vision.timm_encoder import create_timm_model

POOLS = ("token", "avg", "attn")
POS_EMBEDS = ("learned", "sincos", "none")


@dataclass
class ViTConfig:
    """Numbers and names of a ViT; validated on creation.

    `pool`: "token" (the class token), "avg" (mean of the patch tokens) or "attn" (a learned
    query attends to the patch tokens). `fc_norm`: normalise after pooling instead of normalising
    the tokens (None: yes for "avg", as timm does). `pos_embed`: "learned" (resampled when the
    image size changes), "sincos" (fixed 2-D, any size) or "none"; `prefix_pos_embed`: the
    learned table covers the class/register tokens too (timm's default). `n_registers`:
    extra learned tokens (Darcet et al. 2024). `pre_norm`: a norm before the blocks
    (OpenAI CLIP). `drop_path`: stochastic depth of the last block.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    class_token: bool = True
    n_registers: int = 0
    pool: str = "token"
    fc_norm: bool | None = None
    pos_embed: str = "learned"
    prefix_pos_embed: bool = True
    pre_norm: bool = False
    patch_bias: bool = True
    bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        prefix = "ViTConfig."
        if self.patch_size <= 0 or self.image_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"{prefix}image_size={self.image_size} must be a positive multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.in_channels <= 0:
            raise ValueError(f"{prefix}in_channels={self.in_channels} must be > 0")
        if self.pool not in POOLS:
            raise ValueError(f"{prefix}pool={self.pool!r} must be one of {list(POOLS)}")
        if self.pool == "token" and not self.class_token:
            raise ValueError(f"{prefix}pool='token' needs class_token=True")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(
                f"{prefix}pos_embed={self.pos_embed!r} must be one of {list(POS_EMBEDS)}"
            )
        if self.n_registers < 0:
            raise ValueError(f"{prefix}n_registers={self.n_registers} must be >= 0")
        # the blocks validate heads, activation, dropout rates and name the ViT's field
        try:
            self.transformer_config()
        except ValueError as error:
            raise ValueError(str(error).replace("TransformerConfig.", prefix)) from None

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def n_prefix(self) -> int:
        return int(self.class_token) + self.n_registers

    @property
    def use_fc_norm(self) -> bool:
        return self.pool == "avg" if self.fc_norm is None else self.fc_norm

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            norm="layernorm",
            norm_eps=self.norm_eps,
            norm_order="pre",
            final_norm=not self.use_fc_norm,
            bias=self.bias,
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
            drop_path=self.drop_path,
        )


class ViT(nn.Module):
    """Image tower: patches -> [class, registers, patches] tokens -> pre-norm blocks -> pool.

    Returns `TowerOutput(pooled (B, dim), tokens (B, N, dim))` with the patch tokens
    only. Images of another size than `config.image_size` work when it is a multiple of the
    patch size: learned position embeddings are resampled to the new grid.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.out_dim = c.dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, c.dim, bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.class_token else None
        self.registers = (
            nn.Parameter(torch.zeros(1, c.n_registers, c.dim)) if c.n_registers else None
        )
        self.pos_embed: nn.Parameter | None = None
        if c.pos_embed == "learned":
            length = c.grid[0] * c.grid[1] + (c.n_prefix if c.prefix_pos_embed else 0)
            self.pos_embed = nn.Parameter(torch.randn(1, length, c.dim) * 0.02)
        self.pos_drop = nn.Dropout(c.dropout)
        self.pre_norm = create_norm("layernorm", c.dim, c.norm_eps) if c.pre_norm else nn.Identity()
        self.encoder = Transformer(c.transformer_config())
        self.attn_pool = (
            AttentionPool(c.dim, c.n_heads, mlp_ratio=c.mlp_ratio) if c.pool == "attn" else None
        )
        self.fc_norm = (
            create_norm("layernorm", c.dim, c.norm_eps) if c.use_fc_norm else nn.Identity()
        )
        for token in (self.cls_token, self.registers):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        # visual prompt tuning (multimodal.adapt.prompt): (1, P, dim) tokens put after the
        # class/register tokens at the input of the first block (no position embedding)
        self.prompt: nn.Parameter | None = None

    def no_weight_decay(self) -> set[str]:
        """Parameters that are embeddings rather than weights: no weight decay."""
        return {"cls_token", "registers", "pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory, same gradients."""
        self.encoder.set_grad_checkpointing(enable)

    def _embed(self, images: Tensor) -> Tensor:
        x, grid = self.patch_embed(images)  # (B, N, dim)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.registers) if t is not None]
        c = self.config
        if self.pos_embed is not None:
            n_prefix = c.n_prefix if c.prefix_pos_embed else 0
            pos = resample_pos_embed(self.pos_embed, grid, c.grid, n_prefix)
            if c.prefix_pos_embed:
                x = torch.cat([*prefix, x], dim=1) + pos
            else:
                x = torch.cat([*prefix, x + pos], dim=1)
        else:
            if c.pos_embed == "sincos":
                x = x + sincos_2d_pos_embed(grid, c.dim).to(x)
            x = torch.cat([*prefix, x], dim=1)
        return self.pre_norm(self.pos_drop(x))

    @property
    def n_leading_tokens(self) -> int:
        """Tokens before the patches in the sequence the blocks see: class token, registers
        and visual prompts (the columns of the attention weights the patches come after)."""
        return self.config.n_prefix + (0 if self.prompt is None else self.prompt.shape[1])

    def forward(self, images: Tensor, *, return_attention: bool = False) -> TowerOutput:
        """images: (B, in_channels, H, W) with H and W multiples of the patch size.

        return_attention: also return every block's self-attention weights (B, H, T, T) over
        [class, registers, prompts, patches] (`n_leading_tokens` before the patches, in row-major
        order of the (H / patch, W / patch) grid); computed explicitly, so slower."""
        x = self._embed(images)  # (B, n_prefix + N, dim)
        n_prefix = self.config.n_prefix
        if self.prompt is not None:  # (B, n_prefix + P + N, dim); pooling skips the prompts
            prompt = self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :n_prefix], prompt, x[:, n_prefix:]], dim=1)
            n_prefix += self.prompt.shape[1]
        out = self.encoder(x, return_attention=return_attention)
        x = out.hidden
        tokens = x[:, n_prefix:]
        if self.attn_pool is not None:
            pooled = self.attn_pool(tokens)
        elif self.config.pool == "token":
            pooled = x[:, 0]
        else:
            pooled = tokens.mean(dim=1)
        return TowerOutput(self.fc_norm(pooled), tokens, out.attentions)

    @classmethod
    def from_timm(
        cls, model: nn.Module | str, *, pretrained: bool = False, pretrained_path: str | None = None
    ) -> ViT:
        """Convert a timm VisionTransformer into a ViT: an instance, or a timm model name with
        weights from the hub (`pretrained=True`) or from a local file (`pretrained_path`)."""
        from vision.timm_convert import vit_from_timm  # imported here: it imports this module

        if isinstance(model, str):
            model = create_timm_model(model, pretrained=pretrained, pretrained_path=pretrained_path)
        return vit_from_timm(model)
