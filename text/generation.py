"""Autoregressive generation for `DecoderLM` and `EncoderDecoderLM`: greedy, beam search and
sampling (temperature, top-k, top-p, repetition penalty), with or without the KV cache.

Written by hand: the model code here is our own, so `transformers.GenerationMixin` cannot
drive it. The prompt is prefilled in one call, then one token per step is fed with the cache;
`use_cache=False` recomputes the whole sequence every step (the reference for tests and the
baseline of `bench/generation.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.layers import BlockCache
from text.decoder import DecoderLM
from text.encoder_decoder import EncoderDecoderLM
from text.output import LMOutput

STRATEGIES = ("greedy", "beam", "sample")


@dataclass
class GenerationConfig:
    """How `generate` picks tokens; validated on creation.

    `strategy` "greedy" takes the most likely token, "beam" keeps the `num_beams` best
    sequences by sum of log-probs / length ** `length_penalty` (length = new tokens up to and
    including eos) and returns the `num_return_sequences` best, "sample" draws
    `num_return_sequences` samples per input from the distribution shaped by `temperature`,
    `top_k` (0 = off) and `top_p` (nucleus, 1.0 = off). `repetition_penalty` (CTRL) applies to
    every strategy: the logits of tokens already in the sequence (prompt or generated) are
    divided by it when positive and multiplied by it when negative. A row stops at `eos_id`
    and is filled with `pad_id` after it (None: the model config's ids; no eos = run to
    `max_new_tokens`). `use_cache=False` recomputes the whole sequence every step.
    """

    max_new_tokens: int = 32
    strategy: str = "greedy"
    num_beams: int = 4
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_id: int | None = None
    pad_id: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        prefix = "GenerationConfig."
        if self.max_new_tokens < 1:
            raise ValueError(f"{prefix}max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"{prefix}strategy={self.strategy!r} is not a known strategy; "
                f"choose one of {list(STRATEGIES)}"
            )
        if self.num_beams < 1:
            raise ValueError(f"{prefix}num_beams={self.num_beams} must be >= 1")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"{prefix}length_penalty={self.length_penalty} must be finite")
        if self.num_return_sequences < 1:
            raise ValueError(
                f"{prefix}num_return_sequences={self.num_return_sequences} must be >= 1"
            )
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"{prefix}num_return_sequences={self.num_return_sequences} must be <= "
                f"num_beams={self.num_beams}"
            )
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            raise ValueError(
                f"{prefix}num_return_sequences={self.num_return_sequences} must be 1 for "
                "greedy decoding (its sequences would be identical): use beam or sample"
            )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"{prefix}temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            raise ValueError(f"{prefix}top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(
                f"{prefix}repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)"
            )
        for name in ("eos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{prefix}{name}={value} must be >= 0 or None")


class GenerationOutput(NamedTuple):
    sequences: Tensor  # (B * num_return_sequences, T_new) new tokens, eos included, then pad_id
    scores: Tensor  # (B * num_return_sequences,) sum of log-probs (beam: length-penalised)


def process_logits(logits: Tensor, config: GenerationConfig, seen: Tensor | None = None) -> Tensor:
    """Next-token logits (N, V) -> the logits tokens are chosen from.

    Repetition penalty on the tokens where `seen` (N, V) is True (every strategy), then, for
    sampling only, temperature, top-k and top-p; removed tokens get -inf. The order is that of
    Hugging Face's logits processors.
    """
    if seen is not None and config.repetition_penalty != 1.0:
        p = config.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if config.strategy != "sample":
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        # the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, V), 0 for the most likely token
        remove = mass_before >= config.top_p  # in sorted order
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@dataclass
class _Sequences:
    """What grows, or is reordered, per row while decoding."""

    tokens: Tensor  # (N, T) every token fed to the decoder so far
    mask: Tensor | None  # (N, T) True = real token; None when no row is padded
    positions: Tensor | None  # (N, T) per-row positions; None when no row is padded
    seen: Tensor | None  # (N, V) tokens the repetition penalty applies to; None when off

    def append(self, token: Tensor) -> None:
        """Add the next token (N,) of every row."""
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
        if self.mask is not None:
            self.mask = F.pad(self.mask, (0, 1), value=True)
        if self.positions is not None:
            self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (N,) (the surviving beams)."""
        self.tokens = self.tokens[index]
        self.mask = None if self.mask is None else self.mask[index]
        self.positions = None if self.positions is None else self.positions[index]
        self.seen = None if self.seen is None else self.seen[index]


