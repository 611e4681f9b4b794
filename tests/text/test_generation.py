"""Generation: KV cache vs recomputation, left padding, greedy against a naive loop, beam search
against exhaustive search, eos handling, sampling filters and config validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from multimodal.layers import TransformerConfig
from text import DecoderLM, EncoderDecoderLM, LMOutput, TextConfig
from text.generation import GenerationConfig, generate, process_logits

VOCAB = 50


def lively(model: torch.nn.Module) -> torch.nn.Module:
    """Larger embedding and output weights than the training init, so that a random model's
    next-token distribution is peaked and depends on the context: varied sequences and no
    near-ties that float rounding could flip."""
    with torch.no_grad():
        model.embed.token.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def decoder(vocab: int = VOCAB, **overrides) -> DecoderLM:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, causal=True, position="rope")
    text = TextConfig(
        vocab_size=vocab, tie_embeddings=False, transformer=TransformerConfig(**base | overrides)
    )
    return lively(DecoderLM(text))


def encoder_decoder(vocab: int = VOCAB) -> EncoderDecoderLM:
    stack = TransformerConfig(
        dim=32, n_layers=2, n_heads=4, position="t5", norm="rmsnorm", activation="relu", bias=False
    )
    config = TextConfig(vocab_size=vocab, tie_embeddings=False, bos_id=1, transformer=stack)
    return lively(EncoderDecoderLM(config))


MODELS = {
    "rope-gqa": lambda: decoder(),
    "learned": lambda: decoder(n_kv_heads=None, position="learned", max_positions=40),
    "cross": lambda: decoder(cross_attention=True, context_dim=24),  # a captioner's decoder
    "t5-encdec": encoder_decoder,
}


def inputs_for(model: torch.nn.Module, batch: int, length: int) -> dict:
    """Random prompts (or sources) and, for cross-attention decoders, a padded context."""
    kwargs: dict = {"input_ids": torch.randint(2, VOCAB, (batch, length))}
    if isinstance(model, DecoderLM) and model.config.transformer.cross_attention:
        kwargs["context"] = torch.randn(batch, 5, 24)
        kwargs["context_padding_mask"] = torch.arange(5) < torch.tensor([[5], [3], [4]])[:batch]
    return kwargs


@torch.no_grad()
def log_likelihood(model: DecoderLM, prompt: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probs (N, T_new) of tokens `new` (N, T_new) after `prompt` (N, T)."""
    logits = model(torch.cat([prompt, new], dim=1)).logits[:, prompt.shape[1] - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("name", list(MODELS))
def test_kv_cache_generation_equals_recomputation(name, strategy):
    model = MODELS[name]()
    kwargs = inputs_for(model, batch=3, length=5)
    outputs = []
    for use_cache in (True, False):
        config = GenerationConfig(
            max_new_tokens=10,
            strategy=strategy,
            num_beams=3,
            num_return_sequences=2 if strategy != "greedy" else 1,
            use_cache=use_cache,
        )
        generator = torch.Generator().manual_seed(1)
        outputs.append(generate(model, **kwargs, config=config, generator=generator))
    cached, recomputed = outputs
    assert cached.sequences.shape == (3 * config.num_return_sequences, 10)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.scores, recomputed.scores, atol=1e-4, rtol=1e-5)
    assert len(set(map(tuple, cached.sequences.tolist()))) > 1  # the model is not degenerate


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"position": "learned", "max_positions": 40}, {"position": "alibi"}, {"position": "t5"}],
    ids=["rope-gqa", "learned", "alibi", "t5"],
)
def test_left_padded_batch_equals_each_prompt_alone(overrides, strategy, use_cache):
    model = decoder(**overrides)
    lengths = [3, 7, 5]
    prompts = [torch.randint(2, VOCAB, (n,)) for n in lengths]
    T = max(lengths)
    input_ids = torch.zeros(len(prompts), T, dtype=torch.long)  # pad_id 0 on the left
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt) :] = prompt
        mask[row, T - len(prompt) :] = True
    n = 1 if strategy == "greedy" else 2
    config = GenerationConfig(
        max_new_tokens=8,
        strategy=strategy,
        num_beams=3,
        num_return_sequences=n,
        use_cache=use_cache,
    )
    batched = generate(model, input_ids, attention_mask=mask, config=config)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], config=config)
        assert torch.equal(batched.sequences[row * n : (row + 1) * n], alone.sequences)
        torch.testing.assert_close(batched.scores[row * n : (row + 1) * n], alone.scores)


