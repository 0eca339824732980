"""Shared utilities: base directory, process-0 logging, compute dtype, device and process info.

Mirrors the job of nanochat's `nanochat/common.py`, written for JAX: the distributed runtime is
`jax.distributed`, and "rank" means `jax.process_index()`.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp

logger = logging.getLogger("jaxchat")


def get_base_dir() -> str:
    """Directory that holds tokenizer, shards, checkpoints, runs and reports.

    `$JAXCHAT_BASE_DIR` if set, else `~/.cache/jaxchat`. Created if missing.
    """
    base = os.environ.get("JAXCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxchat")
    os.makedirs(base, exist_ok=True)
    return base


def is_main_process() -> bool:
    """True on JAX process 0 (the only process that logs, writes reports and TensorBoard events)."""
    try:
        return jax.process_index() == 0
    except Exception:  # backend not initialised yet; fall back to launcher env
        return int(os.environ.get("JAX_PROCESS_ID", os.environ.get("RANK", "0"))) == 0


def print0(*args, **kwargs) -> None:
    """`print` on process 0 only (flushes, so progress shows under pipes and nohup)."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr on process 0; other processes log warnings and errors only."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if is_main_process() else logging.WARNING)


def pow2_bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= n, at least `minimum` and at most `cap`: padded lengths drawn from a few sizes,
    so that only a few shapes ever compile (prompts, caches, eval and rollout batches)."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return size if cap is None else min(size, cap)


def compute_dtype() -> jnp.dtype:
    """dtype for matmuls and activations on the active platform: see `jaxchat.backend.compute_dtype`."""
    from jaxchat import backend

    return backend.compute_dtype()


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_malloc_applies() -> bool:
    """True where `glibc.malloc.hugetlb=1` takes effect and pays: Linux, glibc >= 2.35 (older glibc ignores the
    tunable) and transparent huge pages in `madvise` mode (`always` needs nothing, `never` gains nothing)."""
    if sys.platform != "linux":
        return False
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_madvise = "[madvise]" in f.read()
    except (ValueError, OSError, AttributeError):
        return False
    return libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35) and thp_madvise


def reexec_with_hugepage_malloc() -> None:
    """Restart this process with glibc's malloc backing its large blocks by transparent huge pages.

    Why: XLA on CPU allocates each train step's temporaries as one fresh block (hundreds of MB at d4), which
    glibc maps anew and the kernel then faults in 4 KiB at a time: ~10% of a CPU step. With 2 MiB pages the
    faults all but vanish (measured: d4 `train.bench`, 690-770 -> 630-680 ms). glibc reads the tunable only at
    start-up, hence the exec: it keeps the pid, argv, cwd and environment (plus `GLIBC_TUNABLES`), and happens
    before any work, so a launcher sees nothing but a slightly later start.

    A no-op unless `hugepage_malloc_applies()`, the tunable is not already set, and `$JAXCHAT_NO_REEXEC` is unset
    (set it to opt out), and only where the process will run on CPU (`jaxchat.backend.launch_platform`).
    Call it first thing in an entry point's `__main__`.
    """
    env = os.environ
    from jaxchat import backend

    if env.get("JAXCHAT_NO_REEXEC") or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", "") or \
            backend.launch_platform() != "cpu" or not hugepage_malloc_applies():
        return
    tunables = ":".join(t for t in (env.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(env, GLIBC_TUNABLES=tunables))


def maybe_init_distributed() -> None:
    """Call `jax.distributed.initialize()` when the environment describes a multi-process job.

    Triggers on `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or on a SLURM /
    Open MPI launch that JAX auto-detects (`SLURM_NTASKS` > 1, `OMPI_COMM_WORLD_SIZE` > 1). A no-op for a
    single process and when already initialised.
    """
    if getattr(maybe_init_distributed, "_done", False):
        return
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
    maybe_init_distributed._done = True


def get_dist_info() -> tuple[int, int, int, int]:
    """(process_index, process_count, local_device_count, device_count) of the JAX runtime."""
    return jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()


def device_kind() -> str:
    """Name of the first device, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'."""
    return jax.devices()[0].device_kind


# Peak dense bf16 matmul throughput (FLOP/s) per device, for MFU; as nanochat's `get_peak_flops` table.
_PEAK_FLOPS = [
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("b200", 2250e12), ("gb200", 2500e12),
    ("a100", 312e12), ("a10g", 125e12), ("l40s", 362e12), ("l4", 121e12), ("4090", 165e12),
    ("3090", 71e12), ("v100", 125e12), ("tpu v5p", 459e12), ("tpu v5e", 197e12), ("tpu v5 lite", 197e12),
    ("tpu v4", 275e12), ("tpu v6", 918e12),
]

# Peak memory bandwidth (bytes/s) per device, for MBU in the inference benchmark.
_PEAK_BANDWIDTH = [
    ("h200", 4.8e12), ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("a100", 2.0e12),
    ("b200", 8.0e12), ("l40s", 0.864e12), ("4090", 1.0e12), ("tpu v5p", 2.76e12), ("tpu v5e", 0.82e12),
]


def _lookup(table, kind: str) -> float | None:
    kind = kind.lower()
    for key, value in table:
        if key in kind:
            return value
    return None


def get_peak_flops(kind: str | None = None) -> float:
    """Peak bf16 FLOP/s of one device of this kind; `inf` when unknown (MFU then reads 0, never a lie)."""
    value = _lookup(_PEAK_FLOPS, kind or device_kind())
    return float("inf") if value is None else value


def get_peak_bandwidth(kind: str | None = None) -> float | None:
    """Peak HBM bandwidth in bytes/s of one device of this kind, or None when unknown (e.g. CPU)."""
    return _lookup(_PEAK_BANDWIDTH, kind or device_kind())


class UserError(Exception):
    """A mistake the user can fix (a missing file, a bad flag, a corrupt shard). `run_cli` prints its message as
    one line and exits with status 2; the message names the file, flag or field, and the command that fixes it."""


class MissingInputError(UserError, FileNotFoundError):
    """A `UserError` for a file the user has to create (no tokenizer, no shards): still a `FileNotFoundError`, so
    callers that catch that keep working."""


class BadInputError(UserError, ValueError):
    """A `UserError` for a file or value the user has to fix (a corrupt or empty shard): still a `ValueError`."""


def quiet_library_logs() -> None:
    """Silence the INFO chatter of absl and orbax (dozens of lines at start-up); warnings and errors still show."""
    for name in ("absl", "orbax", "orbax.checkpoint", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def run_cli(main, *args, **kwargs):
    """Run an entry point's `main`: a `UserError` becomes one line on stderr and exit status 2, Ctrl-C (outside the
    training loop, which handles it itself) the line 'interrupted' and status 130 (the traceback only with
    `$JAXCHAT_DEBUG=1`); library INFO logs are quieted first. Returns what `main` returns."""
    quiet_library_logs()
    try:
        return main(*args, **kwargs)
    except (UserError, KeyboardInterrupt) as e:
        if os.environ.get("JAXCHAT_DEBUG") == "1":
            raise
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)  # one line, whatever it wraps
        sys.exit(2)
