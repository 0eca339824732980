"""Pretrain the base model: `python -m train.pretrain --depth=20` (nanochat `scripts/base_train.py`).

One dial, --depth, sets everything else exactly as nanochat does:
  n_embd = depth * aspect_ratio rounded up to a multiple of head_dim; n_head = n_embd / head_dim;
  horizon: --num-iterations, else --target-flops / (flops_per_token * batch), else target_param_data_ratio *
    scaling params (transformer matrices + lm_head) tokens;
  total batch (auto): 2**19 tokens at d12, scaled by (D / D_d12) ** 0.383 (Power Lines, arXiv 2505.13738) and
    rounded to a power of two;
  learning rates scaled by sqrt(B / 2**19); Muon weight decay scaled by sqrt(B / 2**19) * D_d12 / D (T_epoch,
    arXiv 2405.13698), then cosine-decayed to 0 over the run.
`--dry-run` prints that plan as one JSON line and exits.

Distributed: one mesh over every device of every process (jaxchat.sharding); launch one process per host with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or SLURM). Each process reads its own share of the
data. Examples:

    python -m train.pretrain --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20        # CPU smoke run, as nanochat's
    python -m train.pretrain --depth=20 --run=d20                                # 8xH100, TensorBoard in runs/d20
    python -m train.pretrain --depth=26 --dry-run                                # just print the plan
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import checkpoint as ckpt
from jaxchat import gpu_compile
from jaxchat import model as gpt
from jaxchat import schedules as sched
from jaxchat.engine import SAMPLE_PROMPTS
from jaxchat.common import (get_base_dir, get_peak_flops, maybe_init_distributed, print0, compute_dtype,
                            device_kind, reexec_with_hugepage_malloc)

B_REF = 2 ** 19  # nanochat: optimal total batch at d12, in tokens
BATCH_EXPONENT = 0.383  # nanochat: B_opt ~ D ** 0.383
D_REF_DEPTH = 12
DEFAULT_VOCAB = 32768  # nanochat's tokenizer size; used by --dry-run when no tokenizer is trained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description="Pretrain the base model (nanochat base_train)")
    # Logging
    p.add_argument("--run", type=str, default="dummy", help="TensorBoard run name under $JAXCHAT_BASE_DIR/runs ('dummy' disables logging)")
    # Model architecture
    p.add_argument("--depth", type=int, default=20, help="depth of the Transformer model")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=128, help="target head dimension for attention")
    p.add_argument("--max-seq-len", type=int, default=2048, help="max context length")
    p.add_argument("--window-pattern", type=str, default="SSSL", help="sliding window pattern tiled across layers: L=full, S=quarter context (e.g. 'SSL')")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocab size (default: the tokenizer's; 32768 for --dry-run without one)")
    # Training horizon (first one set wins)
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimization steps (-1 = disable)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="calculate num_iterations to reach target_flops (-1 = disable)")
    p.add_argument("--target-param-data-ratio", type=float, default=10.5, help="calculate num_iterations to maintain data:param ratio (Chinchilla=20, -1 = disable)")
    # Optimization
    p.add_argument("--device-batch-size", type=int, default=32, help="per-device batch size (rows)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="total batch size in tokens (-1 = auto-compute optimal)")
    p.add_argument("--embedding-lr", type=float, default=0.3, help="learning rate for embedding parameters (AdamW)")
    p.add_argument("--unembedding-lr", type=float, default=0.008, help="learning rate for unembedding parameters (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.28, help="cautious weight decay for the Muon optimizer (for weights)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="learning rate for matrix parameters (Muon)")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="learning rate for scalars (resid_lambdas, x0_lambdas)")
    p.add_argument("--warmup-steps", type=int, default=40, help="number of steps for LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="ratio of iterations for LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR as fraction of initial LR")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume training from this step (-1 = disable)")
    # Evaluation
    p.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (-1 = disable)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288, help="number of tokens to evaluate val loss on")
    p.add_argument("--core-metric-every", type=int, default=2000, help="evaluate CORE metric every N steps (-1 = disable)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per task for CORE metric")
    p.add_argument("--sample-every", type=int, default=2000, help="sample from model every N steps (-1 = disable)")
    p.add_argument("--save-every", type=int, default=-1, help="save checkpoints every N steps (-1 = only at end)")
    # Output
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    # jaxchat additions
    p.add_argument("--dry-run", action="store_true", help="print the training plan as one JSON line and exit")
    p.add_argument("--fsdp", type=int, default=1, help="size of the mesh's 'fsdp' axis (1 = plain data parallel)")
    p.add_argument("--data", choices=("shards", "synthetic"), default="shards", help="training data: parquet shards of $JAXCHAT_BASE_DIR/base_data, or synthetic token progressions (tests, benchmarks)")
    p.add_argument("--seed", type=int, default=42, help="parameter init seed (nanochat: torch.manual_seed(42))")
    p.add_argument("--muon-dtype", choices=("bfloat16", "float32", "auto"), default="bfloat16", help="dtype of Muon's Polar Express iterations: bfloat16 as nanochat; float32 for exact comparisons; auto = float32 when the compute dtype is float32")
    gpu_compile.add_flags(p)  # --compile-for, --hlo-out, --fp8, --remat, --device-batch-size=auto
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "fsdp"):
        if getattr(args, flag) != "auto" and getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.vocab_size is not None and args.vocab_size <= 0:
        raise SystemExit(f"--vocab-size must be positive, got {args.vocab_size}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The single dial


def model_config(args, vocab_size: int, depth: int | None = None) -> gpt.GPTConfig:
    """GPTConfig for `depth` (default --depth): width rounded up to a multiple of --head-dim (nanochat
    `build_model_meta`)."""
    depth = args.depth if depth is None else depth
    n_embd = -(-depth * args.aspect_ratio // args.head_dim) * args.head_dim
    n_head = n_embd // args.head_dim
    return gpt.GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                         n_kv_head=n_head, n_embd=n_embd, window_pattern=args.window_pattern)


def scaling_params(config: gpt.GPTConfig) -> int:
    """Parameters that enter the scaling laws: transformer matrices + lm_head (nanochat `get_scaling_params`)."""
    counts = gpt.num_scaling_params(config)
    return counts["transformer_matrices"] + counts["lm_head"]


def make_plan(args, vocab_size: int, num_devices: int, strict: bool = True) -> dict:
    """Everything --depth and the flags imply, with nanochat's arithmetic (scripts/base_train.py).

    Returns a JSON-able dict: model_config, param_counts, num_scaling_params, flops_per_token, target_tokens,
    total_batch_size, batch_lr_scale, learning_rates, weight_decay, num_iterations, horizon, total_tokens,
    tokens_per_param, total_flops, tokens_per_fwdbwd, world_tokens_per_fwdbwd, grad_accum_steps, num_devices.
    Raises:
        ValueError: no horizon; auto batch size without a data:param ratio; a total batch size that is not a
            multiple of device_batch_size * max_seq_len * devices (names the flags; with strict=False that last
            one is reported as plan['error'] with grad_accum_steps None instead, for --dry-run).
    """
    config = model_config(args, vocab_size)
    counts = gpt.num_scaling_params(config)
    flops_per_token = gpt.estimate_flops(config)
    n_scaling = scaling_params(config)
    target_tokens = int(args.target_param_data_ratio * n_scaling)
    d_ref = args.target_param_data_ratio * scaling_params(model_config(args, vocab_size, D_REF_DEPTH))

    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        if args.target_param_data_ratio <= 0:
            raise ValueError("--total-batch-size=-1 (auto) needs a positive --target-param-data-ratio")
        predicted = B_REF * (target_tokens / d_ref) ** BATCH_EXPONENT
        total_batch_size = 2 ** round(math.log2(predicted))
    if total_batch_size <= 0:
        raise ValueError(f"--total-batch-size must be positive or -1, got {total_batch_size}")
    batch_lr_scale = (total_batch_size / B_REF) ** 0.5
    if args.target_param_data_ratio > 0:
        weight_decay = args.weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens)
    else:  # nanochat's formula needs a data horizon; without one keep the flag's value
        weight_decay = args.weight_decay

    if args.num_iterations > 0:
        num_iterations, horizon = args.num_iterations, "num_iterations"
    elif args.target_flops > 0:
        num_iterations, horizon = round(args.target_flops / (flops_per_token * total_batch_size)), "target_flops"
    elif args.target_param_data_ratio > 0:
        num_iterations, horizon = target_tokens // total_batch_size, "target_param_data_ratio"
    else:
        raise ValueError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
    total_tokens = total_batch_size * num_iterations

    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens = tokens_per_fwdbwd * num_devices
    error = None
    if total_batch_size % world_tokens:
        error = (f"--total-batch-size={total_batch_size} is not a multiple of --device-batch-size "
                 f"({args.device_batch_size}) x --max-seq-len ({args.max_seq_len}) x {num_devices} devices "
                 f"= {world_tokens} tokens")
        if strict:
            raise ValueError(error)
    plan = {
        "model_config": config.to_dict(),
        "param_counts": counts,
        "num_scaling_params": n_scaling,
        "flops_per_token": flops_per_token,
        "target_tokens": target_tokens,
        "total_batch_size": total_batch_size,
        "batch_lr_scale": batch_lr_scale,
        "learning_rates": {
            "embedding_lr": args.embedding_lr * batch_lr_scale,
            "unembedding_lr": args.unembedding_lr * batch_lr_scale,
            "matrix_lr": args.matrix_lr * batch_lr_scale,
            "scalar_lr": args.scalar_lr * batch_lr_scale,
        },
        "weight_decay": weight_decay,
        "num_iterations": num_iterations,
        "horizon": horizon,
        "total_tokens": total_tokens,
        "tokens_per_param": total_tokens / n_scaling,
        "total_flops": flops_per_token * total_tokens,
        "tokens_per_fwdbwd": tokens_per_fwdbwd,
        "world_tokens_per_fwdbwd": world_tokens,
        "grad_accum_steps": None if error else total_batch_size // world_tokens,
        "num_devices": num_devices,
    }
    if error:
        plan["error"] = error
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Schedules (nanochat base_train: get_lr_multiplier, get_muon_momentum, get_weight_decay)


def schedules(step: int, num_iterations: int, args, weight_decay: float) -> tuple[float, float, float]:
    """(lr multiplier, Muon momentum, Muon weight decay) at `step` (jaxchat.schedules, nanochat's formulas)."""
    return (sched.lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac),
            sched.muon_momentum(step, num_iterations, args.warmdown_ratio),
            sched.muon_weight_decay(step, num_iterations, weight_decay))


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _vocab_for_dry_run(args) -> int:
    if args.vocab_size:
        return args.vocab_size
    try:
        from jaxchat.tokenizer import get_tokenizer
        return get_tokenizer().get_vocab_size()
    except (FileNotFoundError, ImportError, OSError):
        return DEFAULT_VOCAB


