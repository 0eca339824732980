"""Work across processes, in one place: global batches from each process's rows, gathers of host values, and a
local copy of the params for the engine.

Every function here is a collective when `jax.process_count() > 1`: all processes must call it, in the same order.
With one process each is a cheap local operation.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import NamedSharding


def global_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """A global array from this process's rows (the batch axis is split across processes in process order).

    Args:
        local: this process's share, e.g. (micro_steps, B_local, T) int32.
        sharding: from `jaxchat.sharding.batch_sharding`.
        global_shape: e.g. (micro_steps, B_local * process_count, T).
    """
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def global_batch_dict(local: dict, shardings: dict, batch_axis: int = 1) -> dict:
    """`global_batch` of every array of a dict; the global shape multiplies axis `batch_axis` by the process
    count (e.g. inputs (M, B_local, T) -> (M, B_local * P, T), weights (M, B_local) -> (M, B_local * P))."""
    pc = jax.process_count()
    out = {}
    for key, x in local.items():
        shape = list(x.shape)
        shape[batch_axis] *= pc
        out[key] = global_batch(np.asarray(x), shardings[key], tuple(shape))
    return out


def allgather(x) -> np.ndarray:
    """Stack of every process's numpy value of the same shape, (process_count, ...)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def any_process(flag: bool) -> bool:
    """OR of a host flag over processes (nanochat all-reduces `last_step` with MAX)."""
    return bool(np.max(allgather(np.array([int(flag)], np.int32))))


def gather_process_states(state: dict) -> list[dict]:
    """Every process's JSON-able state (e.g. a data loader's), in process order."""
    if jax.process_count() == 1:
        return [state]
    blob = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    lengths = allgather(np.array([blob.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: blob.size] = blob
    blobs = allgather(padded)
    return [json.loads(bytes(b[: int(n)]).decode()) for b, n in zip(blobs, np.ravel(lengths))]


def local_params(params):
    """A single-device copy of (replicated or sharded) global params, for the engine, CORE and samples."""
    leaves = jax.tree.leaves(params)
    if all(x.sharding.is_fully_replicated for x in leaves):
        return jax.tree.map(lambda x: x.addressable_data(0), params)
    if all(x.is_fully_addressable for x in leaves):
        return jax.device_put(params, jax.local_devices()[0])
    from jax.experimental import multihost_utils

    host = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(lambda x: jax.device_put(x, jax.local_devices()[0]), host)


def barrier(name: str) -> None:
    """Wait until every process reaches this point (e.g. after process 0 removed a directory)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
