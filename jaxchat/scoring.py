"""Prompt scoring: the log-probability of every token of some sequences, and the most likely tokens at each position.

This is what an OpenAI-style `/v1/completions` request with `echo: true, logprobs: N, max_tokens: 1` needs (the
request lm-evaluation-harness sends for every multiple-choice answer): per prompt token its log-probability given
the tokens before it (`token_logprobs`, the first one None), the N best tokens at each position (`top_logprobs`),
and the distribution after the last token (the greedy next token). All of it comes from ONE forward pass of the
model over a padded batch, with no KV cache and no decode loop.

Shapes are bucketed so that a server compiles few programs: the batch pads to a power of two, the length to a power
of two (at least `MIN_LEN`, at most the model's `sequence_len`). Sequences are right-padded: attention is causal and
smear and the bigram hash look only backwards, so the padding changes nothing at the real positions.

`token_logprobs` and the top-N values are both `logit - logsumexp(logits)` from the same float32 logits, so when a
token is the most likely one, its logprob equals the first top value bit for bit; lm-eval's `is_greedy` compares
them with `==`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.model import GPTConfig, forward

MAX_TOP_N = 20  # the most top log-probabilities per position served (vLLM's limit for the completions API)
MIN_LEN = 16  # shortest length bucket: fewer compiled shapes for short prompts


@dataclass
class ScoredSequence:
    """The scores of one sequence of T tokens.

    token_logprobs: T entries; [0] is None (nothing predicts the first token), [t] = log p(token t | tokens < t).
    top: T entries; [0] is None, [t] = the top_n (token id, logprob) pairs predicted for position t, best first
        (empty lists when top_n == 0).
    next_top: the top_n pairs predicted after the last token (the greedy next token is next_top[0][0] when
        top_n >= 1).
    """

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]
    next_top: list[tuple[int, float]]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def bucket_shape(n_sequences: int, longest: int, sequence_len: int) -> tuple[int, int]:
    """(B, T) of the padded batch: powers of two, T at least MIN_LEN and at most sequence_len.

    Raises:
        ValueError: no sequences, an empty one (longest < 1), or longest > sequence_len.
    """
    if n_sequences < 1 or longest < 1:
        raise ValueError("score_sequences needs at least one sequence of at least one token")
    if longest > sequence_len:
        raise ValueError(f"a sequence of {longest} tokens is longer than the model's context of {sequence_len}")
    return _next_pow2(n_sequences), min(sequence_len, max(MIN_LEN, _next_pow2(longest)))


@partial(jax.jit, static_argnames=("config", "top_n"))
def _score_bucket(params, config: GPTConfig, idx: jax.Array, top_n: int):
    """Log-probabilities for a padded batch idx (B, T) int32: token_logprobs (B, T) float32 ([:, 0] is 0, unused),
    top_values/top_ids (B, T, top_n) for the next token at every position (also the last)."""
    logits = forward(params, config, idx)  # (B, T, V) float32, softcapped
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    picked = jnp.take_along_axis(logits[:, :-1], idx[:, 1:, None], axis=-1)[..., 0]  # logit of each next token
    token_logprobs = jnp.pad(picked - lse[:, :-1], ((0, 0), (1, 0)))
    top_logits, top_ids = jax.lax.top_k(logits, max(top_n, 1))
    return token_logprobs, top_logits[..., :top_n] - lse[..., None], top_ids[..., :top_n]


def score_sequences(params, config: GPTConfig, sequences: list[list[int]], top_n: int = 0) -> list[ScoredSequence]:
    """Score token sequences in one batched forward (see the module docstring).

    Args:
        params: the params pytree (any float dtype; the logits are float32).
        config: the model config.
        sequences: B lists of token ids, each of 1..sequence_len ids in [0, vocab_size).
        top_n: how many most-likely tokens to return per position, 0..MAX_TOP_N.

    Returns one `ScoredSequence` per input sequence, in order (log-probabilities in nats, as Python floats).

    Raises:
        ValueError: top_n outside [0, MAX_TOP_N]; no sequences, an empty one, or one longer than sequence_len; an
            id outside [0, vocab_size).
    """
    if not 0 <= top_n <= MAX_TOP_N:
        raise ValueError(f"top_n={top_n} must be in [0, {MAX_TOP_N}]")
    B, T = bucket_shape(len(sequences), max((len(s) for s in sequences), default=0), config.sequence_len)
    if any(len(s) == 0 for s in sequences):
        raise ValueError("score_sequences: every sequence needs at least one token")
    idx = np.zeros((B, T), np.int32)
    for i, seq in enumerate(sequences):
        row = np.asarray(seq, dtype=np.int64)
        if row.min() < 0 or row.max() >= config.vocab_size:
            raise ValueError(f"sequence {i} holds a token id outside [0, {config.vocab_size})")
        idx[i, : len(seq)] = row
    token_lp, top_vals, top_ids = jax.device_get(_score_bucket(params, config, jnp.asarray(idx), top_n))
    out = []
    for i, seq in enumerate(sequences):
        n = len(seq)
        tops = [list(zip(top_ids[i, t].tolist(), top_vals[i, t].tolist())) for t in range(n)]
        out.append(ScoredSequence(token_logprobs=[None] + token_lp[i, 1:n].tolist(),
                                  top=[None] + tops[: n - 1], next_top=tops[n - 1]))
    return out
