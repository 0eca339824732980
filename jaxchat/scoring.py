"""Prompt scoring: the log-probability of every token of some sequences, and the most likely tokens at each position.

This is what an OpenAI-style `/v1/completions` request with `echo: true, logprobs: N` needs (lm-evaluation-harness
sends one for every multiple-choice answer): per prompt token its log-probability given the tokens before it
(`token_logprobs`, the first one None), the N best tokens at each position (`top_logprobs`), and the distribution
after the last token. All of it comes from ONE forward pass of the model over a padded batch, with no KV cache and
no decode loop. The engine runs it as its "score" program (`jaxchat.engine.Engine.score`, `engine_programs`); this
module holds the pure function and the host-side packing.

Shapes are bucketed so that a server compiles few programs: the batch pads to a power of two (a multiple of the
devices it is split over), the length to a power of two (at least `MIN_LEN`, at most the model's `sequence_len`).
Sequences are right-padded: attention is causal and smear and the bigram hash look only backwards, so the padding
changes nothing at the real positions.

`token_logprobs` and the top-N values are both `logit - logsumexp(logits)` from the same float32 logits, so when a
token is the most likely one, its logprob equals the first top value bit for bit; lm-eval's `is_greedy` compares
them with `==`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.common import pow2_bucket
from jaxchat.model import GPTConfig

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


def bucket_shape(n_sequences: int, longest: int, sequence_len: int, multiple: int = 1) -> tuple[int, int]:
    """(B, T) of the padded batch: B the next power of two rounded up to a multiple of `multiple` (the devices the
    rows are split over), T a power of two, at least MIN_LEN and at most sequence_len.

    Raises:
        ValueError: no sequences, an empty one (longest < 1), or longest > sequence_len.
    """
    if n_sequences < 1 or longest < 1:
        raise ValueError("scoring needs at least one sequence of at least one token")
    if longest > sequence_len:
        raise ValueError(f"a sequence of {longest} tokens is longer than the model's context of {sequence_len}")
    rows = pow2_bucket(n_sequences)
    return -(-rows // multiple) * multiple, pow2_bucket(longest, MIN_LEN, sequence_len)


def token_logprobs(forward_fn, params, config: GPTConfig, idx: jax.Array, top_n: int):
    """Log-probabilities over a padded batch idx int32 (B, T), in one forward (`forward_fn(params, config, idx)`:
    float32 (B, T, V) softcapped logits, as `jaxchat.model.forward`). Returns token_logprobs float32 (B, T) (log p of
    idx[:, t] given idx[:, :t]; [:, 0] is 0, unused), and top_values float32 / top_ids int32 (B, T, top_n): the
    top_n next tokens at every position (the last included). Static: top_n >= 1."""
    logits = forward_fn(params, config, idx).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    picked = jnp.take_along_axis(logits[:, :-1], idx[:, 1:, None], axis=-1)[..., 0]  # logit of each next token
    top_logits, top_ids = jax.lax.top_k(logits, top_n)
    return jnp.pad(picked - lse[:, :-1], ((0, 0), (1, 0))), top_logits - lse[..., None], top_ids


def pack(sequences: list[list[int]], shape: tuple[int, int]) -> np.ndarray:
    """int32 `shape` (B, T): the sequences right-padded with 0, one per row, rows past them 0."""
    idx = np.zeros(shape, np.int32)
    for i, seq in enumerate(sequences):
        idx[i, :len(seq)] = seq
    return idx


def unpack(sequences: list[list[int]], token_lp: np.ndarray, top_values: np.ndarray, top_ids: np.ndarray,
           top_n: int) -> list[ScoredSequence]:
    """One `ScoredSequence` per sequence from `token_logprobs`'s outputs (host arrays), with the first top_n of
    the top values at each position (log-probabilities in nats, as Python floats)."""
    out = []
    for i, seq in enumerate(sequences):
        n = len(seq)
        tops = [list(zip(top_ids[i, t, :top_n].tolist(), top_values[i, t, :top_n].tolist())) for t in range(n)]
        out.append(ScoredSequence(token_logprobs=[None] + token_lp[i, 1:n].tolist(), top=[None] + tops[:n - 1],
                                  next_top=tops[n - 1]))
    return out
