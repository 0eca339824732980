"""Pieces of a training loop shared by pretraining and SFT: the jitted train step with gradient accumulation,
global batches, a synthetic data source, validation bits-per-byte on sharded batches, TensorBoard metrics, the
console line with ETA, and loader-state gathering across processes.

Validation bits per byte is `jaxchat.loss_eval.evaluate_bpb` (it accepts the global sharded batches made here).

The train step is ONE jitted function `train_step(params, opt_state, inputs, targets, hparams)`:
inputs/targets are (micro_steps, B, T) with B split over every device; a `lax.scan` over the micro-steps sums the
gradients (nanochat's `loss / grad_accum_steps; loss.backward()` loop), the per-step hyperparameters (lr
multiplier, Muon momentum and weight decay) enter as traced scalars so they never recompile, and params/opt_state
are donated. Gradient all-reduce (and the ZeRO-1 reduce-scatter / all-gather) is left to XLA's SPMD partitioner: the
loss is the mean over the GLOBAL batch, so no hand-written psum exists that could double-count.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxchat import model as gpt
from jaxchat.optim import set_hparams
from jaxchat.sharding import global_batch

# ----------------------------------------------------------------------------------------------------------------
# The train step


def train_step(params, opt_state, inputs: jax.Array, targets: jax.Array, hparams: dict, *, config: gpt.GPTConfig,
               optimizer: optax.GradientTransformation, loss_fn: Callable = gpt.loss_fn):
    """One optimizer step over `micro_steps` accumulated micro-batches.

    Args:
        params, opt_state: current state (donated when jitted with `jit_train_step`).
        inputs, targets: int32 (micro_steps, B, T); targets == -1 are ignored by the loss.
        hparams: {'lrm', 'momentum', 'weight_decay'} float32 scalars for `jaxchat.optim.set_hparams`.
        config: the model config (static). optimizer: from `jaxchat.optim.make_optimizer` (static).
        loss_fn: `loss_fn(params, config, idx, targets) -> scalar mean loss` (default the GPT's).
    Returns:
        (params, opt_state, loss): loss is the float32 mean over micro-steps of each micro-batch's mean loss
        (nanochat divides each micro loss by grad_accum_steps before backward: same gradient).
    """
    micro_steps = inputs.shape[0]
    grad_fn = jax.value_and_grad(lambda p, x, y: loss_fn(p, config, x, y))

    def accumulate(carry, xy):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, *xy)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    if micro_steps == 1:
        loss, grads = grad_fn(params, inputs[0], targets[0])
    else:
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (inputs, targets))
        loss = loss / micro_steps
        grads = jax.tree.map(lambda g: g / micro_steps, grads)
    opt_state = set_hparams(opt_state, **hparams)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


def jit_train_step(config, optimizer, param_sh, opt_sh, batch_sh, loss_fn: Callable = gpt.loss_fn):
    """`train_step` jitted with explicit in/out shardings and donated params and opt_state.

    param_sh / opt_sh: pytrees of NamedSharding (jaxchat.sharding); batch_sh: `batch_sharding(mesh)`.
    """
    rep = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
    fn = functools.partial(train_step, config=config, optimizer=optimizer, loss_fn=loss_fn)
    return jax.jit(fn, in_shardings=(param_sh, opt_sh, batch_sh, batch_sh, rep),
                   out_shardings=(param_sh, opt_sh, rep), donate_argnums=(0, 1))


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (one fused reduction, one host sync when read)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def hparams_array(lrm: float, momentum: float, weight_decay: float) -> dict:
    """The per-step hyperparameters as float32 numpy scalars (host values: no recompile when they change)."""
    return {"lrm": np.float32(lrm), "momentum": np.float32(momentum), "weight_decay": np.float32(weight_decay)}


# ----------------------------------------------------------------------------------------------------------------
# Data


class SyntheticLoader:
    """Deterministic learnable token rows, for tests and benchmarks (no tokenizer, no shards).

    Row r of global batch i is an arithmetic progression (start + stride * t) mod vocab_size with start/stride
    drawn from `np.random.default_rng((seed, i))`; the GLOBAL batch depends only on (seed, i), and process p keeps
    its contiguous block of rows, so any process count sees the same global data. Yields (inputs, targets) int32
    (batch_size, seq_len) with targets the inputs shifted by one. `get_state()` -> {'batches': i}.
    """

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, state: dict | None = None):
        self.batch_size, self.seq_len, self.vocab_size, self.seed = batch_size, seq_len, vocab_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.batches = int(state["batches"]) if state else 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.batches))
        rows = self.batch_size * self.process_count
        start = rng.integers(0, self.vocab_size, (rows, 1))
        stride = rng.integers(1, 8, (rows, 1))
        tokens = (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size
        lo = self.process_index * self.batch_size
        tokens = tokens[lo:lo + self.batch_size].astype(np.int32)
        self.batches += 1
        return tokens[:, :-1], tokens[:, 1:]

    def get_state(self) -> dict:
        return {"batches": self.batches}


def next_global_batch(loader: Iterator, micro_steps: int, sharding, process_count: int):
    """Draw `micro_steps` local (B, T) batches and make them one global (micro_steps, B * processes, T) pair."""
    xs, ys = zip(*(next(loader) for _ in range(micro_steps)))
    x, y = np.stack(xs), np.stack(ys)
    shape = (micro_steps, x.shape[1] * process_count, x.shape[2])
    return global_batch(x, sharding, shape), global_batch(y, sharding, shape)


def gather_process_states(state: dict) -> list[dict]:
    """Every process's JSON-able loader state, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([blob.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(b[: int(n)]).decode()) for b, n in zip(blobs, np.ravel(lengths))]


# ----------------------------------------------------------------------------------------------------------------
# Logging


class MetricsWriter:
    """Scalars to TensorBoard (tensorboardX) in `logdir` on process 0; a no-op for run 'dummy' (nanochat's wandb
    convention) and on other processes."""

    def __init__(self, logdir: str | None, enabled: bool = True):
        self.writer = None
        if enabled and logdir and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir=logdir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is not None and np.isfinite(v):
                self.writer.add_scalar(k, float(v), global_step=int(step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device (`memory_stats()`), None where the backend does not say (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


class StepTimer:
    """Training-time bookkeeping as nanochat's loop: the first `skip` steps (compilation) are excluded from the
    total, and the ETA is the remaining steps times the mean time of the counted ones."""

    def __init__(self, total_training_time: float = 0.0, skip: int = 10):
        self.total = total_training_time
        self.skip = skip

    def add(self, step: int, dt: float) -> None:
        if step > self.skip:
            self.total += dt

    def eta_seconds(self, step: int, num_iterations: int) -> float | None:
        done = step - self.skip
        if done <= 0:
            return None
        return (num_iterations - step) * self.total / done


def console_line(step: int, num_iterations: int, loss: float, lrm: float, dt: float, tok_per_sec: float, mfu: float,
                 total_time: float, eta: float | None, epoch: str = "") -> str:
    """nanochat's per-step console line."""
    pct = 100 * step / max(num_iterations, 1)
    eta_str = f" | eta: {eta / 60:.1f}m" if eta is not None else ""
    epoch_str = f" | epoch: {epoch}" if epoch else ""
    return (f"step {step:05d}/{num_iterations:05d} ({pct:.2f}%) | loss: {loss:.6f} | lrm: {lrm:.2f} | "
            f"dt: {dt * 1000:.2f}ms | tok/sec: {int(tok_per_sec):,} | mfu: {mfu:.2f}{epoch_str} | "
            f"total time: {total_time / 60:.2f}m{eta_str}")


def timestamp() -> float:
    return time.perf_counter()
