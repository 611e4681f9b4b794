"""Hugging Face BERT / GPT-2 / T5 -> our EncoderLM / DecoderLM / EncoderDecoderLM: the config
read off the Hugging Face config, the weights renamed by an explicit key map.

`transformers` is an optional extra (`pip install 'multimodal[hf]'`), imported only when a
converter runs. A source is an in-memory `transformers` model or a directory written by its
`save_pretrained` (read offline). Three exact re-parametrisations keep our layers unchanged:
BERT's token-type row 0 (added by Hugging Face when no token types are given) is folded into
the position embeddings, so both calls agree with and without segment ids; T5's unscaled
attention scores become ours by scaling its query weights by sqrt(d_kv); an output scale that
our untied head lacks is folded into the head's weight.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from multimodal.layers import TransformerConfig
from text.config import TextConfig
from text.decoder import DecoderLM
from text.encoder import EncoderLM
from text.encoder_decoder import EncoderDecoderLM
from text.heads import MaskedLMHead

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    Source = PreTrainedModel | str | os.PathLike[str]

# Hugging Face activation names (transformers.activations.ACT2FN) -> ours
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
# T5 feed-forward (is_gated_act, dense_act_fn) -> ours
_T5_FEED_FORWARD = {
    (False, "relu"): "relu",
    (False, "gelu"): "gelu",
    (False, "gelu_new"): "gelu_tanh",
    (True, "gelu"): "geglu",
    (True, "gelu_new"): "geglu_tanh",
    (True, "silu"): "swiglu",
}


def _transformers() -> Any:
    """The `transformers` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "converting Hugging Face models needs the optional `transformers` package: "
            "pip install 'multimodal[hf]'"
        ) from err
    return transformers


def _unsupported(family: str, field: str, value: object, supported: object = None) -> ValueError:
    choices = "" if supported is None else f"; supported: {supported}"
    return ValueError(
        f"cannot convert this {family} model: {field}={value!r} is not supported{choices}"
    )


def _load(
    source: Source, model_type: str, classes: tuple[str, ...], fallback: str | None = None
) -> PreTrainedModel:
    """The model itself, or loaded offline from a `save_pretrained` directory as its saved
    architecture, or as `fallback` when that is none of `classes` (a backbone whose weights a
    fine-tuned task model holds). Raises ValueError for another model type or class."""
    tf = _transformers()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a save_pretrained directory: it has no config.json")
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != model_type:
            raise ValueError(
                f"expected a {model_type} model, got config.model_type={config.model_type!r} "
                f"in {path / 'config.json'}"
            )
        saved = (config.architectures or [fallback or classes[0]])[0]
        name = saved if saved in classes else fallback
        if name is None:
            raise ValueError(
                f"cannot convert {saved} (config.architectures in {path / 'config.json'}): "
                f"supported {model_type} classes are {list(classes)}"
            )
        source = getattr(tf, name).from_pretrained(path, local_files_only=True)
    if not isinstance(source, tf.PreTrainedModel):
        raise ValueError(
            f"expected a transformers model or a save_pretrained directory, got "
            f"{type(source).__name__}"
        )
    if source.config.model_type != model_type:
        raise ValueError(
            f"expected a {model_type} model, got config.model_type={source.config.model_type!r}"
        )
    if type(source).__name__ not in classes:
        raise ValueError(
            f"cannot convert {type(source).__name__}: supported {model_type} classes are "
            f"{list(classes)}"
        )
    return source


def _token_id(config: PretrainedConfig, field: str, default: int | None = None) -> int | None:
    """A special token id of the Hugging Face config, checked against its vocabulary."""
    value = getattr(config, field, None)
    if isinstance(value, list):  # several end ids: we keep one, the first
        value = value[0] if value else None
    if value is None:
        return default
    if not 0 <= value < config.vocab_size:
        raise ValueError(
            f"{type(config).__name__}.{field}={value} is outside the vocabulary "
            f"[0, vocab_size={config.vocab_size})"
        )
    return value


def _check_heads(family: str, dim: int, n_heads: int, field: str) -> None:
    if n_heads <= 0 or dim % n_heads:
        raise _unsupported(family, field, n_heads, f"a divisor of the width {dim}")


# --- the key map ----------------------------------------------------------------------------


def _same(t: Tensor) -> Tensor:
    return t


def _transposed(t: Tensor) -> Tensor:  # GPT-2's Conv1D stores (in, out)
    return t.t()


