"""The one training loop of pretraining, SFT and RL (nanochat scripts/base_train.py, chat_sft.py, chat_rl.py).

A script builds its step, hands the loop its data and hooks, and runs it:

    step = build_step(config, mesh, device_batch_size=B, seq_len=T, grad_accum=M, lrs={...}, weight_decay=wd)
    trainer = Trainer(step, config, ckpt_dir, args, init=lambda: (params, opt_state), meta={...})
    summary = trainer.run(next_batch, hparams, num_iterations=N, hooks=[Hook(250, evaluate_val_bpb)], ...)

`build_step(config, mesh, *, device_batch_size, seq_len, grad_accum, lrs, weight_decay=0.0, muon_dtype="bfloat16",
loss_fn=gpt.loss_fn, weighted=False, muon_eq="row", muon_plus=True) -> Step` needs neither data nor a tokenizer
(`--compile-for` lowers it for described devices). `Step.fn(params, opt_state, batch, hparams) -> (params,
opt_state, loss)` is ONE jitted function: batch = {'inputs', 'targets'} int32 (M, B, T) (+ 'weights' float32 (M, B)
when `weighted`), B = device_batch_size * mesh.size split over every device; a `lax.scan` over the M micro-batches
sums the gradients (nanochat's `loss / grad_accum_steps; loss.backward()`); hparams {'lrm', 'momentum',
'weight_decay'} are traced float32 scalars (no recompiles); params and opt_state are donated. The loss of a
micro-batch is `loss_fn(params, config, x, y)` (the mean over valid targets; the step averages over micro-batches)
or, weighted, `sum(w_row * sum_t nll)` (RL's policy gradient; the step sums over micro-batches). `Step.abstract_args`
are the ShapeDtypeStructs (with NamedShardings) of those four arguments.

The checkpoint rule (the divergence guard). Step s (the parameters after s updates) is saved only when
  - every parameter and optimizer-state value is finite;
  - every training loss read so far is finite, and the smoothed training loss (EMA 0.9, debiased) never rose above
    DIVERGENCE_FACTOR x its lowest value so far;
  - the val bpb, where it was measured at step s, is finite;
  - the loss of the parameters of step s themselves on the last training batch (one forward pass: a step's train
    loss is measured BEFORE its update, so it cannot vouch for the weights it produced) is finite and at most
    DIVERGENCE_FACTOR x the lowest smoothed loss.
For RL (a policy-gradient objective with no scale) only the finiteness parts apply. A loss that breaks the rule
stops the run at once with `Diverged`, naming the newest checkpoint, which satisfies the rule.

Resume: a checkpoint holds params, optimizer state, every process's loader state, and the loop state (step,
smoothed loss, best loss, min val bpb, training time, seed: every random draw of the scripts is a function of the
seed and the step), so `--resume-from-step=N|latest` continues bit for bit. Every step read back is verified against
the digests written with it (`jaxchat.checkpoint`); `latest` is the newest intact step (a damaged newer one is
skipped, saying why), an explicit damaged step is refused.

Faults. The run owns its checkpoint directory: a `checkpoint.WriterLock` is taken when the Trainer is made (before
the existing-steps check, so two runs started together on one new tag cannot both write it) and released when
`run` returns; on several hosts process 0 takes it. A run on a tag that already holds steps refuses to start without
a resume flag or `--overwrite`. A failed save (no space left, a read-only filesystem, ...) leaves no partial step and
stops the run with one line naming the error, the path and the last good step (`CheckpointWriteError`).

SIGTERM / SIGINT, from the start of `run`: once a step is done, the loop saves at the next step boundary and returns
(summary['stopped'] names the signal); before the first step (loading data, compiling: nothing to save), or on a
second signal, the process exits at once with status 128 + signal number, saying so and naming the last checkpoint. A
watcher thread makes that work while the main thread is inside XLA's compiler or blocked on the data loader, where
Python would run no signal handler.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxchat import backend
from jaxchat import checkpoint as ckpt
from jaxchat import model as gpt
from jaxchat import multihost
from jaxchat import sharding as shd
from jaxchat.common import UserError, get_base_dir, get_peak_flops, print0
from jaxchat.optim import make_optimizer, set_hparams

DIVERGENCE_FACTOR = 3.0
EMA_BETA = 0.9


class Diverged(UserError, FloatingPointError):
    """The run broke the checkpoint rule; the message names the newest good checkpoint and how to resume."""


def add_train_flags(p: argparse.ArgumentParser, save_every: int = -1) -> None:
    """The flags every training script shares (loop, checkpoints, optimizer variant). The step's own --fp8 and
    --remat come with --compile-for from `jaxchat.gpu_compile.add_flags`."""
    p.add_argument("--run", type=str, default="dummy", help="TensorBoard run name under $JAXCHAT_BASE_DIR/runs ('dummy' disables it)")
    p.add_argument("--resume-from-step", type=str, default=None, help="resume this run from checkpoint step N, or 'latest'")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints of an existing tag instead of refusing")
    p.add_argument("--save-every", type=int, default=save_every, help="save checkpoints every N steps (-1 = only at the end)")
    p.add_argument("--train-log-every", type=int, default=1, help="read the loss back and log it every N steps")
    p.add_argument("--fsdp", type=int, default=1, help="size of the mesh's 'fsdp' axis (1 = plain data parallel)")
    p.add_argument("--muon-eq", choices=("none", "row", "col"), default="row", help="MuonEq equilibration of the Muon update")
    p.add_argument("--muon-plus", action=argparse.BooleanOptionalAction, default=True, help="Muon+ (on by default)")
    p.add_argument("--muon-dtype", choices=("bfloat16", "float32", "auto"), default="bfloat16", help="dtype of Muon's Polar Express iterations: bfloat16 as nanochat; auto = float32 when the compute dtype is")
    p.add_argument("--seed", type=int, default=42, help="seed of every random draw (init, sampling)")


def parse_resume(value: str | None) -> int | str | None:
    if value in (None, "", "-1"):
        return None
    if value == "latest":
        return "latest"
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--resume-from-step={value!r}: expected a step number or 'latest'") from None


@functools.lru_cache(maxsize=None)
def step_loss_fn(fp8: bool = False, remat: str = "none") -> Callable:
    """The `loss_fn` of `build_step` for --fp8 / --remat: gpt.loss_fn, with each bound only when it differs from
    the default. Cached: the same flags give the same function, so build_step's cache returns the same step."""
    kw = {k: v for k, v in (("fp8", fp8), ("remat", remat)) if v not in (False, "none")}
    return functools.partial(gpt.loss_fn, **kw) if kw else gpt.loss_fn


