"""Bits per byte (bpb) of a model on a token stream (nanochat `nanochat/loss_eval.py`).

bpb = (sum of next-token losses in nats) / (ln 2 * sum of the UTF-8 byte lengths of those target tokens).
Normalising by bytes instead of tokens makes models with different vocabularies comparable. Targets whose byte
length is 0 (special tokens such as <|bos|>) and ignored targets (< 0) count neither loss nor bytes.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames=("config", "loss_fn"))
def _bpb_sums(params, x, y, token_bytes, config, loss_fn):
    """(sum of counted losses in nats float32, sum of counted bytes int32) of one batch."""
    losses = loss_fn(params, config, x, y, reduction="none")            # (B, T), 0 where y < 0
    valid = y >= 0
    nbytes = jnp.where(valid, token_bytes[jnp.where(valid, y, 0)], 0)   # never index with a negative target
    counted = nbytes > 0
    return jnp.sum(jnp.where(counted, losses, 0.0)), jnp.sum(nbytes)


def evaluate_bpb(params, config, batches: Iterable, steps: int, token_bytes, loss_fn: Callable | None = None) -> float:
    """Bits per byte over `steps` batches (nanochat `evaluate_bpb`).

    Args:
        params, config: the model (`jaxchat.model` params and GPTConfig).
        batches: iterator of (inputs, targets), int (B, T) numpy or jax arrays; targets < 0 are ignored. Global
            (possibly multi-host sharded) jax Arrays are summed as a whole; host numpy batches in a multi-process
            job are each process's own rows and the totals are added up across processes at the end.
        steps: number of batches to consume.
        token_bytes: (vocab_size,) int, UTF-8 length of each token, 0 for tokens not to count (special tokens).
        loss_fn: per-token loss, default `jaxchat.model.loss_fn` (must accept reduction='none').
    Returns:
        bits per byte as a Python float; inf when no byte was counted.
    Raises:
        ValueError: steps < 1, or the iterator ran out before `steps` batches.
    """
    if steps < 1:
        raise ValueError(f"evaluate_bpb: steps must be >= 1, got {steps}")
    if loss_fn is None:
        from jaxchat.model import loss_fn
    token_bytes = jnp.asarray(np.asarray(token_bytes), dtype=jnp.int32)
    it = iter(batches)
    sums = []  # device scalars; read back once at the end so no step waits on the host
    host_local = False
    for step in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"evaluate_bpb: batches ran out after {step} of {steps} steps") from None
        host_local = host_local or not isinstance(x, jax.Array)
        sums.append(_bpb_sums(params, jnp.asarray(x) if not isinstance(x, jax.Array) else x,
                              jnp.asarray(y) if not isinstance(y, jax.Array) else y, token_bytes, config, loss_fn))
    nats_bytes = jax.device_get(sums)
    # per-step partial sums are added in float64/int64 on the host: int32 bytes or float32 nats summed over a long
    # evaluation would overflow or lose digits
    total_nats = float(np.sum([np.float64(n) for n, _ in nats_bytes]))
    total_bytes = int(np.sum([np.int64(b) for _, b in nats_bytes]))
    if host_local and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        # without jax_enable_x64 the gather is 32-bit: send nats as float32 value + remainder, bytes as 20-bit halves
        hi = np.float32(total_nats)
        nats = np.asarray(multihost_utils.process_allgather(np.array([hi, total_nats - hi], np.float32)))
        nb = np.asarray(multihost_utils.process_allgather(
            np.array([total_bytes >> 20, total_bytes & 0xFFFFF], np.int32)))
        total_nats = float(nats.astype(np.float64).sum())
        total_bytes = int((nb[:, 0].astype(np.int64) << 20).sum() + nb[:, 1].astype(np.int64).sum())
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