def _concat(*ts: Tensor) -> Tensor:
    return torch.cat(ts, dim=0)


class _Copy(NamedTuple):
    """Our parameter made of these Hugging Face tensors by `combine`."""

    sources: tuple[str, ...]
    combine: Callable[..., Tensor] = _same


def _copy(*sources: str, combine: Callable[..., Tensor] = _same) -> _Copy:
    return _Copy(sources, combine)


def _apply_key_map(
    family: str,
    hf_state: dict[str, Tensor],
    key_map: dict[str, _Copy],
    ignored: tuple[str, ...],
) -> dict[str, Tensor]:
    """Build our state dict by `key_map`; every Hugging Face key must be used or match one of
    the `ignored` regular expressions (non-weights, heads we do not carry over)."""
    state, used = {}, set()
    for ours, (sources, combine) in key_map.items():
        for key in sources:
            if key not in hf_state:
                raise ValueError(
                    f"cannot convert this {family} model: Hugging Face key {key!r} "
                    f"(for our {ours!r}) is missing"
                )
        state[ours] = combine(*(hf_state[key].float() for key in sources))
        used.update(sources)
    for key in hf_state:
        if key not in used and not any(re.fullmatch(p, key) for p in ignored):
            raise ValueError(
                f"cannot convert this {family} model: no counterpart for Hugging Face key {key!r}"
            )
    return state


def _load_state(family: str, model: nn.Module, state: dict[str, Tensor]) -> None:
    """load_state_dict that names the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ValueError(f"cannot convert this {family} model: nothing for our key {key!r}")
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"cannot convert this {family} model: our {key!r} has shape "
                f"{tuple(tensor.shape)}, the converted weight {tuple(state[key].shape)}"
            )
    for key in state:
        if key not in expected:
            raise ValueError(f"cannot convert this {family} model: we have no key {key!r}")
    model.load_state_dict(state, strict=True)


def _tied(hf_state: dict[str, Tensor], head: str, embedding: str) -> bool:
    """Whether the output projection `head` is the input embedding (absent = tied)."""
    if head not in hf_state:
        return True
    return hf_state[head].shape == hf_state[embedding].shape and torch.equal(
        hf_state[head], hf_state[embedding]
    )


def _without_prefix(model: PreTrainedModel, prefix: str) -> dict[str, Tensor]:
    """The model's state dict with the backbone prefix ("bert.", "transformer.") dropped."""
    return {k.removeprefix(prefix): v for k, v in model.state_dict().items()}


# --- BERT -----------------------------------------------------------------------------------

_BERT = "BERT"
_BERT_CLASSES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
# left out: buffers, the pooler and the next-sentence classifier (the MLM head has its own
# converter, `bert_mlm_head_from_hf`)
_BERT_IGNORED = (
    r"embeddings\.(position_ids|token_type_ids)",
    r"pooler\..*",
    r"cls\..*",
)


def bert_config_from_hf(config: PretrainedConfig) -> TextConfig:
    """Our TextConfig of a Hugging Face BertConfig: post-norm, learned positions, an
    embedding LayerNorm; raise ValueError naming the field we cannot follow."""
    name = type(config).__name__
    if config.model_type != "bert":
        raise ValueError(f"expected a bert config, got model_type={config.model_type!r}")
    for field in ("is_decoder", "add_cross_attention"):
        if getattr(config, field, False):
            raise _unsupported(_BERT, f"{name}.{field}", True, "False (an encoder)")
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise _unsupported(_BERT, f"{name}.position_embedding_type", position, ["absolute"])
    if config.hidden_act not in _ACTIVATIONS:
        raise _unsupported(_BERT, f"{name}.hidden_act", config.hidden_act, sorted(_ACTIVATIONS))
    _check_heads(
        _BERT, config.hidden_size, config.num_attention_heads, f"{name}.num_attention_heads"
    )
    transformer = TransformerConfig(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        position="learned",
        max_positions=config.max_position_embeddings,
        activation=_ACTIVATIONS[config.hidden_act],
        mlp_hidden_dim=config.intermediate_size,
        norm="layernorm",
        norm_eps=config.layer_norm_eps,
        norm_order="post",
        input_norm=True,
        bias=True,
        dropout=config.hidden_dropout_prob,
        attn_dropout=config.attention_probs_dropout_prob,
        input_dropout=config.hidden_dropout_prob,
    )
    return TextConfig(
        vocab_size=config.vocab_size,
        transformer=transformer,
        pad_id=_token_id(config, "pad_token_id", 0),
        # one token type is folded into the positions entirely (see the module docstring)
        n_segments=config.type_vocab_size if config.type_vocab_size > 1 else 0,
        tie_embeddings=config.tie_word_embeddings,
    )