@pytest.mark.parametrize("use_cache", [True, False])
def test_encoder_decoder_padded_sources_equal_each_source_alone(use_cache):
    model = encoder_decoder()
    lengths = [4, 9, 6]
    sources = [torch.randint(2, VOCAB, (n,)) for n in lengths]
    input_ids = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros(3, max(lengths), dtype=torch.bool)
    for row, source in enumerate(sources):
        input_ids[row, : len(source)] = source  # sources may be right-padded
        mask[row, : len(source)] = True
    config = GenerationConfig(max_new_tokens=8, use_cache=use_cache)
    batched = generate(model, input_ids, attention_mask=mask, config=config)
    for row, source in enumerate(sources):
        alone = generate(model, source[None], config=config)
        assert torch.equal(batched.sequences[row : row + 1], alone.sequences)


def test_encoder_runs_once_and_cross_attention_keys_are_computed_once():
    model = encoder_decoder()
    encoder_calls, cross_kv_calls = [], []
    model.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    model.decoder.blocks[0].cross_attn.kv.register_forward_hook(lambda *_: cross_kv_calls.append(1))
    for strategy in ("greedy", "beam"):
        encoder_calls.clear()
        cross_kv_calls.clear()
        config = GenerationConfig(max_new_tokens=6, strategy=strategy, num_beams=3)
        generate(model, torch.randint(2, VOCAB, (2, 7)), config=config)
        assert len(encoder_calls) == 1
        assert len(cross_kv_calls) == 1


@torch.no_grad()
def naive_greedy(model: DecoderLM, prompt: torch.Tensor, steps: int, penalty: float) -> list[int]:
    """Full recomputation every step, CTRL penalty applied element by element."""
    tokens = prompt.tolist()
    new = []
    for _ in range(steps):
        logits = model(torch.tensor([tokens])).logits[0, -1].tolist()
        for token in set(tokens):
            value = logits[token]
            logits[token] = value / penalty if value > 0 else value * penalty
        new.append(max(range(len(logits)), key=logits.__getitem__))
        tokens.append(new[-1])
    return new


@pytest.mark.parametrize("penalty", [1.0, 1.8])
def test_greedy_equals_a_naive_loop(penalty):
    model = decoder()
    prompts = torch.randint(2, VOCAB, (2, 6))
    config = GenerationConfig(max_new_tokens=12, repetition_penalty=penalty)
    out = generate(model, prompts, config=config)
    for row in range(2):
        assert out.sequences[row].tolist() == naive_greedy(model, prompts[row], 12, penalty)
    if penalty == 1.0:  # scores are then the model's own log-likelihood
        expected = log_likelihood(model, prompts, out.sequences).sum(-1)
        torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-5)


def test_beam_search_with_one_beam_equals_greedy():
    model = decoder()
    prompts = torch.randint(2, VOCAB, (3, 5))
    greedy = generate(model, prompts, config=GenerationConfig(max_new_tokens=10))
    beam = generate(
        model,
        prompts,
        config=GenerationConfig(
            max_new_tokens=10, strategy="beam", num_beams=1, length_penalty=0.0
        ),
    )
    assert torch.equal(beam.sequences, greedy.sequences)
    torch.testing.assert_close(beam.scores, greedy.scores)  # no length penalty: sums


def test_top_k_one_sampling_equals_greedy():
    model = decoder()
    prompts = torch.randint(2, VOCAB, (3, 5))
    greedy = generate(model, prompts, config=GenerationConfig(max_new_tokens=10))
    config = GenerationConfig(max_new_tokens=10, strategy="sample", top_k=1, temperature=0.7)
    sampled = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled.sequences, greedy.sequences)
    # the score is the log-prob under the sampled distribution: one token left, probability 1
    assert torch.equal(sampled.scores, torch.zeros(3))


class EosBiasedLM(DecoderLM):
    """A DecoderLM with `eos_bias` added to the logit of `eos_id` (0: the model unchanged)."""

    eos_id: int = 0
    eos_bias: float = 0.0

    def forward(self, input_ids: torch.Tensor, **kwargs) -> LMOutput:
        out = super().forward(input_ids, **kwargs)
        bias = torch.zeros(self.config.vocab_size)
        bias[self.eos_id] = self.eos_bias
        return out._replace(logits=out.logits + bias)


@torch.no_grad()
def exhaustive_best(
    model: DecoderLM,
    prompt: torch.Tensor,
    steps: int,
    eos_id: int | None,
    length_penalty: float,
    n_best: int,
) -> list[tuple[tuple[int, ...], float]]:
    """The n best sequences of `steps` new tokens by scoring every one of them: a sequence
    ends at its first eos (padded with 0 after it), score = sum of log-probs / length ** lp."""
    vocab = model.config.vocab_size
    candidates = torch.tensor(list(itertools.product(range(vocab), repeat=steps)))  # (V^T, T)
    logprobs = log_likelihood(model, prompt.expand(len(candidates), -1), candidates)
    length = torch.full((len(candidates),), steps)
    if eos_id is not None:
        is_eos = candidates == eos_id
        length = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, steps)
    kept = torch.arange(steps) < length[:, None]
    sequences = torch.where(kept, candidates, 0)
    scores = (logprobs * kept).sum(-1) / length.float() ** length_penalty
    unique = dict(zip(map(tuple, sequences.tolist()), scores.tolist(), strict=True))
    return sorted(unique.items(), key=lambda item: -item[1])[:n_best]