@dataclass
class _Decoder:
    """The decoder call of a model, its cross-attention context and its KV cache."""

    forward: Callable[..., LMOutput]  # DecoderLM itself or EncoderDecoderLM.decode
    context: Tensor | None  # (N, S, D)
    context_padding_mask: Tensor | None  # (N, S)
    cache: list[BlockCache] | None  # None: recompute the whole sequence every step

    def next_logits(self, seqs: _Sequences, n_new: int) -> Tensor:
        """Logits (N, V) of the token after `seqs`; with the cache only the last n_new tokens
        are fed (the whole prompt at the first call, then one token)."""
        tokens, positions = seqs.tokens, seqs.positions
        if self.cache is not None:
            tokens = tokens[:, -n_new:]
            positions = None if positions is None else positions[:, -n_new:]
        out = self.forward(
            tokens,
            attention_mask=seqs.mask,  # over cached + new tokens
            positions=positions,
            cache=self.cache,
            context=self.context,
            context_padding_mask=self.context_padding_mask,
        )
        return out.logits[:, -1].float()

    def select(self, index: Tensor) -> None:
        """Keep the self-attention caches of rows `index`. The cross-attention caches stay:
        beams only move within their input's group, whose rows share the same context."""
        for layer in self.cache or ():
            layer.self_attn.reorder(index)


def _repeat(x: Tensor | None, copies: int) -> Tensor | None:
    return x if x is None or copies == 1 else x.repeat_interleave(copies, dim=0)