def bert_state_dict_from_hf(model: PreTrainedModel) -> dict[str, Tensor]:
    """Hugging Face BERT parameter names -> those of our EncoderLM."""
    hf = _without_prefix(model, "bert.")
    n_types = model.config.type_vocab_size
    types = "embeddings.token_type_embeddings.weight"

    def positions_plus_type0(pos: Tensor, token_types: Tensor) -> Tensor:
        return pos + token_types[0]

    def types_minus_type0(token_types: Tensor) -> Tensor:
        return token_types - token_types[0]

    key_map = {
        "embed.token.weight": _copy("embeddings.word_embeddings.weight"),
        "transformer.position_embedding.weight": _copy(
            "embeddings.position_embeddings.weight", types, combine=positions_plus_type0
        ),
        "transformer.input_norm.weight": _copy("embeddings.LayerNorm.weight"),
        "transformer.input_norm.bias": _copy("embeddings.LayerNorm.bias"),
    }
    if n_types > 1:
        key_map["embed.segment.weight"] = _copy(types, combine=types_minus_type0)
    for i in range(model.config.num_hidden_layers):
        hf_block, ours = f"encoder.layer.{i}.", f"transformer.blocks.{i}."
        attn = hf_block + "attention."
        for kind in ("weight", "bias"):
            key_map[f"{ours}attn.qkv.{kind}"] = _copy(
                *(f"{attn}self.{p}.{kind}" for p in ("query", "key", "value")), combine=_concat
            )
            key_map[f"{ours}attn.proj.{kind}"] = _copy(f"{attn}output.dense.{kind}")
            key_map[f"{ours}norm1.{kind}"] = _copy(f"{attn}output.LayerNorm.{kind}")
            key_map[f"{ours}mlp.fc1.{kind}"] = _copy(f"{hf_block}intermediate.dense.{kind}")
            key_map[f"{ours}mlp.fc2.{kind}"] = _copy(f"{hf_block}output.dense.{kind}")
            key_map[f"{ours}norm2.{kind}"] = _copy(f"{hf_block}output.LayerNorm.{kind}")
    return _apply_key_map(_BERT, hf, key_map, _BERT_IGNORED)


def bert_from_hf(source: Source) -> EncoderLM:
    """An EncoderLM with the configuration and weights of a Hugging Face BERT (`BertModel`,
    `BertForMaskedLM` or `BertForPreTraining`, or a save_pretrained directory of one).

    Its hidden states equal `BertModel`'s `last_hidden_state`, with or without segment ids
    (token_type_ids); the pooler and next-sentence head are left out."""
    model = _load(source, "bert", _BERT_CLASSES, fallback="BertModel")
    encoder = EncoderLM(bert_config_from_hf(model.config))
    _load_state(_BERT, encoder, bert_state_dict_from_hf(model))
    return encoder.eval()


def bert_mlm_head_from_hf(source: Source, encoder: EncoderLM) -> MaskedLMHead:
    """The masked-LM head of a Hugging Face `BertForMaskedLM` / `BertForPreTraining`, its
    decoder tied to `encoder`'s token embedding (when the Hugging Face model ties them), so
    `head(encoder(ids).hidden)` equals the Hugging Face MLM logits."""
    model = _load(source, "bert", _BERT_CLASSES[1:])
    config = model.config
    name = type(config).__name__
    if config.hidden_act != "gelu":  # our head's transform is dense + GELU + LayerNorm
        raise _unsupported(_BERT, f"{name}.hidden_act", config.hidden_act, "['gelu'] (MLM head)")
    if config.layer_norm_eps != 1e-12:
        raise _unsupported(_BERT, f"{name}.layer_norm_eps", config.layer_norm_eps, "1e-12")
    if encoder.config.vocab_size != config.vocab_size or encoder.config.dim != config.hidden_size:
        raise ValueError(
            f"the encoder ({encoder.config.vocab_size} tokens, dim {encoder.config.dim}) is not "
            f"this BERT's (vocab_size={config.vocab_size}, hidden_size={config.hidden_size})"
        )
    hf = model.state_dict()
    p = "cls.predictions."
    tied = _tied(hf, f"{p}decoder.weight", "bert.embeddings.word_embeddings.weight")
    head = MaskedLMHead(
        config.hidden_size, config.vocab_size, encoder.embed.token.weight if tied else None
    )
    key_map = {
        "transform.0.weight": _copy(f"{p}transform.dense.weight"),
        "transform.0.bias": _copy(f"{p}transform.dense.bias"),
        "transform.2.weight": _copy(f"{p}transform.LayerNorm.weight"),
        "transform.2.bias": _copy(f"{p}transform.LayerNorm.bias"),
        "decoder.weight": _copy(
            "bert.embeddings.word_embeddings.weight" if tied else f"{p}decoder.weight"
        ),
        "decoder.bias": _copy(f"{p}bias"),
    }
    ignored = (r"bert\..*", rf"{p}decoder\.(weight|bias)", r"cls\.seq_relationship\..*")
    state = _apply_key_map(_BERT, hf, key_map, ignored)
    _load_state(_BERT, head, state)
    return head.eval()


