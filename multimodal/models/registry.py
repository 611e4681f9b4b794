"""Named architectures: `create("clip_vit_b16")` builds a published model from our own modules.

A preset is a plain function registered with `@register_model`. Its keyword parameters are
the overrides it accepts (published values as defaults) and its return annotation names the
class it builds, so the same function serves Python and YAML:

    model = create("vit_b16", image_size=384)
    model = create("clip_vit_b32", vision={"drop_path": 0.1}, text={"n_layers": 6})

    # a LightningCLI config: jsonargparse accepts a function returning the expected class
    model:
      class_path: multimodal.models.registry.clip_vit_b32
      init_args: {image_size: 384}

Besides a few flat knobs (`image_size`, `context_length`, `vocab_size`, `dropout`, ...), each
tower takes a dict of config fields applied last (so they win): `vision` sets `vision.ViTConfig`
fields, `text` / `decoder` set `text.TextConfig` or `multimodal.layers.TransformerConfig`
fields. Unknown names raise ValueError with the closest valid ones. Presets set numbers only;
the modules are the project's (`vision.ViT`, `text.*`, `CLIP`, `Captioner`).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from typing import Any, TypeVar

from torch import nn

from multimodal.layers import TransformerConfig
from multimodal.models.captioner import Captioner
from multimodal.models.clip import CLIP
from text.config import TextConfig
from text.decoder import DecoderLM
from text.encoder import EncoderLM
from text.encoder_decoder import EncoderDecoderLM
from text.text_encoder import TextEncoder
from vision.vit import ViT, ViTConfig

Overrides = dict[str, Any] | None  # config field -> value, applied after the preset's numbers
Preset = TypeVar("Preset", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
GPT2_END_OF_TEXT = 50256  # GPT-2's only special id


def register_model(
    fn: Preset | None = None, *, name: str | None = None
) -> Preset | Callable[[Preset], Preset]:
    """Register a preset function under `name` (default: the function's name).

    Usable bare (`@register_model`) or with a name (`@register_model(name="my_vit")`); returns
    the function unchanged. Give it keyword parameters for its overrides and a return
    annotation, so `create` can check overrides and a YAML `class_path` can name it.
    """

    def add(function: Preset) -> Preset:
        key = name or function.__name__
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = function
        return function

    return add if fn is None else add(fn)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` filters them shell-style (`"clip_*"`)."""
    names = sorted(_MODELS)
    return names if pattern is None else fnmatch.filter(names, pattern)


def create(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`, with keyword overrides of its preset.

    Raises ValueError for an unknown name or override, naming it and the closest valid ones.
    """
    if name not in _MODELS:
        raise _unknown("unknown model", name, _MODELS, f"registered: {list_models()}")
    preset = _MODELS[name]
    parameters = inspect.signature(preset).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [
        key
        for key, p in parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for key in overrides:
        if key not in accepted and not takes_any:
            raise _unknown(f"{name!r} has no override", key, accepted, f"it accepts: {accepted}")
    return preset(**overrides)


def _unknown(lead: str, key: str, valid: Iterable[str], listing: str) -> ValueError:
    """ValueError "<lead> <key>; did you mean <closest of valid>? (<listing>)"."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"{lead} {key!r}{hint} ({listing})")


def _check_keys(overrides: dict[str, Any], valid: list[str], where: str) -> None:
    for key in overrides:
        if key not in valid:
            raise _unknown(f"{where} has no field", key, valid, f"its fields: {sorted(valid)}")


def _vit_config(config: ViTConfig, overrides: Overrides) -> ViTConfig:
    """`config` with the `vision` overrides (ViTConfig fields) applied."""
    overrides = overrides or {}
    _check_keys(overrides, [f.name for f in fields(ViTConfig)], "vision (ViTConfig)")
    return replace(config, **overrides)


def _clip_vit_config(patch_size: int, image_size: int, overrides: Overrides) -> ViTConfig:
    """OpenAI CLIP's ViT-B image tower (open_clip's): ln_pre, bias-free patch embedding."""
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        dim=768,
        n_layers=12,
        n_heads=12,
        pool="token",
        pre_norm=True,
        patch_bias=False,
        norm_eps=1e-5,
    )
    return _vit_config(config, overrides)


def _text_config(config: TextConfig, overrides: Overrides, where: str) -> TextConfig:
    """`config` with `overrides` applied: each key a TextConfig or a TransformerConfig field."""
    overrides = dict(overrides or {})
    text_fields = [f.name for f in fields(TextConfig) if f.name != "transformer"]
    stack_fields = [f.name for f in fields(TransformerConfig)]
    _check_keys(overrides, text_fields + stack_fields, f"{where} (TextConfig, TransformerConfig)")
    stack = {key: overrides.pop(key) for key in list(overrides) if key in stack_fields}
    return replace(config, transformer=replace(config.transformer, **stack), **overrides)


def _dropouts(rate: float) -> dict[str, float]:
    """One dropout rate on residual branches, attention weights and input embeddings, as
    BERT, GPT-2 and T5 were trained."""
    return {"dropout": rate, "attn_dropout": rate, "input_dropout": rate}


# --- CLIP (open_clip's ViT-B-32 / ViT-B-16 configs: GELU, no QuickGELU) -----------------------


def _clip(
    patch_size: int,
    image_size: int,
    context_length: int,
    embed_dim: int,
    vision: Overrides,
    text: Overrides,
) -> CLIP:
    vision_config = _clip_vit_config(patch_size, image_size, vision)
    text_config = TextConfig(
        vocab_size=49408,  # the CLIP tokenizer; pad id 0, end-of-text pooled
        transformer=TransformerConfig(
            dim=512,
            n_layers=12,
            n_heads=8,
            causal=True,
            position="learned",
            max_positions=context_length,
        ),
    )
    text_config = _text_config(text_config, text, "text")  # every override checked, then built
    return CLIP(ViT(vision_config), TextEncoder(text_config, pool="eot"), embed_dim)


@register_model
def clip_vit_b32(
    *,
    image_size: int = 224,
    context_length: int = 77,
    embed_dim: int = 512,
    vision: Overrides = None,
    text: Overrides = None,
) -> CLIP:
    """CLIP ViT-B/32 (Radford et al. 2021) as open_clip's `ViT-B-32`: 151,277,313 parameters,
    the same tensors (ln_pre, bias-free patch embedding, 12 x 768 image tower, 12 x 512 causal
    text tower pooled at end-of-text, bias-free projections, logit scale)."""
    return _clip(32, image_size, context_length, embed_dim, vision, text)


@register_model
def clip_vit_b16(
    *,
    image_size: int = 224,
    context_length: int = 77,
    embed_dim: int = 512,
    vision: Overrides = None,
    text: Overrides = None,
) -> CLIP:
    """CLIP ViT-B/16 as open_clip's `ViT-B-16`: 149,620,737 parameters, as `clip_vit_b32` with
    16-pixel patches."""
    return _clip(16, image_size, context_length, embed_dim, vision, text)


# --- Vision -------------------------------------------------------------------------------


@register_model
def vit_b16(*, image_size: int = 224, drop_path: float = 0.0, vision: Overrides = None) -> ViT:
    """ViT-B/16 (Dosovitskiy et al. 2021) as timm's `vit_base_patch16_224`: the tower without
    its classification head, 85,798,656 parameters; with `ImageClassificationModel(tower,
    1000)` (what `tasks.ImageClassifier` adds) 86,567,656, timm's count exactly. Returning the
    tower lets `ImageClassifier`, `CLIP` and `Captioner` configs use it."""
    config = ViTConfig(
        image_size=image_size, patch_size=16, dim=768, n_layers=12, n_heads=12, drop_path=drop_path
    )
    return ViT(_vit_config(config, vision))


# --- Text ---------------------------------------------------------------------------------


@register_model
def bert_base(
    *,
    vocab_size: int = 30522,
    max_positions: int = 512,
    dropout: float = 0.1,
    text: Overrides = None,
) -> EncoderLM:
    """BERT-base (Devlin et al. 2019; bert-base-uncased): post-norm, embedding LayerNorm,
    2 segments, 512 learned positions, exact GELU. 108,891,648 parameters: Hugging Face's
    `BertModel` (109,482,240) less its pooler (768 x 768 + tanh), which here belongs to
    `text.NextSentenceHead`; the paper's "110M" rounds the pretraining model with its heads."""
    config = TextConfig(
        vocab_size=vocab_size,
        n_segments=2,
        transformer=TransformerConfig(
            dim=768,
            n_layers=12,
            n_heads=12,
            position="learned",
            max_positions=max_positions,
            norm_order="post",
            input_norm=True,
            norm_eps=1e-12,
            **_dropouts(dropout),
        ),
    )
    return EncoderLM(_text_config(config, text, "text"))


@register_model
def gpt2_124m(
    *,
    vocab_size: int = 50257,
    max_positions: int = 1024,
    dropout: float = 0.1,
    text: Overrides = None,
) -> DecoderLM:
    """GPT-2 small (Radford et al. 2019): 12 x 768, pre-LayerNorm, tanh-approximated GELU,
    1,024 learned positions, tied embeddings; 124,439,808 parameters, Hugging Face's `gpt2`
    exactly. GPT-2's <|endoftext|> (50256) is bos, eos and pad while the vocabulary holds it
    (a smaller one keeps pad 0 and no bos/eos). `vocab_size=50304` is nanoGPT's padding."""
    end_of_text = GPT2_END_OF_TEXT if vocab_size > GPT2_END_OF_TEXT else None
    config = TextConfig(
        vocab_size=vocab_size,
        pad_id=0 if end_of_text is None else end_of_text,
        bos_id=end_of_text,
        eos_id=end_of_text,
        tie_embeddings=True,
        transformer=TransformerConfig(
            dim=768,
            n_layers=12,
            n_heads=12,
            causal=True,
            position="learned",
            max_positions=max_positions,
            activation="gelu_tanh",
            **_dropouts(dropout),
        ),
    )
    return DecoderLM(_text_config(config, text, "text"))


@register_model
def t5_small(
    *,
    vocab_size: int = 32128,
    max_positions: int = 512,
    dropout: float = 0.1,
    text: Overrides = None,
) -> EncoderDecoderLM:
    """T5-small (Raffel et al. 2020, the original t5-small): 6 + 6 layers of 512, 8 heads,
    ReLU feed-forward of 2,048, RMSNorm, no biases, 32 relative-position buckets per stack,
    tied embeddings with the dim^-0.5 output scale; 60,506,624 parameters, Hugging Face's
    `t5-small` exactly. Differs: T5 does not divide attention scores by sqrt(head_dim) (its
    initialisation absorbs it), our attention does; converted weights need q scaled by it.
    T5 has no length limit; `max_positions` bounds inputs here (T5 trained on 512)."""
    config = TextConfig(
        vocab_size=vocab_size,
        pad_id=0,  # also T5's decoder start
        eos_id=1,
        tie_embeddings=True,
        transformer=TransformerConfig(
            dim=512,
            n_layers=6,
            n_heads=8,
            position="t5",
            relative_buckets=32,
            relative_max_distance=128,
            max_positions=max_positions,
            activation="relu",
            mlp_hidden_dim=2048,
            norm="rmsnorm",
            norm_eps=1e-6,
            bias=False,
            **_dropouts(dropout),
        ),
    )
    return EncoderDecoderLM(_text_config(config, text, "text"), decoder_start_id=0)


# --- Vision-language ------------------------------------------------------------------------


@register_model
def coca_vit_b32(
    *,
    image_size: int = 224,
    context_length: int = 76,
    embed_dim: int = 512,
    vision: Overrides = None,
    text: Overrides = None,
    decoder: Overrides = None,
) -> Captioner:
    """CoCa ViT-B/32 (Yu et al. 2022) after open_clip's `coca_ViT-B-32` (253,560,065
    parameters), built as our `Captioner` with a contrastive text tower; within 1% of it.

    Same: ViT-B/32 image tower, 12 x 512 causal text tower, 12 x 512 caption decoder over
    the CLIP vocabulary, 512-d contrastive space. Differs (the Captioner's design): open_clip
    pools the image with a 256-query attentional pooler (query 0 contrastive, 255 for the
    decoder, 512 wide); here the class token is the contrastive feature and the decoder
    attends to it and the 49 patch tokens (768 wide). open_clip's text tower pools an
    appended class token; here its end-of-text token. open_clip's decoder reads the text
    tower's states and each layer is a self-attention block and a cross-attention block,
    each with a 2,048-wide feed-forward, under an untied output projection; here the decoder
    embeds the tokens itself (tied with its output) and each layer has self-attention,
    cross-attention and one 4,096-wide feed-forward (the same weights and FLOPs as the two).
    Measured: 255,398,145 parameters, +0.7%.
    """
    vision_config = _clip_vit_config(32, image_size, vision)
    stack = TransformerConfig(
        dim=512, n_layers=12, n_heads=8, causal=True, position="learned",
        max_positions=context_length,
    )  # fmt: skip
    text_config = _text_config(TextConfig(vocab_size=49408, transformer=stack), text, "text")
    decoder_config = TextConfig(
        vocab_size=49408,
        pad_id=0,
        bos_id=49406,  # the CLIP tokenizer's start / end of text
        eos_id=49407,
        tie_embeddings=True,
        transformer=replace(
            stack, cross_attention=True, context_dim=vision_config.dim, mlp_ratio=8.0
        ),
    )
    decoder_config = _text_config(decoder_config, decoder, "decoder")
    return Captioner(
        ViT(vision_config),
        DecoderLM(decoder_config),
        text_tower=TextEncoder(text_config, pool="eot"),
        embed_dim=embed_dim,
    )