def _prepare(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    context: Tensor | None,
    context_padding_mask: Tensor | None,
    config: GenerationConfig,
    copies: int,
) -> tuple[_Decoder, _Sequences]:
    """Check the inputs, run the encoder of a seq2seq model once, give every input `copies`
    rows (beams, samples) and build the first decoder inputs."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, tokens) with tokens >= 1, got {tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.bool()
        if not attention_mask.any(dim=1).all():
            raise ValueError("every row of attention_mask needs at least one real token")
    B = input_ids.shape[0]
    if isinstance(model, EncoderDecoderLM):
        if context is not None or context_padding_mask is not None:
            raise ValueError("an EncoderDecoderLM computes its context from input_ids")
        context = model.encode(input_ids, attention_mask)  # (B, S, dim), once
        context_padding_mask = attention_mask
        tokens = input_ids.new_full((B, 1), model.decoder_start_id)
        mask = positions = None
        forward = model.decode
    else:  # a DecoderLM (generate checked the type)
        tokens, mask, positions = input_ids, attention_mask, None
        if mask is not None and mask.all():
            mask = None  # no padding: the default positions and the fast causal kernel
        if mask is not None:
            if (mask[:, 1:] < mask[:, :-1]).any():
                raise ValueError(
                    "attention_mask must be left-padded (padding before the prompt) so that "
                    "every row's next token comes right after its last real token"
                )
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        forward = model
    if context is not None and context.shape[0] != B:
        raise ValueError(f"context has {context.shape[0]} rows, input_ids has {B}")
    fed = tokens.shape[1] + config.max_new_tokens - 1
    if fed > model.config.max_positions:
        raise ValueError(
            f"GenerationConfig.max_new_tokens={config.max_new_tokens} after a prompt of "
            f"{tokens.shape[1]} tokens exceeds the model's max_positions="
            f"{model.config.max_positions}"
        )
    tokens, mask, positions = (_repeat(t, copies) for t in (tokens, mask, positions))
    seen = None
    if config.repetition_penalty != 1.0:
        real = torch.ones_like(tokens, dtype=torch.float) if mask is None else mask.float()
        counts = tokens.new_zeros(tokens.shape[0], model.config.vocab_size, dtype=torch.float)
        seen = counts.scatter_add_(1, tokens, real) > 0  # (N, V), padding excluded
    cache = model.init_cache(capacity=fed) if config.use_cache else None
    decoder = _Decoder(
        forward, _repeat(context, copies), _repeat(context_padding_mask, copies), cache
    )
    return decoder, _Sequences(tokens, mask, positions, seen)


def _greedy_or_sample(
    decoder: _Decoder,
    seqs: _Sequences,
    config: GenerationConfig,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None,
) -> GenerationOutput:
    """One token per row and step: the most likely one, or one drawn from the distribution."""
    N = seqs.tokens.shape[0]
    device = seqs.tokens.device
    scores = torch.zeros(N, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    new_tokens = []
    logits = decoder.next_logits(seqs, seqs.tokens.shape[1])  # prefill
    for step in range(config.max_new_tokens):
        logprobs = process_logits(logits, config, seqs.seen).log_softmax(dim=-1)  # (N, V)
        if config.strategy == "sample":
            token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
        else:
            token = logprobs.argmax(dim=-1)
        token_logprob = logprobs.gather(1, token[:, None]).squeeze(1)
        scores = scores + torch.where(done, 0.0, token_logprob)
        token = torch.where(done, pad_id, token)  # finished rows get padding
        if eos_id is not None:
            done = done | (token == eos_id)
        new_tokens.append(token)
        if step == config.max_new_tokens - 1 or done.all():
            break
        seqs.append(token)
        logits = decoder.next_logits(seqs, 1)
    return GenerationOutput(torch.stack(new_tokens, dim=1), scores)


def _beam_search(
    decoder: _Decoder,
    seqs: _Sequences,
    config: GenerationConfig,
    eos_id: int | None,
    pad_id: int,
) -> GenerationOutput:
    """Keep the num_beams best sequences per input by length-penalised score.

    A finished beam stays in the beam set, extended with pad_id at no cost, so finished and
    running hypotheses compete on the same score: sum of log-probs / length ** length_penalty,
    length counting new tokens up to and including eos.
    """
    K = config.num_beams
    N, device = seqs.tokens.shape[0], seqs.tokens.device
    B = N // K
    group = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each input
    sums = torch.full((B, K), float("-inf"), device=device)
    sums[:, 0] = 0.0  # all beams start equal: expand the first one only
    lengths = torch.zeros(B, K, device=device)
    done = torch.zeros(B, K, dtype=torch.bool, device=device)
    beam_scores = sums
    new_tokens = torch.zeros(N, 0, dtype=torch.long, device=device)
    logits = decoder.next_logits(seqs, seqs.tokens.shape[1])  # prefill
    V = logits.shape[-1]
    after_eos = torch.full((V,), float("-inf"), device=device)
    after_eos[pad_id] = 0.0
    for step in range(config.max_new_tokens):
        logprobs = process_logits(logits, config, seqs.seen).log_softmax(dim=-1).view(B, K, V)
        logprobs = torch.where(done[..., None], after_eos, logprobs)
        candidate_sums = sums[..., None] + logprobs  # (B, K, V)
        candidate_lengths = (lengths + (~done).float())[..., None]  # (B, K, 1)
        candidate_scores = candidate_sums / candidate_lengths**config.length_penalty
        beam_scores, best = candidate_scores.view(B, K * V).topk(K, dim=-1)  # (B, K), sorted
        origin, token = best // V, best % V  # beam it extends, token it adds
        sums = candidate_sums.view(B, K * V).gather(1, best)
        lengths = candidate_lengths.squeeze(-1).gather(1, origin)
        done = done.gather(1, origin)
        if eos_id is not None:
            done = done | (token == eos_id)
        index = (group + origin).view(-1)  # (N,) rows of the surviving beams
        new_tokens = torch.cat([new_tokens[index], token.view(-1, 1)], dim=1)
        if step == config.max_new_tokens - 1 or _beams_settled(
            beam_scores, sums, lengths, done, config
        ):
            break
        seqs.select(index)
        seqs.append(token.view(-1))
        decoder.select(index)
        logits = decoder.next_logits(seqs, 1)
    n = config.num_return_sequences
    sequences = new_tokens.view(B, K, -1)[:, :n].reshape(B * n, -1)
    return GenerationOutput(sequences, beam_scores[:, :n].reshape(-1))


def _beams_settled(
    beam_scores: Tensor, sums: Tensor, lengths: Tensor, done: Tensor, config: GenerationConfig
) -> bool:
    """True when the returned beams can no longer change: for every input the
    num_return_sequences best beams (B, K sorted) are finished and no running beam can reach the
    worst of them. Exact, not a heuristic: a sum of log-probs only falls, so a running beam's
    best final score is its sum over the most favourable final length."""
    n, lp = config.num_return_sequences, config.length_penalty
    if not done[:, :n].all():
        return False
    if lp > 0:  # longer divides more: the longest possible length
        best_length = torch.full_like(lengths, config.max_new_tokens)
    elif lp < 0:  # the shortest: one more token
        best_length = lengths + 1
    else:
        best_length = torch.ones_like(lengths)
    reachable = (sums / best_length**lp).masked_fill(done, float("-inf"))  # (B, K)
    return bool((reachable.max(dim=1).values <= beam_scores[:, n - 1]).all())


@torch.no_grad()
def generate(
    model: DecoderLM | EncoderDecoderLM,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    context: Tensor | None = None,
    context_padding_mask: Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate up to `config.max_new_tokens` tokens per input (call `model.eval()` first).

    Args:
        model: a `DecoderLM` (input_ids = the prompt; with cross-attention also `context`
            (B, S, D) and `context_padding_mask` (B, S), e.g. image tokens) or an
            `EncoderDecoderLM` (input_ids = the source, encoded once; decoding starts from
            `model.decoder_start_id`).
        input_ids: (B, T) prompts, left-padded when their lengths differ, or sources.
        attention_mask: (B, T) True (or 1) = real token.
        config: strategy and limits (default: `GenerationConfig()`, greedy).
        generator: random source of sampling, for reproducible samples.

    Returns sequences (B * num_return_sequences, T_new) of new tokens (the copies of input b at
    rows b * num_return_sequences ...) and their scores: the sum of the log-probs each token
    had in the distribution it was chosen from (after `process_logits`: repetition penalty;
    when sampling also temperature, top-k, top-p), up to and including eos; for beam search
    divided by length ** length_penalty. Beam sequences come best first.
    """
    if not isinstance(model, (DecoderLM, EncoderDecoderLM)):
        raise TypeError(
            f"generate takes a DecoderLM or an EncoderDecoderLM, got {type(model).__name__}"
        )
    config = config or GenerationConfig()
    eos_id = config.eos_id if config.eos_id is not None else model.config.eos_id
    pad_id = config.pad_id if config.pad_id is not None else model.config.pad_id
    vocab_size = model.config.vocab_size
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and value >= vocab_size:
            raise ValueError(f"GenerationConfig.{name}={value} must be < vocab_size={vocab_size}")
    copies = {"greedy": 1, "beam": config.num_beams, "sample": config.num_return_sequences}
    decoder, seqs = _prepare(
        model,
        input_ids,
        attention_mask,
        context,
        context_padding_mask,
        config,
        copies[config.strategy],
    )
    if config.strategy == "beam":
        return _beam_search(decoder, seqs, config, eos_id, pad_id)
    return _greedy_or_sample(decoder, seqs, config, eos_id, pad_id, generator)
