"""The pure pieces of nanochat's RL (scripts/chat_rl.py): group-mean advantages, the token-level policy-gradient
loss and its per-row weights, rollout batches, pass@k. `train.rl` drives them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

MIN_SEQ_BUCKET = 32  # rollouts are right-padded to a power of two >= this many tokens (`pow2_bucket`)


def compute_advantages(rewards) -> np.ndarray:
    """Advantages (..., S) float32 = rewards minus the mean over the last axis (the samples of one question).

    nanochat subtracts the group mean only (no z-score). Source: nanochat scripts/chat_rl.py `get_batch`.
    """
    rewards = np.asarray(rewards, np.float32)
    return rewards - rewards.mean(axis=-1, keepdims=True)


def pg_loss(logp, targets, advantages, device_batch_size: int):
    """nanochat's policy-gradient loss for one optimizer step, as a number.

    Args:
        logp: float (E, S, T) log-probabilities of the targets (any value where targets == -1).
        targets: int (E, S, T), -1 where the token is not trained (prompt, tool output, padding).
        advantages: float (E, S).
        device_batch_size: rows per forward pass; S must be a multiple of it (passes = S / device_batch_size).
    Returns:
        scalar: mean over the E questions and their passes of -sum(logp * adv) / max(valid tokens in the pass, 1).
        With E questions over W ranks nanochat's per-rank loss divides by examples_per_rank = E / W and DDP
        averages over the W ranks, which is this same 1 / E.
    Raises:
        ValueError: S not a multiple of device_batch_size.
    """
    logp, targets, advantages = jnp.asarray(logp), jnp.asarray(targets), jnp.asarray(advantages)
    E, S, T = targets.shape
    if S % device_batch_size:
        raise ValueError(f"num_samples {S} must be a multiple of device_batch_size {device_batch_size}")
    P = S // device_batch_size
    valid = targets >= 0
    obj = jnp.where(valid, logp, 0.0) * advantages[..., None]  # (E, S, T)
    obj = obj.reshape(E, P, device_batch_size * T).sum(-1)
    num_valid = jnp.maximum(valid.reshape(E, P, device_batch_size * T).sum(-1), 1)
    return -jnp.sum(obj / (num_valid * P * E))


def pg_row_weights(targets, advantages, device_batch_size: int) -> np.ndarray:
    """Per-sequence weights w (E, S) with pg_loss == sum_rows w * sum_t nll[row, t] (nll = -logp, 0 where ignored).

    w = advantage / (valid tokens of the row's pass * passes * E): with these, the loss is additive over rows and
    the gradient can be accumulated over micro-batches of any size without changing nanochat's normalisation.
    """
    targets, advantages = np.asarray(targets), np.asarray(advantages, np.float32)
    E, S, T = targets.shape
    if S % device_batch_size:
        raise ValueError(f"num_samples {S} must be a multiple of device_batch_size {device_batch_size}")
    P = S // device_batch_size
    valid = (targets >= 0).reshape(E, P, device_batch_size * T).sum(-1)  # (E, P)
    num_valid = np.maximum(valid, 1).repeat(device_batch_size, axis=1)  # (E, S)
    return (advantages / (num_valid * P * E)).astype(np.float32)


def rollout_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int, length: int | None = None):
    """(inputs, targets) int32 (N, L) from generated sequences (prompt + completion) and the Engine's masks.

    Rows are right-padded with `pad_id` (nanochat pads with <|assistant_end|>; padding is never trained) to
    `length` + 1 tokens (default the longest row), then inputs = ids[:, :-1] and targets = ids[:, 1:] with -1 where
    mask[1:] == 0 (prompt, tool-forced tokens, padding). Rows longer than length + 1 are cut.
    """
    L = (max(len(s) for s in sequences) - 1) if length is None else length
    ids = np.full((len(sequences), L + 1), pad_id, np.int32)
    mask = np.zeros((len(sequences), L + 1), np.int8)
    for i, (s, m) in enumerate(zip(sequences, masks)):
        n = min(len(s), L + 1)
        ids[i, :n], mask[i, :n] = s[:n], m[:n]
    return ids[:, :-1], np.where(mask[:, 1:] != 0, ids[:, 1:], -1).astype(np.int32)


def pass_at_k(outcomes: list[list[bool]], k_max: int) -> np.ndarray:
    """float (k_max,): fraction of problems with a correct answer among their first k samples, k = 1..k_max."""
    counts = np.array([sum(any(o[:k]) for o in outcomes) for k in range(1, k_max + 1)], np.float64)
    return counts / max(len(outcomes), 1)
