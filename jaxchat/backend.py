"""Backend decisions in one place, taken from the devices a computation is placed on.

Every platform-dependent choice in jaxchat (the compute dtype, the attention kernel, the engine's CPU weight
layout, the CPU-only huge-page malloc restart) is made here, from the platform of the devices the mesh is built
on, and never from `jax.default_backend()`. That is what lets `--compile-for=h100:1x8` compile the real GPU path
on a CPU-only machine: there `jax.default_backend()` stays "cpu" while the mesh holds (described) H100 devices.

Entry points call `activate(mesh)` once their mesh exists; library code asks `platform()`, `compute_dtype()`,
`attention_impl()` while tracing. `use(mesh)` does the same for a `with` block (tests, `--compile-for`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

_active: str | None = None  # the platform set by activate()/use(); None: the first visible device's
_active_devices: int | None = None  # how many devices the mesh given to activate()/use() spans


def platform_of(where: Any) -> str:
    """Platform name ("cpu", "gpu", "tpu") of what a computation is placed on.

    where: a `jax.sharding.Mesh`, a `Sharding`, a `jax.Device`, a sequence of devices, a `jax.Array`, or a
    platform name. CUDA and ROCm devices are both "gpu".

    Raises:
        TypeError: where is none of those.
    """
    if isinstance(where, str):
        name = where.lower()
    elif isinstance(where, jax.sharding.Mesh):
        name = where.devices.flat[0].platform
    elif isinstance(where, jax.sharding.Sharding):
        name = next(iter(where.device_set)).platform
    elif isinstance(where, jax.Array):
        name = next(iter(where.devices())).platform
    elif hasattr(where, "platform"):
        name = where.platform
    elif isinstance(where, (list, tuple)) and where:
        return platform_of(where[0])
    else:
        raise TypeError(f"cannot tell the platform of {type(where).__name__}: pass a Mesh, Sharding, device or array")
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def _size_of(where: Any) -> int | None:
    if isinstance(where, jax.sharding.Mesh):
        return int(where.devices.size)
    if isinstance(where, jax.sharding.Sharding):
        return len(where.device_set)
    if isinstance(where, (list, tuple)) and where and hasattr(where[0], "platform"):
        return len(where)
    return None


def activate(where: Any) -> str:
    """Make the platform of `where` (see `platform_of`) the one every later decision follows, and, for a Mesh,
    its size the one `device_count()` returns. Returns the platform."""
    global _active, _active_devices
    _active, _active_devices = platform_of(where), _size_of(where)
    return _active


@contextlib.contextmanager
def use(where: Any):
    """`activate(where)` for the duration of a `with` block, then restore the previous choice."""
    global _active, _active_devices
    previous = _active, _active_devices
    _active, _active_devices = platform_of(where), _size_of(where)
    try:
        yield _active
    finally:
        _active, _active_devices = previous


def platform() -> str:
    """The active platform: the one set by `activate`/`use`, else that of the first visible device."""
    return _active or platform_of(jax.devices()[0])


def device_count() -> int:
    """Devices the computation being traced is split over: the size of the mesh given to `activate`/`use`, else
    `jax.device_count()` (under `--compile-for` the described GPUs, not this machine's CPUs)."""
    return _active_devices or jax.device_count()


_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def compute_dtype(platform_name: str | None = None) -> jnp.dtype:
    """dtype of matmuls and activations (master weights stay float32), as nanochat's `COMPUTE_DTYPE`.

    `$JAXCHAT_DTYPE` (float32, bfloat16 or float16) wins; otherwise bfloat16 on GPU/TPU and float32 on CPU (CPU
    bfloat16 matmuls are slow and imprecise).

    Raises:
        ValueError: `$JAXCHAT_DTYPE` names another dtype.
    """
    env = os.environ.get("JAXCHAT_DTYPE")
    if env:
        if env.lower() not in _DTYPES:
            raise ValueError(f"JAXCHAT_DTYPE={env!r}: expected one of float32, bfloat16, float16")
        return jnp.dtype(_DTYPES[env.lower()])
    return jnp.dtype(jnp.float32 if (platform_name or platform()) == "cpu" else jnp.bfloat16)


def embedding_dtype(platform_name: str | None = None) -> jnp.dtype:
    """Storage dtype of the embedding tables (`wte`, value embeddings): bfloat16 on GPU when the compute dtype is
    bfloat16, as nanochat casts them to COMPUTE_DTYPE (AdamW tolerates it; half the memory and reads), else
    float32 (CPU; float16 compute, which nanochat keeps in float32 too)."""
    name = platform_name or platform()
    bf16 = name == "gpu" and compute_dtype(name) == jnp.bfloat16
    return jnp.dtype(jnp.bfloat16 if bf16 else jnp.float32)


def attention_impl(dtype, platform_name: str | None = None) -> str:
    """"cudnn" (flash attention through `jax.nn.dot_product_attention`) on GPU in bfloat16/float16, else "xla"."""
    on_gpu = (platform_name or platform()) == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def decode_weights_swapped(platform_name: str | None = None) -> bool:
    """True on CPU, where the engine's decode loop reads a second copy of the weights stored (in, out)."""
    return (platform_name or platform()) == "cpu"


def two_reduction_argmax(platform_name: str | None = None) -> bool:
    """True on CPU, where greedy decoding takes argmax as a max and then the first index holding it (two plain
    reductions, the same first-index tie-break): XLA's CPU backend runs its variadic (value, index) reduce slower
    (README, "Where the CPU time goes"). Elsewhere `jnp.argmax`."""
    return (platform_name or platform()) == "cpu"


def launch_platform() -> str:
    """The platform this process will run on, told before JAX initialises any backend (which on a GPU would
    take its memory): the first entry of `$JAX_PLATFORMS` when set, "gpu" when a CUDA/ROCm plugin is installed and a
    GPU device node exists, else "cpu"."""
    env = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if env:
        return platform_of(env)
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
    has_plugin = any(importlib.util.find_spec(name) is not None for name in plugins)
    has_device = os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")
    return "gpu" if has_plugin and has_device else "cpu"