def resolve_muon_dtype(name: str) -> str:
    """--muon-dtype: 'auto' -> 'float32' when the compute dtype is float32 (CPU), else 'bfloat16' (nanochat)."""
    if name == "auto":
        return "float32" if backend.compute_dtype() == jnp.float32 else "bfloat16"
    return name


# ----------------------------------------------------------------------------------------------------------------
# The jitted step


def _micro_loss(params, config, loss_fn, weighted: bool, mb: dict):
    if weighted:
        nll = loss_fn(params, config, mb["inputs"], mb["targets"], reduction="none")
        return jnp.sum(nll.sum(-1) * mb["weights"])
    return loss_fn(params, config, mb["inputs"], mb["targets"])


def train_step(params, opt_state, batch: dict, hparams: dict, *, config, optimizer, loss_fn, weighted: bool):
    """One optimizer step over the batch's M micro-batches (see the module docstring). Returns (params, opt_state,
    loss) with loss float32: the mean (or, weighted, the sum) of the micro-batch losses."""
    micro_steps = batch["inputs"].shape[0]
    grad_fn = jax.value_and_grad(lambda p, mb: _micro_loss(p, config, loss_fn, weighted, mb))
    if micro_steps == 1:
        loss, grads = grad_fn(params, jax.tree.map(lambda a: a[0], batch))
    else:
        def accumulate(carry, mb):
            loss, grads = grad_fn(params, mb)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, init, batch)
        if not weighted:
            loss = loss / micro_steps
            grads = jax.tree.map(lambda g: g / micro_steps, grads)
    opt_state = set_hparams(opt_state, **hparams)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