# --- GPT-2 ----------------------------------------------------------------------------------

_GPT2 = "GPT-2"
_GPT2_CLASSES = ("GPT2LMHeadModel", "GPT2Model")
_GPT2_IGNORED = (r"h\.\d+\.attn\.(bias|masked_bias)",)  # causal-mask buffers of older versions


def gpt2_config_from_hf(config: PretrainedConfig) -> TextConfig:
    """Our TextConfig of a Hugging Face GPT2Config: pre-norm, learned positions, tanh-GELU."""
    name = type(config).__name__
    if config.model_type != "gpt2":
        raise ValueError(f"expected a gpt2 config, got model_type={config.model_type!r}")
    if config.add_cross_attention:
        raise _unsupported(_GPT2, f"{name}.add_cross_attention", True, "False")
    if not config.scale_attn_weights:
        raise _unsupported(_GPT2, f"{name}.scale_attn_weights", False, "True")
    if config.scale_attn_by_inverse_layer_idx:
        raise _unsupported(_GPT2, f"{name}.scale_attn_by_inverse_layer_idx", True, "False")
    act = config.activation_function
    if act not in _ACTIVATIONS:
        raise _unsupported(_GPT2, f"{name}.activation_function", act, sorted(_ACTIVATIONS))
    _check_heads(_GPT2, config.n_embd, config.n_head, f"{name}.n_head")
    transformer = TransformerConfig(
        dim=config.n_embd,
        n_layers=config.n_layer,
        n_heads=config.n_head,
        causal=True,
        position="learned",
        max_positions=config.n_positions,
        activation=_ACTIVATIONS[act],
        mlp_hidden_dim=config.n_inner or 4 * config.n_embd,
        norm="layernorm",
        norm_eps=config.layer_norm_epsilon,
        norm_order="pre",
        bias=True,
        dropout=config.resid_pdrop,
        attn_dropout=config.attn_pdrop,
        input_dropout=config.embd_pdrop,
    )
    eos = _token_id(config, "eos_token_id")
    return TextConfig(
        vocab_size=config.vocab_size,
        transformer=transformer,
        pad_id=_token_id(config, "pad_token_id", eos if eos is not None else 0),
        bos_id=_token_id(config, "bos_token_id"),
        eos_id=eos,
        tie_embeddings=config.tie_word_embeddings,
    )