@pytest.mark.parametrize(
    "vocab, steps, eos_id, eos_bias, n_best",
    [(6, 3, None, 0.0, 5), (6, 3, 2, 0.0, 5), (3, 5, 2, 8.0, 3)],
    ids=["no-eos", "eos", "early-stop"],
)
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_equals_exhaustive_search(
    vocab, steps, eos_id, eos_bias, n_best, length_penalty
):
    base = decoder(vocab=vocab, dim=48)
    model = EosBiasedLM(base.config).eval()
    model.load_state_dict(base.state_dict())
    model.eos_id, model.eos_bias = eos_id or 0, eos_bias
    prompts = torch.randint(0, vocab, (2, 4))
    config = GenerationConfig(
        max_new_tokens=steps,
        strategy="beam",
        # every prefix one token short of the end survives: the search cannot miss the best
        num_beams=vocab ** (steps - 1),
        num_return_sequences=n_best,
        length_penalty=length_penalty,
        eos_id=eos_id,
        pad_id=0,
    )
    out = generate(model, prompts, config=config)
    T_new = out.sequences.shape[1]
    if eos_bias and length_penalty <= 1:
        # likely eos: the n best finish early and no running beam can catch up, so the search
        # stops before `steps` (with length_penalty 2 a running beam could, by growing longer)
        assert T_new < steps
    for row in range(2):
        best = exhaustive_best(model, prompts[row : row + 1], steps, eos_id, length_penalty, n_best)
        got = out.sequences[row * n_best : (row + 1) * n_best]
        assert [tuple(s) + (0,) * (steps - T_new) for s in got.tolist()] == [s for s, _ in best]
        expected = torch.tensor([score for _, score in best])
        torch.testing.assert_close(out.scores[row * n_best : (row + 1) * n_best], expected)
        assert len(set(map(tuple, got.tolist()))) == n_best  # distinct
        assert (out.scores[row * n_best : (row + 1) * n_best].diff() <= 0).all()  # best first


class ChainLM(DecoderLM):
    """A DecoderLM whose next token after t is almost surely t + 1 (a bias of 20 on the
    model's own logits), so that a row reaches eos after a number of steps set by its prompt."""

    def forward(self, input_ids: torch.Tensor, **kwargs) -> LMOutput:
        out = super().forward(input_ids, **kwargs)
        successor = (input_ids + 1) % self.config.vocab_size
        bias = 20 * torch.nn.functional.one_hot(successor, self.config.vocab_size)
        return out._replace(logits=out.logits + bias)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_rows_stop_at_eos_and_are_padded_after_it(strategy, use_cache):
    vocab, eos, pad = 12, 6, 0
    base = decoder(vocab=vocab)
    model = ChainLM(base.config).eval()
    model.load_state_dict(base.state_dict())
    prompts = torch.tensor([[9, 1], [2, 3], [7, 4]])  # eos after 5, 3 and 2 new tokens
    config = GenerationConfig(
        max_new_tokens=10, strategy=strategy, num_beams=2, eos_id=eos, pad_id=pad
    )
    out = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(0))
    assert out.sequences.tolist() == [[2, 3, 4, 5, 6], [4, 5, 6, pad, pad], [5, 6, pad, pad, pad]]
    # scores count the tokens up to eos only
    for row, length in enumerate([5, 3, 2]):
        new = out.sequences[row : row + 1, :length]
        expected = log_likelihood(model, prompts[row : row + 1], new).sum()
        if strategy == "beam":
            expected = expected / length**config.length_penalty
        torch.testing.assert_close(out.scores[row], expected, atol=1e-4, rtol=1e-5)


def test_eos_defaults_to_the_model_config():
    base = decoder(vocab=12)
    config = TextConfig(vocab_size=12, eos_id=6, pad_id=11, transformer=base.config.transformer)
    model = ChainLM(config).eval()
    out = generate(model, torch.tensor([[3]]), config=GenerationConfig(max_new_tokens=10))
    assert out.sequences.tolist() == [[4, 5, 6]]  # stopped early: all rows done
    out = generate(model, torch.tensor([[3], [4]]), config=GenerationConfig(max_new_tokens=10))
    assert out.sequences.tolist() == [[4, 5, 6], [5, 6, 11]]


PROBS = torch.tensor([0.5, 0.25, 0.15, 0.05, 0.03, 0.02])