def _local_params(params):
    """A single-device copy of (replicated or sharded) global params, for the engine and CORE. Collective when
    the params are not fully addressable from this process (every process must call it then)."""
    leaves = jax.tree.leaves(params)
    if all(x.sharding.is_fully_replicated for x in leaves):
        return jax.tree.map(lambda x: x.addressable_data(0), params)
    from jax.experimental import multihost_utils
    host = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(lambda x: jax.device_put(x, jax.local_devices()[0]), host)


def _core_bundle_dir() -> str | None:
    env = os.environ.get("JAXCHAT_EVAL_BUNDLE")
    if env and os.path.exists(env):
        return env
    local = os.path.join(get_base_dir(), "eval_bundle")
    return local if os.path.isdir(local) else None


def resolve_muon_dtype(name: str) -> str:
    """--muon-dtype: 'auto' -> 'float32' when the compute dtype is float32 (CPU), else 'bfloat16' (nanochat)."""
    if name == "auto":
        return "float32" if compute_dtype() == jnp.float32 else "bfloat16"
    return name


class Training(NamedTuple):
    mesh: Any
    optimizer: Any  # optax.GradientTransformation from jaxchat.optim.make_optimizer
    param_sh: Any  # pytree of NamedSharding
    opt_sh: Any
    batch_sh: Any  # (micro_steps, B, T) batches
    step_fn: Callable  # (params, opt_state, inputs, targets, hparams) -> (params, opt_state, loss), donating
    init_params: Callable  # key -> sharded params
    init_opt: Callable  # params -> sharded opt_state