def gpt2_state_dict_from_hf(model: PreTrainedModel, tie_embeddings: bool) -> dict[str, Tensor]:
    """Hugging Face GPT-2 parameter names -> those of our DecoderLM."""
    hf = _without_prefix(model, "transformer.")
    key_map = {
        "embed.token.weight": _copy("wte.weight"),
        "transformer.position_embedding.weight": _copy("wpe.weight"),
        "transformer.norm.weight": _copy("ln_f.weight"),
        "transformer.norm.bias": _copy("ln_f.bias"),
        "lm_head.weight": _copy("wte.weight" if tie_embeddings else "lm_head.weight"),
    }
    for i in range(model.config.n_layer):
        hf_block, ours = f"h.{i}.", f"transformer.blocks.{i}."
        pairs = {
            "ln_1": "norm1",
            "attn.c_attn": "attn.qkv",
            "attn.c_proj": "attn.proj",
            "ln_2": "norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for theirs, our_name in pairs.items():
            conv = not theirs.startswith("ln")
            key_map[f"{ours}{our_name}.weight"] = _copy(
                f"{hf_block}{theirs}.weight", combine=_transposed if conv else _same
            )
            key_map[f"{ours}{our_name}.bias"] = _copy(f"{hf_block}{theirs}.bias")
    ignored = _GPT2_IGNORED + ((r"lm_head\.weight",) if tie_embeddings else ())
    return _apply_key_map(_GPT2, hf, key_map, ignored)


def gpt2_from_hf(source: Source) -> DecoderLM:
    """A DecoderLM with the configuration and weights of a Hugging Face GPT-2
    (`GPT2LMHeadModel` or `GPT2Model`, or a save_pretrained directory of one); its logits
    equal `GPT2LMHeadModel`'s."""
    model = _load(source, "gpt2", _GPT2_CLASSES, fallback="GPT2Model")
    config = gpt2_config_from_hf(model.config)
    hf = model.state_dict()
    if config.tie_embeddings and not _tied(hf, "lm_head.weight", "transformer.wte.weight"):
        raise ValueError(
            "cannot convert this GPT-2 model: GPT2Config.tie_word_embeddings=True but "
            "lm_head.weight differs from transformer.wte.weight"
        )
    decoder = DecoderLM(config)
    _load_state(_GPT2, decoder, gpt2_state_dict_from_hf(model, config.tie_embeddings))
    return decoder.eval()


# --- T5 -------------------------------------------------------------------------------------

_T5 = "T5"
_T5_CLASSES = ("T5ForConditionalGeneration",)


def t5_config_from_hf(config: PretrainedConfig, max_positions: int = 512) -> TextConfig:
    """Our TextConfig (the encoder's stack) of a Hugging Face T5Config: pre-norm RMSNorm, T5
    relative position buckets, no biases. `max_positions` is the longest input we accept
    (T5's relative positions set no limit)."""
    name = type(config).__name__
    if config.model_type != "t5":
        raise ValueError(f"expected a t5 config, got model_type={config.model_type!r}")
    gated, act = bool(config.is_gated_act), config.dense_act_fn
    if (gated, act) not in _T5_FEED_FORWARD:
        supported = sorted({("gated-" if g else "") + a for g, a in _T5_FEED_FORWARD})
        raise _unsupported(_T5, f"{name}.feed_forward_proj", config.feed_forward_proj, supported)
    if config.d_kv * config.num_heads != config.d_model:
        raise _unsupported(
            _T5,
            f"{name}.d_kv",
            config.d_kv,
            f"d_model / num_heads = {config.d_model / config.num_heads:g} (our attention "
            "projects to the model width)",
        )
    transformer = TransformerConfig(
        dim=config.d_model,
        n_layers=config.num_layers,
        n_heads=config.num_heads,
        position="t5",
        max_positions=max_positions,
        relative_buckets=config.relative_attention_num_buckets,
        relative_max_distance=config.relative_attention_max_distance,
        activation=_T5_FEED_FORWARD[gated, act],
        mlp_hidden_dim=config.d_ff,
        norm="rmsnorm",
        norm_eps=config.layer_norm_epsilon,
        norm_order="pre",
        bias=False,
        dropout=config.dropout_rate,
        attn_dropout=config.dropout_rate,
        input_dropout=config.dropout_rate,
    )
    return TextConfig(
        vocab_size=config.vocab_size,
        transformer=transformer,
        pad_id=_token_id(config, "pad_token_id", 0),
        eos_id=_token_id(config, "eos_token_id"),
        tie_embeddings=_t5_tied_and_scaled(config),
    )


def _t5_scaled(config: PretrainedConfig) -> bool:
    """Whether the decoder output is scaled by d_model^-0.5 before the head (original T5;
    transformers 5 reads it from `scale_decoder_outputs`, 4 from `tie_word_embeddings`)."""
    return bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))


def _t5_tied_and_scaled(config: PretrainedConfig) -> bool:
    return _t5_scaled(config) and bool(config.tie_word_embeddings)


def _t5_decoder_start(model: PreTrainedModel, default: int) -> int:
    """The first decoder input: transformers 5 keeps it in the generation config (and leaves
    it out for T5, which starts from the pad id), 4 in the model config."""
    for config in (model.generation_config, model.config):
        value = getattr(config, "decoder_start_token_id", None)
        if value is not None:
            if not 0 <= value < model.config.vocab_size:
                raise ValueError(
                    f"{type(config).__name__}.decoder_start_token_id={value} is outside the "
                    f"vocabulary [0, vocab_size={model.config.vocab_size})"
                )
            return value
    return default