class Step(NamedTuple):
    fn: Callable  # jitted (params, opt_state, batch, hparams) -> (params, opt_state, loss), donating params/state
    abstract_args: tuple  # ShapeDtypeStructs with shardings of fn's four arguments
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    param_sh: object  # pytrees of NamedSharding
    opt_sh: object
    batch_sh: dict  # key -> NamedSharding of the batch arrays
    init_params: Callable  # key -> sharded params
    init_opt: Callable  # params -> sharded opt_state
    probe: Callable  # (params, batch) -> the loss of the first micro-batch (no update)


@functools.lru_cache(maxsize=8)
def _build(config, mesh, lrs: tuple, weight_decay: float, muon_dtype: str, loss_fn, weighted: bool, muon_eq: str,
           muon_plus: bool):
    abstract_params = gpt.param_shapes(config)
    param_sh = shd.param_shardings(abstract_params, mesh)
    optimizer = make_optimizer(abstract_params, config, weight_decay=weight_decay, ns_dtype=jnp.dtype(muon_dtype),
                               stack_multiple=mesh.size, muon_update_fn=shd.sharded_muon_update(mesh),
                               muon_eq=muon_eq, muon_plus=muon_plus, **dict(lrs))
    opt_sh = shd.opt_state_shardings(jax.eval_shape(optimizer.init, abstract_params), mesh)
    batch_sh = {"inputs": shd.batch_sharding(mesh, 3), "targets": shd.batch_sharding(mesh, 3)}
    if weighted:
        batch_sh["weights"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES))
    rep = shd.replicated(mesh)
    fn = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer, loss_fn=loss_fn, weighted=weighted),
                 in_shardings=(param_sh, opt_sh, batch_sh, rep), out_shardings=(param_sh, opt_sh, rep),
                 donate_argnums=(0, 1))
    probe = jax.jit(lambda p, b: _micro_loss(p, config, loss_fn, weighted, jax.tree.map(lambda a: a[0], b)))
    return Step(fn, (), optimizer, mesh, param_sh, opt_sh, batch_sh,
                jax.jit(functools.partial(gpt.init_params, config), out_shardings=param_sh),
                jax.jit(optimizer.init, out_shardings=opt_sh), probe)


def build_step(config: gpt.GPTConfig, mesh: jax.sharding.Mesh, *, device_batch_size: int, seq_len: int,
               grad_accum: int, lrs: dict, weight_decay: float = 0.0, muon_dtype: str = "bfloat16",
               loss_fn: Callable = gpt.loss_fn, weighted: bool = False, muon_eq: str = "row",
               muon_plus: bool = True) -> Step:
    """The jitted train step for `mesh` and its abstract arguments (no data, no tokenizer needed).

    Args:
        config: the model. mesh: a ('data', 'fsdp') Mesh (real or described devices); activated in jaxchat.backend.
        device_batch_size, seq_len, grad_accum: rows per device, tokens per row, micro-batches per step; they fix
            the abstract batch (grad_accum, device_batch_size * mesh.size, seq_len) (the jitted fn accepts others).
        lrs: make_optimizer's learning rates by name (embedding_lr, unembedding_lr, matrix_lr, scalar_lr).
        weight_decay: Muon's weight decay at step 0. muon_dtype: 'bfloat16' | 'float32' | 'auto'.
        loss_fn: gpt.loss_fn or a partial of it (fp8, remat). weighted: RL's per-row weighted NLL.
        muon_eq, muon_plus: passed to make_optimizer.
    Returns:
        a `Step` (compiled and cached per configuration, so repeated runs in one process share it).
    """
    backend.activate(mesh)
    step = _build(config, mesh, tuple(sorted(lrs.items())), float(weight_decay), resolve_muon_dtype(muon_dtype),
                  loss_fn, weighted, muon_eq, bool(muon_plus))
    rows = device_batch_size * mesh.size
    batch = {"inputs": (grad_accum, rows, seq_len), "targets": (grad_accum, rows, seq_len), "weights": (grad_accum, rows)}
    abstract_batch = {k: jax.ShapeDtypeStruct(batch[k], jnp.float32 if k == "weights" else jnp.int32, sharding=sh)
                      for k, sh in step.batch_sh.items()}
    abstract_params = gpt.param_shapes(config)
    rep = shd.replicated(mesh)
    abstract_hp = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep) for k in ("lrm", "momentum", "weight_decay")}
    args = (shd.abstract_with_shardings(abstract_params, step.param_sh),
            shd.abstract_with_shardings(jax.eval_shape(step.optimizer.init, abstract_params), step.opt_sh),
            abstract_batch, abstract_hp)
    return step._replace(abstract_args=args)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (one fused reduction)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def hparams_array(lrm: float, momentum: float, weight_decay: float) -> dict:
    return {"lrm": np.float32(lrm), "momentum": np.float32(momentum), "weight_decay": np.float32(weight_decay)}