@functools.lru_cache(maxsize=4)
def build_training(config: gpt.GPTConfig, lrs: tuple, weight_decay: float, muon_dtype: str, fsdp: int,
                   fp8: bool = False, remat: str = "none"):
    """The mesh, optimizer, shardings and jitted functions (a `Training`) for a config.

    Cached, so runs of the same configuration in one process (tests, train.bench after train.pretrain) share one
    compiled step. `lrs` is a sorted tuple of (name, value) from the plan's learning_rates.
    """
    from jaxchat import sharding as shd
    from jaxchat import train_loop as tl
    from jaxchat.optim import make_optimizer

    muon_dtype = resolve_muon_dtype(muon_dtype)
    mesh = shd.make_mesh(fsdp)
    abstract_params = gpt.param_shapes(config)
    param_sh = shd.param_shardings(abstract_params, mesh)
    optimizer = make_optimizer(abstract_params, config, weight_decay=weight_decay, ns_dtype=jnp.dtype(muon_dtype),
                               stack_multiple=mesh.size, muon_update_fn=shd.sharded_muon_update(mesh), **dict(lrs))
    opt_sh = shd.opt_state_shardings(jax.eval_shape(optimizer.init, abstract_params), mesh)
    batch_sh = shd.batch_sharding(mesh, 3)
    step_fn = tl.jit_train_step(config, optimizer, param_sh, opt_sh, batch_sh,
                                functools.partial(gpt.loss_fn, fp8=fp8, remat=remat))
    init_params = jax.jit(functools.partial(gpt.init_params, config), out_shardings=param_sh)
    init_opt = jax.jit(optimizer.init, out_shardings=opt_sh)
    return Training(mesh, optimizer, param_sh, opt_sh, batch_sh, step_fn, init_params, init_opt)


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> dict:
    """Run pretraining. Returns a summary dict (for tests): {'losses': {step: loss}, 'val_bpb': {step: bpb},
    'num_iterations', 'final_step', 'checkpoint_dir', 'plan'}.

    Raises:
        FloatingPointError: the training loss became NaN/inf (the last good checkpoint is left in place).
        FileNotFoundError: --data=shards without a tokenizer or shards; --resume-from-step without that step.
    """
    args = parse_args(argv)
    if args.compile_for:  # build and compile the step for described GPUs; nothing runs, no data is read
        return {"plan": gpu_compile.pretrain_compile_for(args)["plan"]}
    if args.dry_run:
        if args.device_batch_size == "auto":
            raise gpu_compile.UserError("--dry-run --device-batch-size=auto: add --compile-for=TARGET:HxG (e.g. h100:1x8) to size it")
        plan = make_plan(args, _vocab_for_dry_run(args), jax.device_count(), strict=False)
        print(gpu_compile.plan_table(gpu_compile.pretrain_plan_rows(plan)), file=sys.stderr, flush=True)  # stdout: JSON only
        print(json.dumps(plan), flush=True)
        return {"plan": plan}

    from jaxchat import sharding as shd
    from jaxchat import train_loop as tl
    from jaxchat.loss_eval import evaluate_bpb

    maybe_init_distributed()
    process_index, process_count = jax.process_index(), jax.process_count()
    n_devices, n_local = jax.device_count(), jax.local_device_count()
    kind = device_kind()
    peak_flops = get_peak_flops(kind)
    print0(f"Devices: {n_devices} x {kind} ({process_count} process(es)) | compute dtype: {compute_dtype().name}")
    user_config = {k: v for k, v in vars(args).items()}

    # Tokenizer / data source
    tokenizer = None
    if args.data == "shards":
        from jaxchat.tokenizer import get_token_bytes, get_tokenizer
        tokenizer = get_tokenizer()
        vocab_size = args.vocab_size or tokenizer.get_vocab_size()
        if vocab_size < tokenizer.get_vocab_size():
            raise ValueError(f"--vocab-size={vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()}")
        token_bytes_np = np.zeros(vocab_size, np.int32)
        tb = get_token_bytes()
        token_bytes_np[: tb.shape[0]] = tb
    else:
        vocab_size = args.vocab_size or DEFAULT_VOCAB
        token_bytes_np = np.ones(vocab_size, np.int32)  # synthetic tokens: one "byte" each
    print0(f"Vocab size: {vocab_size:,}")

    if args.device_batch_size == "auto":  # the largest power of two whose step compiles within GPU memory
        auto_mesh, auto_config = shd.make_mesh(args.fsdp), model_config(args, vocab_size)
        args.device_batch_size = gpu_compile.auto_for_mesh(lambda b: gpu_compile.build_pretrain_step(
            auto_config, auto_mesh, b, fp8=args.fp8, remat=args.remat), auto_mesh)
        print0(f"--device-batch-size=auto: {args.device_batch_size}")
    plan = make_plan(args, vocab_size, n_devices)
    config = gpt.GPTConfig.from_dict(plan["model_config"])
    num_iterations, total_batch_size = plan["num_iterations"], plan["total_batch_size"]
    grad_accum, lrs = plan["grad_accum_steps"], plan["learning_rates"]
    flops_per_token = plan["flops_per_token"]
    print0(f"Model config: {json.dumps(config.to_dict())}")
    print0("Parameter counts: " + ", ".join(f"{k}: {v:,}" for k, v in plan["param_counts"].items()))
    print0(f"Estimated FLOPs per token: {flops_per_token:e}")
    print0(f"Total batch size {total_batch_size:,} tokens ({plan['horizon']}) => {num_iterations:,} iterations, "
           f"{plan['total_tokens']:,} tokens, tokens:params {plan['tokens_per_param']:.2f}, "
           f"gradient accumulation steps: {grad_accum}")
    print0(f"LR scale {plan['batch_lr_scale']:.4f}: " + ", ".join(f"{k} {v:.6g}" for k, v in lrs.items())
           + f" | Muon weight decay {plan['weight_decay']:.6f}")

    # Mesh, parameters, optimizer (ZeRO-1 state, Muon stacks split over devices with shard_map)
    tr = build_training(config, tuple(sorted(lrs.items())), plan["weight_decay"], args.muon_dtype, args.fsdp,
                        args.fp8, args.remat)
    mesh, optimizer, param_sh, opt_sh, batch_sh, step_fn = tr[:6]
    abstract_params = gpt.param_shapes(config)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)

    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    resuming = args.resume_from_step != -1
    loader_state, meta = None, {}
    if resuming:
        print0(f"Resuming optimization from step {args.resume_from_step} of {checkpoint_dir}")
        restored = ckpt.restore_checkpoint(checkpoint_dir, args.resume_from_step,
                                           shd.abstract_with_shardings(abstract_params, param_sh),
                                           shd.abstract_with_shardings(abstract_opt, opt_sh))
        params, opt_state, meta = restored["params"], restored["opt_state"], restored["meta"]
        if meta.get("model_config") != config.to_dict():
            raise ValueError(f"checkpoint model_config {meta.get('model_config')} differs from the flags' "
                             f"{config.to_dict()}")
        states = (restored.get("loader") or {}).get("process_states")
        if states is not None and len(states) != process_count:
            raise ValueError(f"checkpoint was written by {len(states)} processes, this run has {process_count}")
        loader_state = states[process_index] if states else None
        if loader_state is None:
            print0("WARNING: the checkpoint has no data-loader state; the data restarts from the beginning")
    else:
        params = tr.init_params(jax.random.key(args.seed))
        opt_state = tr.init_opt(params)

    # Data loaders: each process reads its own share; rows per process per micro-step = device batch x local devices
    rows = args.device_batch_size * n_local
    if args.data == "shards":
        from jaxchat.dataloader import make_pretrain_loader
        train_loader = make_pretrain_loader(tokenizer, rows, args.max_seq_len, "train", process_index,
                                            process_count, state=loader_state)
        build_val_loader = lambda: make_pretrain_loader(tokenizer, rows, args.max_seq_len, "val", process_index,  # noqa: E731
                                                        process_count)
    else:
        train_loader = tl.SyntheticLoader(rows, args.max_seq_len, vocab_size, args.seed, process_index, process_count,
                                          state=loader_state)
        build_val_loader = lambda: tl.SyntheticLoader(rows, args.max_seq_len, vocab_size, args.seed + 1,  # noqa: E731
                                                      process_index, process_count)
    val_sh = shd.batch_sharding(mesh, 2)

    def val_batches():
        loader = build_val_loader()
        while True:
            x, y = next(loader)
            shape = (x.shape[0] * process_count, x.shape[1])
            yield shd.global_batch(x, val_sh, shape), shd.global_batch(y, val_sh, shape)

    # Loop state
    step = int(meta.get("step", 0))
    loop_state = meta.get("loop_state", {})
    val_bpb = meta.get("val_bpb")
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    smooth_train_loss = loop_state.get("smooth_train_loss", 0.0)
    timer = tl.StepTimer(loop_state.get("total_training_time", 0.0))
    writer = tl.MetricsWriter(os.path.join(get_base_dir(), "runs", args.run), enabled=args.run != "dummy")
    summary = {"losses": {}, "val_bpb": {}, "num_iterations": num_iterations, "checkpoint_dir": checkpoint_dir,
               "plan": plan, "core_metric": {}}
    last_saved = max(ckpt.list_steps(checkpoint_dir), default=None)
    pending = None  # (step, loss array, lrm, dispatch time): the newest dispatched step, read lazily
    last_done = None
    results = {}

    def finish_pending():
        """Read the loss of the newest dispatched step (blocks until it is done), log it, stop on NaN."""
        nonlocal pending, last_done, smooth_train_loss
        if pending is None:
            return
        s, loss_arr, lrm, t_dispatch = pending
        pending = None
        loss = float(loss_arr)
        now = time.perf_counter()
        dt = now - (t_dispatch if last_done is None else max(t_dispatch, last_done))
        last_done = now
        if not math.isfinite(loss):
            writer.close()
            where = (f"the last good checkpoint is step {last_saved} in {checkpoint_dir} (resume with "
                     f"--resume-from-step={last_saved}, perhaps with lower learning rates)") if last_saved is not None \
                else "no checkpoint was written"
            raise FloatingPointError(f"step {s}: training loss is {loss}; stopping. Nothing was saved after the bad "
                                     f"step; {where}")
        summary["losses"][s] = loss
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * loss
        debiased = smooth_train_loss / (1 - ema_beta ** (s + 1))
        timer.add(s, dt)
        tok_per_sec = total_batch_size / dt
        mfu = 100 * flops_per_token * total_batch_size / dt / (peak_flops * n_devices)
        epoch = str(getattr(train_loader, "epoch", "")) if args.data == "shards" else ""
        print0(tl.console_line(s, num_iterations, debiased, lrm, dt, tok_per_sec, mfu, timer.total,
                               timer.eta_seconds(s, num_iterations), epoch))
        scalars = {"train/loss": debiased, "train/raw_loss": loss, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                   "total_training_flops": flops_per_token * total_batch_size * s,
                   "total_training_time": timer.total}
        peak = tl.peak_memory_bytes()
        if peak is not None:
            scalars["memory/peak_bytes"] = peak
        writer.log(s, scalars)

    while True:
        last_step = step == num_iterations
        flops_so_far = flops_per_token * total_batch_size * step

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            finish_pending()
            eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * n_devices))
            val_bpb = evaluate_bpb(params, config, val_batches(), eval_steps, token_bytes_np)
            min_val_bpb = min(min_val_bpb, val_bpb)
            summary["val_bpb"][step] = val_bpb
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            writer.log(step, {"val/bpb": val_bpb, "total_training_flops": flops_so_far})
            last_done = None

        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            finish_pending()
            bundle = _core_bundle_dir()
            if tokenizer is None or bundle is None:
                print0(f"Step {step:05d} | CORE metric skipped: "
                       + ("no tokenizer (--data=synthetic)" if tokenizer is None else
                          "no eval bundle in $JAXCHAT_BASE_DIR/eval_bundle or $JAXCHAT_EVAL_BUNDLE"))
            else:
                from evals.core import CoreScorer, evaluate_core
                scorer = CoreScorer(params=_local_params(params), config=config)
                results = evaluate_core(scorer, tokenizer, bundle, max_per_task=args.core_metric_max_per_task)
                summary["core_metric"][step] = results["core_metric"]
                print0(f"Step {step:05d} | CORE metric: {results['core_metric']:.4f}")
                writer.log(step, {"core_metric": results["core_metric"], "total_training_flops": flops_so_far})
            last_done = None

        if args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            finish_pending()
            if tokenizer is None:
                print0(f"Step {step:05d} | sampling skipped: no tokenizer (--data=synthetic)")
            else:
                local = _local_params(params)
                if process_index == 0:
                    from jaxchat.engine import Engine
                    engine = Engine(local, config, tokenizer)
                    for prompt in SAMPLE_PROMPTS:
                        tokens = tokenizer.encode(prompt, prepend="<|bos|>")
                        sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                        print0(tokenizer.decode(sample[0]))
            last_done = None

        if last_step or (step > 0 and step != args.resume_from_step and args.save_every > 0
                         and step % args.save_every == 0):
            finish_pending()
            if not bool(tl.all_finite((params, opt_state))):
                writer.close()
                raise FloatingPointError(f"step {step}: parameters or optimizer state are not finite; not saving. "
                                         f"The last good checkpoint is step {last_saved} in {checkpoint_dir}")
            states = tl.gather_process_states(train_loader.get_state())
            ckpt.save_checkpoint(checkpoint_dir, step, params, config, meta={
                "val_bpb": val_bpb,
                "user_config": user_config,
                "device_batch_size": args.device_batch_size,
                "max_seq_len": args.max_seq_len,
                "total_batch_size": total_batch_size,
                "plan": plan,
                "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_train_loss,
                               "total_training_time": timer.total},
            }, opt_state=opt_state, loader_state={"process_states": states})
            last_saved = step
            print0(f"Saved checkpoint step {step} to {checkpoint_dir}")
            last_done = None

        if last_step:
            break

        # One training step: host prepares the batch while the device still runs the previous step.
        x, y = tl.next_global_batch(train_loader, grad_accum, batch_sh, process_count)
        lrm, momentum, weight_decay = schedules(step, num_iterations, args, plan["weight_decay"])
        t_dispatch = time.perf_counter()
        params, opt_state, loss = step_fn(params, opt_state, x, y, tl.hparams_array(lrm, momentum, weight_decay))
        finish_pending()  # the previous step's loss: it is done by now, so the device never waits on the host
        pending = (step, loss, lrm, t_dispatch)
        if step == (args.resume_from_step if resuming else 0):
            gc.collect()
            gc.freeze()  # nanochat: keep the cyclic GC from rescanning setup objects every few steps
        step += 1

    finish_pending()
    writer.close()
    peak = tl.peak_memory_bytes()
    print0(f"Peak memory usage: {'n/a' if peak is None else f'{peak / 2**20:.2f}MiB'}")
    print0(f"Total training time: {timer.total / 60:.2f}m")
    if val_bpb is not None:
        print0(f"Minimum validation bpb: {min_val_bpb:.6f}")
    summary["final_step"] = step
    summary["min_val_bpb"] = min_val_bpb

    from jaxchat.report import get_report
    last_loss = summary["losses"].get(step - 1)
    get_report().log(section="Base model training", data=[
        user_config,
        {"Number of parameters": plan["param_counts"]["total"],
         "Number of FLOPs per token": f"{flops_per_token:e}",
         "Calculated number of iterations": num_iterations,
         "Number of training tokens": plan["total_tokens"],
         "Tokens : Scaling params ratio": plan["tokens_per_param"],
         "Devices": f"{n_devices} x {kind} ({process_count} processes)",
         "warmup_steps": args.warmup_steps, "warmdown_ratio": args.warmdown_ratio,
         "final_lr_frac": args.final_lr_frac},
        {"Minimum validation bpb": min_val_bpb if val_bpb is not None else None,
         "Final validation bpb": val_bpb,
         "CORE metric estimate": results.get("core_metric"),
         "Final train loss": last_loss,
         "Total training flops": f"{flops_per_token * total_batch_size * step:e}",
         "Total training time": f"{timer.total / 60:.2f}m",
         "Peak memory usage": "n/a" if peak is None else f"{peak / 2**20:.2f}MiB"},
    ])
    return summary


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # before any work: see its docstring
    try:
        main()
    except FloatingPointError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
