"""Hugging Face BERT / GPT-2 / T5 converted to our text models: outputs equal those of the
randomly initialised (then jittered) transformers models they come from, in memory and through
a save_pretrained directory; unsupported configurations name the field."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face converters need the optional extra multimodal[hf]"
)

from text.hf_convert import (  # noqa: E402
    bert_config_from_hf,
    bert_from_hf,
    bert_mlm_head_from_hf,
    gpt2_config_from_hf,
    gpt2_from_hf,
    t5_config_from_hf,
    t5_from_hf,
)

TOL = 1e-4  # max abs difference in fp32
VOCAB = 97


def jitter(model: nn.Module) -> nn.Module:
    """Perturb every parameter, so that unit norms and zero biases cannot hide a wrong map."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def small_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=24,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    return jitter(transformers.BertForMaskedLM(config))


def small_gpt2(**kwargs) -> nn.Module:
    config = transformers.GPT2Config(
        **kwargs,
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=24,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return jitter(transformers.GPT2LMHeadModel(config))


def small_t5(feed_forward_proj: str = "relu", **kwargs) -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
        **kwargs,
    )
    torch.manual_seed(0)
    return jitter(transformers.T5ForConditionalGeneration(config))


def batch(lengths: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T) in [3, VOCAB) and a right-padded mask with these real lengths."""
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (len(lengths), T))
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


@torch.no_grad()
def test_bert_hidden_states_and_mlm_logits_equal_transformers():
    hf = small_bert()
    ours = bert_from_hf(hf)
    head = bert_mlm_head_from_hf(hf, ours)
    ids, mask = batch([12, 7, 12], 12)
    segments = (torch.arange(12) >= 5).long().expand(3, -1) * mask
    ref = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=segments)
    ref_hidden = hf.bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=segments)
    out = ours(ids, attention_mask=mask, segment_ids=segments)
    real = mask[..., None]
    assert max_diff(out.hidden * real, ref_hidden.last_hidden_state * real) <= TOL
    assert max_diff(head(out.hidden) * real, ref.logits * real) <= TOL
    # no token types: Hugging Face adds type 0, which our positions hold
    ref_hidden = hf.bert(input_ids=ids[:1]).last_hidden_state
    assert max_diff(ours(ids[:1]).hidden, ref_hidden) <= TOL
    assert head.decoder.weight is ours.embed.token.weight


@torch.no_grad()
def test_gpt2_logits_equal_transformers_with_and_without_padding():
    hf = small_gpt2()
    ours = gpt2_from_hf(hf)
    assert ours.lm_head.weight is ours.embed.token.weight
    ids, mask = batch([10, 6], 10)
    assert max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL
    # right padding: the real tokens' logits
    real = mask[..., None]
    ref = hf(input_ids=ids, attention_mask=mask.long()).logits
    assert max_diff(ours(ids, attention_mask=mask).logits * real, ref * real) <= TOL
    # left padding, positions counted from each row's first real token
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    positions = (left_mask.long().cumsum(1) - 1).clamp(min=0)
    ref = hf(input_ids=left_ids, attention_mask=left_mask.long(), position_ids=positions).logits
    out = ours(left_ids, attention_mask=left_mask, positions=positions).logits
    real = left_mask[..., None]
    assert max_diff(out * real, ref * real) <= TOL


@torch.no_grad()
def test_gpt2_with_its_own_output_matrix():
    hf = small_gpt2(tie_word_embeddings=False)
    ours = gpt2_from_hf(hf)
    assert ours.lm_head.weight is not ours.embed.token.weight
    ids, _ = batch([8], 8)
    assert max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL


def untie_head(model: nn.Module) -> nn.Module:
    """A T5 whose output projection is its own (scaled) matrix, not the embedding."""
    torch.manual_seed(3)
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: small_t5("relu"), id="t5-relu-tied"),
        pytest.param(lambda: small_t5("gated-gelu", tie_word_embeddings=False), id="v1.1-unscaled"),
        pytest.param(lambda: untie_head(small_t5("gated-silu")), id="swiglu-own-head"),
    ],
)
@torch.no_grad()
def test_t5_logits_equal_transformers(make):
    hf = make()
    ours = t5_from_hf(hf)
    src, src_mask = batch([9, 5], 9)
    tgt, tgt_mask = batch([6, 4], 6)
    tgt[:, 0] = ours.decoder_start_id
    ref = hf(
        input_ids=src,
        attention_mask=src_mask.long(),
        decoder_input_ids=tgt,
        decoder_attention_mask=tgt_mask.long(),
    )
    out = ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
    real = tgt_mask[..., None]
    assert max_diff(out.logits * real, ref.logits * real) <= TOL
    assert ours.decoder_start_id == hf.config.pad_token_id  # T5 starts from the pad id
    assert len(ours.decoder.blocks) == 3


@pytest.mark.parametrize(
    "make,convert",
    [(small_bert, bert_from_hf), (small_gpt2, gpt2_from_hf), (small_t5, t5_from_hf)],
    ids=["bert", "gpt2", "t5"],
)
def test_save_pretrained_directory_converts_like_the_model(tmp_path, make, convert):
    hf = make()
    hf.save_pretrained(tmp_path)
    from_dir, from_model = convert(tmp_path).state_dict(), convert(hf).state_dict()
    assert from_dir.keys() == from_model.keys()
    for key, tensor in from_model.items():
        torch.testing.assert_close(from_dir[key], tensor, rtol=0, atol=0, msg=key)


def test_bert_mlm_head_from_a_directory_without_one_is_refused(tmp_path):
    small_bert().bert.save_pretrained(tmp_path)  # a BertModel
    encoder = bert_from_hf(tmp_path)
    with pytest.raises(ValueError, match="BertModel"):
        bert_mlm_head_from_hf(tmp_path, encoder)


def test_wrong_model_type_names_it(tmp_path):
    with pytest.raises(ValueError, match="model_type='bert'"):
        gpt2_from_hf(small_bert())
    small_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        t5_from_hf(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        bert_from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "convert,config,field",
    [
        (bert_config_from_hf, transformers.BertConfig(hidden_act="silu"), "hidden_act='silu'"),
        (bert_config_from_hf, transformers.BertConfig(is_decoder=True), "is_decoder"),
        (
            gpt2_config_from_hf,
            transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True),
            "scale_attn_by_inverse_layer_idx",
        ),
        (gpt2_config_from_hf, transformers.GPT2Config(vocab_size=100), "eos_token_id=50256"),
        (
            t5_config_from_hf,
            transformers.T5Config(feed_forward_proj="gated-relu"),
            "feed_forward_proj='gated-relu'",
        ),
        (t5_config_from_hf, transformers.T5Config(d_model=512, num_heads=6, d_kv=64), "d_kv=64"),
    ],
)
def test_unsupported_config_names_the_field(convert, config, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        convert(config)


def test_weights_that_do_not_fit_are_named():
    hf = small_gpt2()
    hf.transformer.h[1].attn.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"'h\.1\.attn\.extra'"):
        gpt2_from_hf(hf)
    hf = small_gpt2()
    hf.config.n_inner = 64  # the config no longer describes the weights (4 * 32 wide)
    with pytest.raises(ValueError, match=r"'transformer\.blocks\.0\.mlp\.fc1\.weight'"):
        gpt2_from_hf(hf)


def test_without_transformers_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'multimodal\[hf\]'"):
        gpt2_from_hf("any/dir")
