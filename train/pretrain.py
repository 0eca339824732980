"""Pretrain the base model: `python -m train.pretrain --depth=20` (nanochat `scripts/base_train.py`).

One dial, --depth, sets everything else exactly as nanochat does:
  n_embd = depth * aspect_ratio rounded up to a multiple of head_dim; n_head = n_embd / head_dim;
  horizon: --num-iterations, else --target-flops / (flops_per_token * batch), else target_param_data_ratio *
    scaling params (transformer matrices + lm_head) tokens;
  total batch (auto): 2**19 tokens at d12, scaled by (D / D_d12) ** 0.383 (Power Lines, arXiv 2505.13738) and
    rounded to a power of two;
  learning rates scaled by sqrt(B / 2**19); Muon weight decay scaled by sqrt(B / 2**19) * D_d12 / D (T_epoch,
    arXiv 2405.13698), then cosine-decayed to 0 over the run.
`--dry-run` prints that plan as a table and then one JSON line, and exits; it names the recipe: "5019acc"
(--muon-eq=none --no-muon-plus, no bigram: nanochat 5019acc), "bigram" (--bigram-embed-factor > 0: nanochat
412e9a1), else "head" (MuonEq + Muon+, nanochat 92d63d4).

The loop (checkpoints, exact resume, the divergence guard, SIGTERM) is `jaxchat.trainer`'s. Distributed: one mesh
over every device of every process; launch one process per host with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (or SLURM). Each process reads its own share of the data. Examples:

    python -m train.pretrain --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20        # CPU smoke run, as nanochat's
    python -m train.pretrain --depth=20 --run=d20                                # 8xH100, TensorBoard in runs/d20
    python -m train.pretrain --depth=26 --dry-run                                # just print the plan
    python -m train.pretrain --depth=20 --compile-for=h100:1x8                   # compile the GPU step on a CPU
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from jaxchat import gpu_compile
from jaxchat import model as gpt
from jaxchat import schedules as sched
from jaxchat import trainer as T
from jaxchat.plan import DEFAULT_VOCAB, make_plan, plan_table  # noqa: F401  (train.bench reads them here)
from jaxchat.common import UserError, compute_dtype, device_kind, get_base_dir, maybe_init_distributed, print0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description="Pretrain the base model (nanochat base_train)")
    # Model architecture
    p.add_argument("--depth", type=int, default=20, help="depth of the Transformer model")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=128, help="target head dimension for attention")
    p.add_argument("--max-seq-len", type=int, default=2048, help="max context length")
    p.add_argument("--window-pattern", type=str, default="SSSL", help="sliding window pattern tiled across layers: L=full, S=quarter context (e.g. 'SSL')")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocab size (default: the tokenizer's; 32768 for --dry-run without one)")
    p.add_argument("--bigram-embed-factor", type=int, default=0, help="hashed bigram embedding table of factor x vocab rows (0 = off; nanochat 412e9a1)")
    # Training horizon (first one set wins)
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimization steps (-1 = disable)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="calculate num_iterations to reach target_flops (-1 = disable)")
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="calculate num_iterations to maintain data:param ratio (Chinchilla=20, -1 = disable)")
    # Optimization
    p.add_argument("--device-batch-size", type=gpu_compile.int_or_auto, default=32, help="per-device batch size (rows), or 'auto' (the largest that compiles within device memory)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="total batch size in tokens (-1 = auto-compute optimal)")
    p.add_argument("--embedding-lr", type=float, default=0.3, help="learning rate for embedding parameters (AdamW)")
    p.add_argument("--unembedding-lr", type=float, default=0.008, help="learning rate for unembedding parameters (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.28, help="cautious weight decay for the Muon optimizer (for weights)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="learning rate for matrix parameters (Muon)")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="learning rate for scalars (resid_lambdas, x0_lambdas)")
    p.add_argument("--warmup-steps", type=int, default=40, help="number of steps for LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="ratio of iterations for LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR as fraction of initial LR")
    # Evaluation
    p.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (-1 = disable)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288, help="number of tokens to evaluate val loss on")
    p.add_argument("--core-metric-every", type=int, default=2000, help="evaluate CORE metric every N steps (-1 = disable)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per task for CORE metric")
    p.add_argument("--sample-every", type=int, default=2000, help="sample from model every N steps (-1 = disable)")
    # Output
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    # jaxchat additions
    p.add_argument("--dry-run", action="store_true", help="print the training plan (a table, then one JSON line) and exit")
    p.add_argument("--data", choices=("shards", "synthetic"), default="shards", help="training data: parquet shards of $JAXCHAT_BASE_DIR/base_data, or synthetic token progressions (tests, benchmarks)")
    T.add_train_flags(p)
    gpu_compile.add_flags(p)  # --compile-for, --hlo-out, --fp8, --remat
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "fsdp"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.vocab_size is not None and args.vocab_size <= 0:
        raise UserError(f"--vocab-size must be positive, got {args.vocab_size}")
    return args


def _vocab_for_dry_run(args) -> int:
    if args.vocab_size:
        return args.vocab_size
    try:
        from jaxchat.tokenizer import get_tokenizer
        return get_tokenizer().get_vocab_size()
    except (FileNotFoundError, ImportError, OSError):
        return DEFAULT_VOCAB


def _core_bundle_dir() -> str | None:
    env = os.environ.get("JAXCHAT_EVAL_BUNDLE")
    if env and os.path.exists(env):
        return env
    local = os.path.join(get_base_dir(), "eval_bundle")
    return local if os.path.isdir(local) else None


def _grad_accum(args, device_batch_size: int, n_devices: int, total_batch_size: int) -> int:
    return max(1, total_batch_size // (device_batch_size * args.max_seq_len * n_devices))


def build(args, plan: dict, mesh, device_batch_size: int) -> T.Step:
    """The pretraining step (`jaxchat.trainer.build_step`) for these flags and plan on `mesh`: the real devices,
    or with --compile-for the described ones (`jaxchat.gpu_compile.mesh_for`)."""
    config = gpt.GPTConfig.from_dict(plan["model_config"])
    return T.build_step(config, mesh, device_batch_size=device_batch_size, seq_len=args.max_seq_len,
                        grad_accum=_grad_accum(args, device_batch_size, mesh.size, plan["total_batch_size"]),
                        lrs=plan["learning_rates"], weight_decay=plan["weight_decay"], muon_dtype=args.muon_dtype,
                        loss_fn=T.step_loss_fn(args.fp8, args.remat), muon_eq=args.muon_eq, muon_plus=args.muon_plus)


def _plan(args, vocab_size: int, num_devices: int, device_batch_size: int, strict: bool = True) -> dict:
    """make_plan at this device batch size (the flags' bad combinations as UserError)."""
    try:
        return make_plan(argparse.Namespace(**{**vars(args), "device_batch_size": device_batch_size}), vocab_size,
                         num_devices, strict=strict)
    except ValueError as e:
        raise UserError(str(e)) from None


def step_builder(args, vocab_size: int, mesh):
    """device_batch_size -> the step `build` makes at it (what --device-batch-size=auto tries)."""
    return lambda b: build(args, _plan(args, vocab_size, mesh.size, b, strict=False), mesh, b)


def largest_device_batch(args, vocab_size: int, num_devices: int) -> int:
    """The largest device batch --device-batch-size=auto may pick: one micro-batch holds the whole total batch."""
    total = _plan(args, vocab_size, num_devices, 1, strict=False)["total_batch_size"]
    return max(1, total // (args.max_seq_len * num_devices))


def compile_for(args, mesh, target, vocab_size: int) -> dict:
    """--compile-for TARGET:HxG: compile the step `build` makes on the described devices (the largest device batch
    that fits for 'auto'); print the plan table with the memory per GPU, then one JSON line. Runs nothing.

    Raises:
        UserError: bad flags; the step does not fit (exit 2, saying what would).
    """
    if args.device_batch_size != "auto":
        _plan(args, vocab_size, mesh.size, args.device_batch_size)  # bad flags fail before the compile
    b, report = gpu_compile.choose_and_compile(step_builder(args, vocab_size, mesh), target, args.device_batch_size,
                                               args.hlo_out, label="pretraining step",
                                               largest=largest_device_batch(args, vocab_size, mesh.size))
    args.device_batch_size = b
    plan = _plan(args, vocab_size, mesh.size, b)
    print(plan_table(plan), flush=True)
    return gpu_compile.print_report(report, [("fp8", args.fp8), ("remat", args.remat)], plan=plan)


def main(argv=None) -> dict:
    """Run pretraining. Returns the trainer's summary (losses, val_bpb, checkpoint_dir, ...) plus 'plan'.

    Raises:
        jaxchat.trainer.Diverged: the loss diverged (the last good checkpoint is left in place and named).
        UserError: bad flags, no tokenizer or shards, a resume step that does not exist, an existing tag.
    """
    args = parse_args(argv)
    if args.dry_run and not args.compile_for:
        if args.device_batch_size == "auto":
            args.device_batch_size = 32  # the plan shows the default; the real run picks by compiling
        plan = make_plan(args, _vocab_for_dry_run(args), jax.device_count(), strict=False)
        print(plan_table(plan), flush=True)
        print(json.dumps(plan), flush=True)
        return {"plan": plan}

    from jaxchat import sharding as shd
    from jaxchat.loss_eval import evaluate_bpb
    from jaxchat.multihost import global_batch, local_params

    if not args.compile_for:
        maybe_init_distributed()
    mesh, target = gpu_compile.mesh_for(args.compile_for, args.fsdp)
    if target:  # with or without --dry-run: the plan table with the memory per GPU; no data is read
        return compile_for(args, mesh, target, args.vocab_size or DEFAULT_VOCAB)
    pi, pc = jax.process_index(), jax.process_count()
    n_devices, kind = jax.device_count(), device_kind()
    from jaxchat import backend
    backend.activate(mesh)
    print0(f"Devices: {n_devices} x {kind} ({pc} process(es)) | compute dtype: {compute_dtype().name}")

    tokenizer = None
    if args.data == "shards":
        from jaxchat.tokenizer import get_token_bytes, get_tokenizer
        tokenizer = get_tokenizer()
        vocab_size = args.vocab_size or tokenizer.get_vocab_size()
        if vocab_size < tokenizer.get_vocab_size():
            raise UserError(f"--vocab-size={vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()}")
        token_bytes = np.zeros(vocab_size, np.int32)
        tb = get_token_bytes()
        token_bytes[: tb.shape[0]] = tb
    else:
        vocab_size = args.vocab_size or DEFAULT_VOCAB
        token_bytes = np.ones(vocab_size, np.int32)  # synthetic tokens: one "byte" each
    if args.device_batch_size == "auto":  # the largest power of two whose step compiles within GPU memory
        args.device_batch_size = gpu_compile.auto_device_batch_size(
            step_builder(args, vocab_size, mesh), largest=largest_device_batch(args, vocab_size, n_devices))
    plan = _plan(args, vocab_size, n_devices, args.device_batch_size)
    config = gpt.GPTConfig.from_dict(plan["model_config"])
    N, B, accum = plan["num_iterations"], plan["total_batch_size"], plan["grad_accum_steps"]
    print0(f"Vocab size: {vocab_size:,} | recipe: {plan['recipe']}\nModel config: {json.dumps(config.to_dict())}")
    print0("Parameter counts: " + ", ".join(f"{k}: {v:,}" for k, v in plan["param_counts"].items()))
    print0(f"Total batch size {B:,} tokens ({plan['horizon']}) => {N:,} iterations, {plan['total_tokens']:,} tokens, "
           f"tokens:params {plan['tokens_per_param']:.2f}, gradient accumulation steps: {accum}")
    print0(f"LR scale {plan['batch_lr_scale']:.4f}: " + ", ".join(f"{k} {v:.6g}" for k, v in plan['learning_rates'].items())
           + f" | Muon weight decay {plan['weight_decay']:.6f}")

    step = build(args, plan, mesh, args.device_batch_size)
    user_config = dict(vars(args))
    ckpt_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")

    def init():
        params = step.init_params(jax.random.key(args.seed))
        return params, step.init_opt(params)

    tr = T.Trainer(step, config, ckpt_dir, args, init, tokenizer=tokenizer, meta={
        "user_config": user_config, "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
        "total_batch_size": B, "plan": plan})

    rows = args.device_batch_size * jax.local_device_count()
    if args.data == "shards":
        from jaxchat.dataloader import make_pretrain_loader
        loader = make_pretrain_loader(tokenizer, rows, args.max_seq_len, "train", pi, pc, state=tr.loader_state)
        val_loader = lambda: make_pretrain_loader(tokenizer, rows, args.max_seq_len, "val", pi, pc)  # noqa: E731
    else:
        loader = T.SyntheticLoader(rows, args.max_seq_len, vocab_size, args.seed, pi, pc, state=tr.loader_state)
        val_loader = lambda: T.SyntheticLoader(rows, args.max_seq_len, vocab_size, args.seed + 1, pi, pc)  # noqa: E731
    val_sh = shd.batch_sharding(mesh, 2)

    def val_batches():
        for x, y in val_loader():
            shape = (x.shape[0] * pc, x.shape[1])
            yield global_batch(x, val_sh, shape), global_batch(y, val_sh, shape)

    def eval_bpb(s, params):
        steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * n_devices))
        bpb = evaluate_bpb(params, config, val_batches(), steps, token_bytes)
        print0(f"Step {s:05d} | Validation bpb: {bpb:.6f}")
        return {"val/bpb": bpb}

    def core(s, params):
        bundle = _core_bundle_dir()
        if tokenizer is None or bundle is None:
            print0(f"Step {s:05d} | CORE metric skipped: " + ("no tokenizer (--data=synthetic)" if tokenizer is None
                   else "no eval bundle in $JAXCHAT_BASE_DIR/eval_bundle or $JAXCHAT_EVAL_BUNDLE"))
            return None
        from evals.core import CoreScorer, evaluate_core
        results = evaluate_core(CoreScorer(params=local_params(params), config=config), tokenizer, bundle,
                                max_per_task=args.core_metric_max_per_task)
        print0(f"Step {s:05d} | CORE metric: {results['core_metric']:.4f}")
        return {"core_metric": results["core_metric"]}

    def sample(s, params):
        if tokenizer is None:
            print0(f"Step {s:05d} | sampling skipped: no tokenizer (--data=synthetic)")
            return None
        local = local_params(params)
        if pi == 0:
            from jaxchat.engine import SAMPLE_PROMPTS, Engine
            engine = Engine(local, config, tokenizer)
            for prompt in SAMPLE_PROMPTS:
                out, _ = engine.generate_batch(tokenizer.encode(prompt, prepend="<|bos|>"), num_samples=1,
                                               max_tokens=16, temperature=0)
                print0(tokenizer.decode(out[0]))
        return None

    def hparams(s):
        return (sched.lr_multiplier(s, N, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac),
                sched.muon_momentum(s, N, args.warmdown_ratio), sched.muon_weight_decay(s, N, plan["weight_decay"]))

    hooks = [T.Hook(args.eval_every, eval_bpb, at_last=args.eval_every > 0),
             T.Hook(args.core_metric_every, core, at_start=False, at_last=args.core_metric_every > 0),
             T.Hook(args.sample_every, sample, at_start=False, at_last=args.sample_every > 0)]
    epoch = (lambda s, m: f" | epoch: {getattr(loader, 'epoch', '')}") if args.data == "shards" else None
    summary = tr.run(lambda s, p: (T.micro_batches(loader, accum), {}), hparams, loader_state=loader.get_state,
                     num_iterations=N, hooks=hooks, tokens_per_step=B, flops_per_token=plan["flops_per_token"],
                     console=epoch)
    summary["plan"] = plan
    peak = T.peak_memory_bytes()
    peak_str = "n/a" if peak is None else f"{peak / 2**20:.2f}MiB"
    vals = summary["val_bpb"]
    print0(f"Peak memory usage: {peak_str}\nTotal training time: {summary['total_time'] / 60:.2f}m")
    if vals:
        print0(f"Minimum validation bpb: {summary['min_val_bpb']:.6f}")
    if summary["stopped"]:
        return summary

    from jaxchat.report import get_report
    s = summary["final_step"]
    core_metric = summary["evals"].get(s, {}).get("core_metric")
    get_report().log(section="Base model training", data=[
        user_config,
        {"Number of parameters": plan["param_counts"]["total"], "Number of FLOPs per token": f"{plan['flops_per_token']:e}",
         "Calculated number of iterations": N, "Number of training tokens": plan["total_tokens"],
         "Tokens : Scaling params ratio": plan["tokens_per_param"], "Recipe": plan["recipe"],
         "Devices": f"{n_devices} x {kind} ({pc} processes)", "warmup_steps": args.warmup_steps,
         "warmdown_ratio": args.warmdown_ratio, "final_lr_frac": args.final_lr_frac},
        {"Minimum validation bpb": summary["min_val_bpb"] if vals else None, "Final validation bpb": vals.get(s),
         "CORE metric estimate": core_metric, "Final train loss": summary["losses"].get(s - 1),
         "Total training flops": f"{plan['flops_per_token'] * B * s:e}",
         "Total training time": f"{summary['total_time'] / 60:.2f}m", "Peak memory usage": peak_str},
    ])
    return summary


if __name__ == "__main__":
    from jaxchat.common import reexec_with_hugepage_malloc, run_cli

    reexec_with_hugepage_malloc()  # before any work: see its docstring
    run_cli(main)
