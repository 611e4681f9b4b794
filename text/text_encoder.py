"""The text tower of CLIP-style models, with a converter from open_clip."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multimodal.layers import TowerOutput, Transformer, TransformerConfig
from text.config import TextConfig
from text.embedding import TextEmbedding, fit_length, prepend_prompt
from text.pooling import POOLINGS, pool_tokens


class TextEncoder(nn.Module):
    """Tokens -> stack (causal as CLIP, or bidirectional) -> pooled (B, out_dim) + tokens.

    Args:
        config: vocabulary and stack; the pooled token is found with `config.pad_id`
            (trailing pad ids are padding) unless an attention mask is given.
        pool: "eot" (last real token, CLIP's end-of-text), "cls" (first token) or "mean".
        out_dim: a linear projection without bias to this width (None: no projection).
    """

    def __init__(
        self, config: TextConfig, *, pool: str = "eot", out_dim: int | None = None
    ) -> None:
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"pool={pool!r} must be one of {list(POOLINGS)}")
        self.config = config
        self.pool = pool
        self.embed = TextEmbedding(config)
        self.transformer = Transformer(config.transformer)
        self.projection = nn.Linear(config.dim, out_dim, bias=False) if out_dim else nn.Identity()
        self.out_dim = out_dim or config.dim
        # prompt tuning (multimodal.adapt.prompt): (P, dim) embeddings before the tokens
        self.prompt: nn.Parameter | None = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_attention: bool = False,
    ) -> TowerOutput:
        """input_ids (B, T); attention_mask (B, T) bool, True = real token.

        return_attention: `attentions` holds every block's weights (B, H, P + T, P + T), a soft
        prompt's P tokens first."""
        n_prompt = 0 if self.prompt is None else self.prompt.shape[0]
        input_ids, attention_mask = fit_length(
            self.config, input_ids, attention_mask, reserved=n_prompt
        )
        x, key_padding_mask, positions = self.embed(input_ids), attention_mask, None
        if self.prompt is not None:
            x, key_padding_mask, positions = prepend_prompt(self.prompt, x, attention_mask, None)
        out = self.transformer(
            x,
            key_padding_mask=key_padding_mask,
            positions=positions,
            return_attention=return_attention,
        )
        hidden = out.hidden[:, n_prompt:]  # the prompt's states are not tokens: pool without
        if attention_mask is None:
            is_token = input_ids != self.config.pad_id
            # everything up to the last non-pad id is text (CLIP's "!" has id 0 = pad_id)
            last = (torch.arange(input_ids.shape[1], device=input_ids.device) * is_token).argmax(1)
            attention_mask = (
                torch.arange(input_ids.shape[1], device=input_ids.device) <= last[:, None]
            )
        pooled = pool_tokens(hidden, attention_mask, self.pool)
        return TowerOutput(self.projection(pooled), hidden, out.attentions)

    @classmethod
    def from_open_clip(cls, model: nn.Module) -> TextEncoder:
        """Convert the text tower of an open_clip `CLIP` (or a `CustomTextCLIP` whose
        `model.text` is a `TextTransformer`) into a TextEncoder with equal `encode_text`."""
        from open_clip import CustomTextCLIP

        return _from_open_clip(cls, model.text if isinstance(model, CustomTextCLIP) else model)


_POOLS = {"argmax": "eot", "eos": "eot", "first": "cls"}
# open_clip residual-block parameter prefixes -> ours (`TransformerBlock`)
OPEN_CLIP_BLOCK_RENAMES = {
    "ln_1.": "norm1.",
    "ln_2.": "norm2.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def _from_open_clip(cls: type[TextEncoder], tower: nn.Module) -> TextEncoder:
    from open_clip.transformer import QuickGELU

    def unsupported(what: str) -> ValueError:
        return ValueError(f"cannot convert this open_clip text tower: {what}")

    blocks = tower.transformer.resblocks
    first = blocks[0]
    pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", None)
    if pool_type not in _POOLS:
        raise unsupported(f"pool type {pool_type!r}; supported: {sorted(_POOLS)}")
    if getattr(tower, "cls_emb", None) is not None:
        raise unsupported("a learned class embedding is not supported")
    if not isinstance(first.ls_1, nn.Identity):
        raise unsupported("layer scale is not supported")
    act = first.mlp.gelu
    if isinstance(act, QuickGELU):
        activation = "quick_gelu"
    elif isinstance(act, nn.GELU) and act.approximate == "none":
        activation = "gelu"
    else:
        raise unsupported(f"activation {act!r}")
    width = tower.token_embedding.embedding_dim
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        out_dim, proj_weight = projection.out_features, projection.weight
    elif projection is not None:
        out_dim, proj_weight = projection.shape[1], projection.T
    else:
        out_dim, proj_weight = None, None
    config = TextConfig(
        vocab_size=tower.token_embedding.num_embeddings,
        pad_id=getattr(tower, "pad_id", 0),
        transformer=TransformerConfig(
            dim=width,
            n_layers=len(blocks),
            n_heads=first.attn.num_heads,
            causal=tower.attn_mask is not None,
            position="learned",
            max_positions=tower.positional_embedding.shape[0],
            activation=activation,
            mlp_hidden_dim=first.mlp.c_fc.out_features,
            norm_eps=first.ln_1.eps,
        ),
    )
    encoder = cls(config, pool=_POOLS[pool_type], out_dim=out_dim)
    state = {
        "embed.token.weight": tower.token_embedding.weight,
        "transformer.position_embedding.weight": tower.positional_embedding,
        "transformer.norm.weight": tower.ln_final.weight,
        "transformer.norm.bias": tower.ln_final.bias,
    }
    if proj_weight is not None:
        state["projection.weight"] = proj_weight
    for i, block in enumerate(blocks):
        for name, tensor in block.state_dict().items():
            new = next(
                (
                    new + name[len(old) :]
                    for old, new in OPEN_CLIP_BLOCK_RENAMES.items()
                    if name.startswith(old)
                ),
                None,
            )
            if new is None:
                raise unsupported(f"no counterpart for parameter {name!r}")
            state[f"transformer.blocks.{i}.{new}"] = tensor
    encoder.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return encoder