def t5_state_dict_from_hf(model: PreTrainedModel, tie_embeddings: bool) -> dict[str, Tensor]:
    """Hugging Face T5 parameter names -> those of our EncoderDecoderLM. Query weights are
    scaled by sqrt(d_kv) (T5 does not scale its scores, our attention divides by sqrt(d))."""
    config = model.config
    q_scale = math.sqrt(config.d_kv)
    gated = bool(config.is_gated_act)

    def scaled_query(w: Tensor) -> Tensor:
        return w * q_scale

    def scaled_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.cat([q * q_scale, k, v], dim=0)

    def head(w: Tensor) -> Tensor:  # our untied head applies no output scale: fold it in
        return w * config.d_model**-0.5 if _t5_scaled(config) else w

    key_map = {
        "embed.token.weight": _copy("shared.weight"),
        "lm_head.weight": _copy("shared.weight")
        if tie_embeddings
        else _copy("lm_head.weight", combine=head),
    }
    for stack, n_layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        key_map[f"{stack}.position_bias.embedding.weight"] = _copy(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
        key_map[f"{stack}.norm.weight"] = _copy(f"{stack}.final_layer_norm.weight")
        for i in range(n_layers):
            hf_block, ours = f"{stack}.block.{i}.layer.", f"{stack}.blocks.{i}."
            attn = f"{hf_block}0.SelfAttention."
            key_map[f"{ours}attn.qkv.weight"] = _copy(
                f"{attn}q.weight", f"{attn}k.weight", f"{attn}v.weight", combine=scaled_qkv
            )
            key_map[f"{ours}attn.proj.weight"] = _copy(f"{attn}o.weight")
            key_map[f"{ours}norm1.weight"] = _copy(f"{hf_block}0.layer_norm.weight")
            ff = 1
            if stack == "decoder":
                cross = f"{hf_block}1.EncDecAttention."
                key_map[f"{ours}cross_attn.q.weight"] = _copy(
                    f"{cross}q.weight", combine=scaled_query
                )
                key_map[f"{ours}cross_attn.kv.weight"] = _copy(
                    f"{cross}k.weight", f"{cross}v.weight", combine=_concat
                )
                key_map[f"{ours}cross_attn.proj.weight"] = _copy(f"{cross}o.weight")
                key_map[f"{ours}cross_norm.weight"] = _copy(f"{hf_block}1.layer_norm.weight")
                ff = 2
            dense = f"{hf_block}{ff}.DenseReluDense."
            wi = (f"{dense}wi_0.weight", f"{dense}wi_1.weight") if gated else (f"{dense}wi.weight",)
            key_map[f"{ours}mlp.fc1.weight"] = _copy(*wi, combine=_concat)  # gate, then up
            key_map[f"{ours}mlp.fc2.weight"] = _copy(f"{dense}wo.weight")
            key_map[f"{ours}norm2.weight"] = _copy(f"{hf_block}{ff}.layer_norm.weight")
    # the stacks' embeddings are `shared` (checked by t5_from_hf); a tied head is too
    ignored = (r"(encoder|decoder)\.embed_tokens\.weight",)
    if tie_embeddings:
        ignored += (r"lm_head\.weight",)
    return _apply_key_map(_T5, model.state_dict(), key_map, ignored)


def t5_from_hf(source: Source, *, max_positions: int = 512) -> EncoderDecoderLM:
    """An EncoderDecoderLM with the configuration and weights of a Hugging Face
    `T5ForConditionalGeneration` (or a save_pretrained directory of one); its teacher-forced
    logits equal the Hugging Face model's. `max_positions`: the longest input we accept."""
    model = _load(source, "t5", _T5_CLASSES)
    config = t5_config_from_hf(model.config, max_positions)
    hf = model.state_dict()
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        if key in hf and not torch.equal(hf[key], hf["shared.weight"]):
            raise ValueError(f"cannot convert this T5 model: {key!r} differs from 'shared.weight'")
    if config.tie_embeddings and not _tied(hf, "lm_head.weight", "shared.weight"):
        config.tie_embeddings = False  # scaled but untied: the scale goes into the head
    seq2seq = EncoderDecoderLM(
        config,
        decoder_layers=model.config.num_decoder_layers,
        decoder_start_id=_t5_decoder_start(model, config.pad_id),
    )
    _load_state(_T5, seq2seq, t5_state_dict_from_hf(model, config.tie_embeddings))
    return seq2seq.eval()