# ----------------------------------------------------------------------------------------------------------------
# Logging helpers


class MetricsWriter:
    """Scalars to TensorBoard (tensorboardX) in `logdir` on process 0; a no-op when disabled (run 'dummy')."""

    def __init__(self, logdir: str | None, enabled: bool = True):
        self.writer = None
        if enabled and logdir and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir=logdir)

    def log(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if isinstance(v, (int, float, np.number)) and np.isfinite(v):
                self.writer.add_scalar(k, float(v), global_step=int(step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device; where the backend does not say (CPU), the peak resident set
    size of this process (`getrusage` ru_maxrss, KiB on Linux, bytes on macOS)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats:
        return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def fmt_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{mfu:.2f}"


class SyntheticLoader:
    """Deterministic learnable token rows for tests and benchmarks: row r of global batch i is the progression
    (start + stride * t) mod vocab_size, start/stride from `np.random.default_rng((seed, i))`; process p keeps its
    contiguous block of rows, so any process count sees the same global data. Yields (inputs, targets) int32
    (batch_size, seq_len). `get_state()` -> {'batches': i}."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, state: dict | None = None):
        self.batch_size, self.seq_len, self.vocab_size, self.seed = batch_size, seq_len, vocab_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.batches = int(state["batches"]) if state else 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng((self.seed, self.batches))
        rows = self.batch_size * self.process_count
        start, stride = rng.integers(0, self.vocab_size, (rows, 1)), rng.integers(1, 8, (rows, 1))
        tokens = (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size
        lo = self.process_index * self.batch_size
        tokens = tokens[lo:lo + self.batch_size].astype(np.int32)
        self.batches += 1
        return tokens[:, :-1], tokens[:, 1:]

    def get_state(self) -> dict:
        return {"batches": self.batches}


def micro_batches(loader, micro_steps: int) -> dict:
    """{'inputs', 'targets'} (micro_steps, B_local, T) from `micro_steps` draws of a (B, T) pair loader."""
    xs, ys = zip(*(next(loader) for _ in range(micro_steps)))
    return {"inputs": np.stack(xs), "targets": np.stack(ys)}


class Hook(NamedTuple):
    """fn(step, params) -> scalars dict (or None): at the last step when at_last, else at s % every == 0 (s > 0
    unless at_start)."""
    every: int
    fn: Callable
    at_start: bool = True
    at_last: bool = True

    def due(self, step: int, last: bool) -> bool:
        if last:
            return self.at_last
        return self.every > 0 and step % self.every == 0 and (step > 0 or self.at_start)


# ----------------------------------------------------------------------------------------------------------------
# Faults: the writer lock, signals


def _take_writer_lock(ckpt_dir: str) -> ckpt.WriterLock:
    """The checkpoint directory's WriterLock, taken by process 0; every process raises if process 0 could not."""
    lock, refused = ckpt.WriterLock(ckpt_dir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:
            refused = e
    if multihost.any_process(refused is not None):
        lock.release()
        raise refused or UserError(f"process 0 could not take the writer lock of {ckpt_dir} (see its message)")
    return lock


def _remove_steps(ckpt_dir: str) -> None:
    """--overwrite: delete everything in the directory but the writer lock this run holds."""
    for name in os.listdir(ckpt_dir):
        if name != ckpt.LOCK_FILE:
            path = os.path.join(ckpt_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


class Interrupts:
    """SIGTERM / SIGINT while a run is on (see the module docstring): `received` lists the signals' names.

    Python runs a signal handler only between bytecodes of the main thread; the C-level handler also writes the
    signal number to the wakeup fd (`signal.set_wakeup_fd`), which wakes a watcher thread however busy the main
    thread is. The watcher records the signal and, when `nothing_to_save()` or on a second signal, calls
    `on_exit(message)` and ends the process with status 128 + the signal number; in an interactive session (a REPL,
    a notebook kernel), which that would kill, it only records, and the loop stops at the next step boundary.
    """

    def __init__(self, nothing_to_save: Callable[[], bool], on_exit: Callable[[str], None]):
        self.received: list[str] = []
        self.exiting = False  # the watcher is ending the process: the loop must not report a stop of its own
        self._nothing_to_save, self._on_exit = nothing_to_save, on_exit
        self._installed = False
        self._may_exit = not (hasattr(sys, "ps1") or "ipykernel" in sys.modules)

    def __enter__(self):
        if not _in_main_thread():  # signal handlers can only be set there
            return self
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        # a Python handler must be set for the C handler to write to the wakeup fd; the watcher does the work
        self._old = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        threading.Thread(target=self._watch, name="jaxchat-signals", daemon=True).start()
        self._installed = True
        return self

    def __exit__(self, *exc):
        if not self._installed:
            return
        self._installed = False
        signal.set_wakeup_fd(self._old_fd)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._w.close()  # the watcher reads end-of-file and returns
        self._r.close()

    def _watch(self):
        while True:
            try:
                data = self._r.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in (signal.SIGTERM, signal.SIGINT):
                    continue
                name = signal.Signals(signum).name
                self.received.append(name)
                if not self._may_exit:
                    continue
                if len(self.received) > 1:
                    self._exit(signum, f"Second {name}: exiting at once, without saving")
                elif self._nothing_to_save():
                    self._exit(signum, f"Stopped by {name} before the first step of this run: nothing to save")

    def _exit(self, signum: int, message: str):
        self.exiting = True
        try:
            self._on_exit(message)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)


# ----------------------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Checkpoint directory, resume and the step loop (see the module docstring).

    Args:
        step: from `build_step`. config: the model. ckpt_dir: where this run's checkpoints go.
        args: the parsed flags of `add_train_flags` (resume_from_step, overwrite, save_every, train_log_every, run,
            seed) and the script's own (kept in meta['user_config']).
        init: () -> (params, opt_state), sharded as step.param_sh / step.opt_sh; called only when not resuming.
        meta: the script's checkpoint metadata (merged into every step's meta).
        tokenizer: its fingerprint is stored in meta and checked on resume (None: synthetic tokens).
        guard: DIVERGENCE_FACTOR, or None for only the finiteness parts of the rule (RL).
        run_prefix: TensorBoard directory prefix ('chatsft_' for SFT).
    Raises:
        UserError: existing checkpoints without a resume flag or --overwrite; a missing resume step; a checkpoint
            of another model config or tokenizer.
    """

    def __init__(self, step: Step, config, ckpt_dir: str, args, init: Callable, meta: dict | None = None,
                 tokenizer=None, guard: float | None = DIVERGENCE_FACTOR, run_prefix: str = ""):
        self.step, self.config, self.ckpt_dir, self.args = step, config, ckpt_dir, args
        self.guard, self.meta = guard, dict(meta or {})
        self.fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
        if self.fingerprint:
            self.meta["tokenizer_fingerprint"] = self.fingerprint
        resume = parse_resume(getattr(args, "resume_from_step", None))
        self.loop_state = {"step": 0, "smooth_loss": 0.0, "best_loss": math.inf, "min_val_bpb": math.inf,
                           "total_time": 0.0, "seed": getattr(args, "seed", 0)}
        self.loader_state = None
        self.lock = _take_writer_lock(ckpt_dir)
        try:
            existing = ckpt.list_steps(ckpt_dir)
            self.last_saved = existing[-1] if resume is not None and existing else None
            if resume is None:
                if existing and not args.overwrite:
                    raise UserError(f"{ckpt_dir} already holds steps {existing} of an earlier run; continue it with "
                                    f"--resume-from-step=latest (or one of those steps), choose another tag, or "
                                    f"replace it with --overwrite")
                if existing and jax.process_index() == 0:
                    _remove_steps(ckpt_dir)
                multihost.barrier("trainer-overwrite")
                self.params, self.opt_state = init()
            else:
                self._restore(existing, resume)
        except BaseException:
            self.lock.release()
            raise
        self.writer = MetricsWriter(os.path.join(get_base_dir(), "runs", run_prefix + args.run),
                                    enabled=args.run != "dummy")

    def _restore(self, existing: list[int], resume) -> None:
        if not existing:
            raise UserError(f"--resume-from-step={resume}: no checkpoint in {self.ckpt_dir}; "
                            f"{ckpt.describe_tags(os.path.dirname(self.ckpt_dir))}")
        if resume != "latest" and resume not in existing:
            raise UserError(f"--resume-from-step={resume}: {self.ckpt_dir} has steps {existing}")

        def check_meta(meta: dict, s: int) -> None:
            ckpt.check_same_model(meta, self.config, f"--resume-from-step={s} of {self.ckpt_dir}")
            ckpt.check_tokenizer(meta, self.fingerprint, f"{self.ckpt_dir} step {s}")
            if "loop_state" not in meta:
                raise UserError(f"{self.ckpt_dir} step {s} holds no training state (an older or params-only "
                                f"checkpoint); start a new run instead of --resume-from-step")

        abstract_params = gpt.param_shapes(self.config)
        restored = ckpt.restore_checkpoint(
            self.ckpt_dir, None if resume == "latest" else resume,
            shd.abstract_with_shardings(abstract_params, self.step.param_sh),
            shd.abstract_with_shardings(jax.eval_shape(self.step.optimizer.init, abstract_params), self.step.opt_sh),
            check_meta=check_meta)
        meta = restored["meta"]
        s = int(meta["step"])
        self.params, self.opt_state = restored["params"], restored["opt_state"]
        states = (restored.get("loader") or {}).get("process_states")
        if states is not None and len(states) != jax.process_count():
            raise UserError(f"{self.ckpt_dir} step {s} was written by {len(states)} processes; resume it with as many")
        self.loader_state = states[jax.process_index()] if states else None
        self.loop_state.update(meta["loop_state"])
        self.loop_state["step"] = s
        self.last_saved = s
        print0(f"Resuming from step {s} of {self.ckpt_dir}")

    # ------------------------------------------------------------------ saving and the guard

    def _where(self, hint: str = "") -> str:
        if self.last_saved is None:
            return "no checkpoint was written"
        return (f"the last good checkpoint is step {self.last_saved} in {self.ckpt_dir} (resume with "
                f"--resume-from-step={self.last_saved}{hint})")

    def _diverged(self, what: str):
        self.writer.close()
        where = self._where(", perhaps with lower learning rates")
        return Diverged(f"{what}; stopping, nothing saved after it; {where}")

    def _save(self, s: int, loader_state: dict, last_batch, val_bpb) -> None:
        ls = self.loop_state
        reasons = []
        if not bool(all_finite((self.params, self.opt_state))):
            reasons.append("parameters or optimizer state are not finite")
        if val_bpb is not None and not math.isfinite(val_bpb):
            reasons.append(f"val bpb is {val_bpb}")
        if last_batch is not None:
            probe = float(self.step.probe(self.params, last_batch))
            if not math.isfinite(probe) or (self.guard and probe > self.guard * ls["best_loss"]):
                reasons.append(f"the loss of these parameters on the last batch is {probe:.4g} (the rule allows "
                               f"{self.guard} x the best smoothed loss {ls['best_loss']:.4g})")
        if reasons:
            raise self._diverged(f"step {s} breaks the checkpoint rule: " + "; ".join(reasons))
        meta = dict(self.meta, loop_state=dict(ls, step=s), val_bpb=val_bpb)
        try:
            ckpt.save_checkpoint(self.ckpt_dir, s, self.params, self.config, meta=meta,
                                 opt_state=self.opt_state,
                                 loader_state={"process_states": multihost.gather_process_states(loader_state)})
        except ckpt.CheckpointWriteError as e:
            self.writer.close()
            raise ckpt.CheckpointWriteError(f"{e}; stopping; {self._where()}") from e
        self.last_saved = s
        print0(f"Saved checkpoint step {s} to {self.ckpt_dir}")

    # ------------------------------------------------------------------ the loop

    def run(self, next_batch: Callable, hparams: Callable, *, loader_state: Callable, num_iterations: int | None = None,
            is_last: Callable | None = None, hooks: tuple = (), tokens_per_step: int = 0, flops_per_token: int = 0,
            console: Callable | None = None) -> dict:
        """Train until the last step; returns {'losses': {step: raw loss}, 'evals': {step: scalars}, 'val_bpb':
        {step: bpb}, 'final_step', 'min_val_bpb', 'checkpoint_dir', 'last_saved', 'stopped', 'total_time'}.

        next_batch(step, params) -> (host batch dict of (M, B_local, ...) numpy arrays, metrics dict) for step;
        hparams(step) -> (lrm, momentum, weight_decay); loader_state() -> JSON dict (the state before the next
        draw); the run ends at step num_iterations or when is_last(step) (asked after drawing that step's batch).
        hooks: Hook list (a hook's 'val/bpb' scalar enters the checkpoint rule); console(step, metrics) -> extra
        text for the console line.
        Raises:
            Diverged: a non-finite or diverged loss, or a checkpoint that breaks the rule.
        """
        ls, args = self.loop_state, self.args
        start = s = int(ls["step"])
        log_every = max(1, int(getattr(args, "train_log_every", 1)))
        peak = get_peak_flops() * jax.device_count()
        losses, evals, pending = {}, {}, []
        timed = [0, 0.0]  # steps and seconds counted for the ETA (as total_time: after the first 10)

        def on_exit(message: str):
            print0(f"{message}; {self._where()}")
            self.lock.release()

        interrupts = Interrupts(lambda: ls["step"] == start, on_exit).__enter__()
        stop = interrupts.received
        last_time = [time.perf_counter()]

        def flush(keep: int = 0):
            """Read back the pending losses (one host sync), update the smoothed loss, log the newest."""
            items, pending[:] = pending[:len(pending) - keep], pending[len(pending) - keep:]
            if not items:
                return
            values = jax.device_get([it[1] for it in items])
            now = time.perf_counter()
            dt = (now - last_time[0]) / len(items)
            last_time[0] = now
            for (i, _, lrm, metrics), loss in zip(items, values):
                loss = float(loss)
                losses[i] = loss
                if i > start + 10:
                    ls["total_time"] += dt
                    timed[0], timed[1] = timed[0] + 1, timed[1] + dt
                if not math.isfinite(loss):
                    raise self._diverged(f"step {i}: training loss is {loss}")
                ls["smooth_loss"] = EMA_BETA * ls["smooth_loss"] + (1 - EMA_BETA) * loss
                smooth = ls["smooth_loss"] / (1 - EMA_BETA ** (i + 1))
                if self.guard and smooth > self.guard * ls["best_loss"]:
                    raise self._diverged(f"step {i}: smoothed training loss {smooth:.4g} is above {self.guard} x "
                                         f"the best so far ({ls['best_loss']:.4g})")
                ls["best_loss"] = min(ls["best_loss"], smooth)
            tok_per_sec = tokens_per_step / dt if dt > 0 else 0.0
            mfu = 100 * flops_per_token * tok_per_sec / peak if math.isfinite(peak) else None
            extra = console(i, metrics) if console else ""
            horizon = f"/{num_iterations:05d} ({100 * i / num_iterations:.2f}%)" if num_iterations else ""
            eta = ""
            if num_iterations:  # the mean step time after the first 10 (compilation), else this step's
                eta = f" | eta: {(num_iterations - i - 1) * (timed[1] / timed[0] if timed[0] else dt) / 60:.1f}m"
            print0(f"step {i:05d}{horizon} | loss: {smooth:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
                   f"tok/sec: {int(tok_per_sec):,} | mfu: {fmt_mfu(mfu)}{extra} | "
                   f"total time: {ls['total_time'] / 60:.2f}m{eta}")
            scalars = {"train/loss": smooth, "train/raw_loss": loss, "train/lrm": lrm, "train/dt": dt,
                       "train/tok_per_sec": tok_per_sec, "total_training_flops": flops_per_token * tokens_per_step * i,
                       "total_training_time": ls["total_time"], **metrics}
            if mfu is not None:
                scalars["train/mfu"] = mfu
            self.writer.log(i, scalars)

        def draw(i):
            state = loader_state()
            if num_iterations is not None and i >= num_iterations:
                return state, None, {}
            batch, metrics = next_batch(i, self.params)
            return state, multihost.global_batch_dict(batch, self.step.batch_sh), metrics

        try:
            state, batch, metrics = draw(s)
            last_batch = None
            while True:
                last = (s >= num_iterations) if num_iterations is not None else multihost.any_process(is_last(s))
                due = [h for h in hooks if h.due(s, last)] if not stop else []  # stopping: save and go
                if due:
                    flush()
                    for h in due:
                        out = h.fn(s, self.params)
                        if out:
                            evals.setdefault(s, {}).update(out)
                            self.writer.log(s, out)
                    last_time[0] = time.perf_counter()
                val_bpb = evals.get(s, {}).get("val/bpb")
                if val_bpb is not None:
                    ls["min_val_bpb"] = min(ls["min_val_bpb"], val_bpb)
                save = last or (s != start and args.save_every > 0 and s % args.save_every == 0)
                if (save or stop) and s != self.last_saved:
                    flush()
                    self._save(s, state, last_batch, val_bpb)
                    last_time[0] = time.perf_counter()
                if stop and not interrupts.exiting:
                    print0(f"Stopped by {stop[0]} at step {s}; resume with --resume-from-step=latest")
                    break
                if last:
                    break
                lrm, momentum, wd = hparams(s)
                self.params, self.opt_state, loss = self.step.fn(self.params, self.opt_state, batch,
                                                                 hparams_array(lrm, momentum, wd))
                pending.append((s, loss, lrm, metrics))
                last_batch = batch
                s += 1
                ls["step"] = s
                state, batch, metrics = draw(s)  # the host prepares the next batch while the device works
                if len(pending) > log_every:
                    flush(keep=1)
            flush()
            peak_mem = peak_memory_bytes()
            if peak_mem:
                self.writer.log(s, {"peak_memory_mib": peak_mem / 2**20})
        finally:
            interrupts.__exit__()
            self.writer.close()
            self.lock.release()
        return {"losses": losses, "evals": evals, "final_step": s, "checkpoint_dir": self.ckpt_dir,
                "val_bpb": {k: v["val/bpb"] for k, v in evals.items() if "val/bpb" in v},
                "min_val_bpb": ls["min_val_bpb"], "last_saved": self.last_saved,
                "stopped": stop[0] if stop else None, "total_time": ls["total_time"]}


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