class FixedLM(DecoderLM):
    """A DecoderLM whose next-token distribution is always PROBS."""

    def forward(self, input_ids: torch.Tensor, **kwargs) -> LMOutput:
        out = super().forward(input_ids, **kwargs)
        return out._replace(logits=PROBS.log().expand_as(out.logits))


def fixed_model() -> FixedLM:
    base = decoder(vocab=len(PROBS))
    return FixedLM(base.config).eval()


def test_top_p_samples_stay_in_the_nucleus():
    model = fixed_model()
    prompts = torch.zeros(2000, 1, dtype=torch.long)
    config = GenerationConfig(max_new_tokens=3, strategy="sample", top_p=0.8)
    out = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.sequences.flatten(), minlength=len(PROBS))
    nucleus = 3  # 0.5 + 0.25 < 0.8 <= 0.5 + 0.25 + 0.15
    assert counts[nucleus:].sum() == 0
    share = counts[:nucleus].float() / counts.sum()
    torch.testing.assert_close(share, PROBS[:nucleus] / PROBS[:nucleus].sum(), atol=0.02, rtol=0)
    # without the filter every token appears, at its own rate
    config = GenerationConfig(max_new_tokens=3, strategy="sample")
    out = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.sequences.flatten(), minlength=len(PROBS))
    assert (counts > 0).all()
    torch.testing.assert_close(counts.float() / counts.sum(), PROBS, atol=0.02, rtol=0)


def test_sampling_is_reproducible_with_a_generator_and_gives_n_samples_per_input():
    model = decoder()
    prompts = torch.randint(2, VOCAB, (2, 4))
    config = GenerationConfig(max_new_tokens=8, strategy="sample", num_return_sequences=3)
    first = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(3))
    again = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(3))
    other = generate(model, prompts, config=config, generator=torch.Generator().manual_seed(4))
    assert first.sequences.shape == (6, 8)
    assert torch.equal(first.sequences, again.sequences)
    assert not torch.equal(first.sequences, other.sequences)
    # scores are the log-likelihood of each sample (temperature 1, no filter)
    expected = log_likelihood(model, prompts.repeat_interleave(3, 0), first.sequences).sum(-1)
    torch.testing.assert_close(first.scores, expected, atol=1e-4, rtol=1e-5)


def test_process_logits_matches_the_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True, True]])
    penalty = 2.0
    expected = torch.tensor(
        [[x / penalty if x > 0 else x * penalty for x in row] for row in logits.tolist()]
    )
    expected = torch.where(seen, expected, logits)  # only seen tokens are penalised
    for strategy in ("greedy", "beam"):  # sampling filters do not apply to these
        config = GenerationConfig(
            strategy=strategy, repetition_penalty=penalty, temperature=0.5, top_k=2, top_p=0.5
        )
        torch.testing.assert_close(process_logits(logits, config, seen), expected)
    sample = GenerationConfig(strategy="sample", repetition_penalty=penalty, temperature=0.5)
    torch.testing.assert_close(process_logits(logits, sample, seen), expected / 0.5)
    top_k = GenerationConfig(strategy="sample", top_k=2)
    inf = float("-inf")
    assert process_logits(logits, top_k).tolist() == [[2.0, inf, inf, inf, 1.0, inf]]
    # softmax of [2, 1, 0.5, 0, -1, -3] is about [0.53, 0.20, 0.12, 0.07, 0.03, 0.004]
    top_p = GenerationConfig(strategy="sample", top_p=0.8)
    assert process_logits(logits, top_p).tolist() == [[2.0, inf, 0.5, inf, 1.0, inf]]
    top_p = GenerationConfig(strategy="sample", top_p=0.1)  # the most likely token always stays
    assert process_logits(logits, top_p).tolist() == [[2.0, inf, inf, inf, inf, inf]]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"strategy": "topk"}, "strategy"),
        ({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 2}, "num_return_sequences"),  # greedy
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_beams": 0}, "num_beams"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"eos_id": -1}, "eos_id"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**kwargs)


def test_bad_inputs_are_clear_errors():
    model = decoder(position="learned", max_positions=16)
    ids = torch.randint(2, VOCAB, (2, 6))
    right_padded = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, attention_mask=right_padded)
    with pytest.raises(ValueError, match="max_new_tokens=12"):
        generate(model, ids, config=GenerationConfig(max_new_tokens=12))
    generate(model, ids, config=GenerationConfig(max_new_tokens=11))  # 6 + 11 - 1 fed tokens
    with pytest.raises(ValueError, match="eos_id=50"):
        generate(model, ids, config=GenerationConfig(eos_id=50))
    with pytest.raises(TypeError, match="DecoderLM or an EncoderDecoderLM"):
        generate(model.transformer, ids)
