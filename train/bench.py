"""Time the jitted pretraining step on random tokens and print ONE JSON line.

    python -m train.bench --depth=4 --max-seq-len=256 --device-batch-size=8 --vocab-size=8192 --window-pattern=L
    python -m train.bench --depth=20 --steps=20        # on 8xH100: tok/s and MFU of the d20 step

Takes train.pretrain's model and optimization flags (the step is exactly the one pretraining runs: same mesh,
shardings, optimizer, gradient accumulation) plus --steps / --warmup-steps-bench. --total-batch-size defaults to one
micro-batch per device (no accumulation) and --vocab-size to 32768, so no tokenizer or data is needed.

Output keys: tok_per_sec, step_ms, mfu (percent of the devices' bf16 peak; null where the peak is unknown, e.g. CPU),
compile_s, peak_bytes (device memory_stats, null on CPU), device_kind, device_count, process_count, plus the
config (depth, n_embd, seq_len, vocab_size, device_batch_size, total_batch_size, grad_accum_steps,
flops_per_token, dtype).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from jaxchat import trainer as T
from jaxchat.common import compute_dtype, device_kind, get_peak_flops, maybe_init_distributed
from train import pretrain


def main(argv=None) -> dict:
    parser = pretrain.build_parser()
    parser.prog = "python -m train.bench"
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup-steps-bench", type=int, default=2, help="untimed steps after compilation")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    maybe_init_distributed()
    from jaxchat import sharding as shd
    from jaxchat.multihost import global_batch

    n_devices, process_count = jax.device_count(), jax.process_count()
    vocab_size = args.vocab_size or pretrain.DEFAULT_VOCAB
    if args.device_batch_size == "auto":
        raise SystemExit("--device-batch-size=auto: give train.bench a number")
    if args.total_batch_size == -1:
        args.total_batch_size = args.device_batch_size * args.max_seq_len * n_devices
    if args.num_iterations <= 0:
        args.num_iterations = args.steps
    plan = pretrain.make_plan(args, vocab_size, n_devices)
    tr = pretrain.build(args, plan, shd.make_mesh(args.fsdp), args.device_batch_size)
    config = pretrain.gpt.GPTConfig.from_dict(plan["model_config"])
    accum = plan["grad_accum_steps"]
    rows = args.device_batch_size * jax.local_device_count()
    rng = np.random.default_rng(process_count * 1000 + jax.process_index())
    tokens = rng.integers(0, vocab_size, (accum, rows, args.max_seq_len + 1), dtype=np.int32)
    shape = (accum, rows * process_count, args.max_seq_len)
    batch = {"inputs": global_batch(tokens[..., :-1], tr.batch_sh["inputs"], shape),
             "targets": global_batch(tokens[..., 1:], tr.batch_sh["targets"], shape)}
    hp = T.hparams_array(1.0, 0.95, plan["weight_decay"])

    params = tr.init_params(jax.random.key(args.seed))
    opt_state = tr.init_opt(params)
    jax.block_until_ready((params, opt_state))
    t0 = time.perf_counter()
    compiled = tr.fn.lower(params, opt_state, batch, hp).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup_steps_bench):
        params, opt_state, loss = compiled(params, opt_state, batch, hp)
    jax.block_until_ready(loss if args.warmup_steps_bench else params)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, loss = compiled(params, opt_state, batch, hp)
    loss = float(loss)  # waits for the last step
    step_s = (time.perf_counter() - t0) / args.steps

    tok_per_sec = plan["total_batch_size"] / step_s
    peak = get_peak_flops(device_kind())
    out = {
        "tok_per_sec": round(tok_per_sec, 1),
        "step_ms": round(step_s * 1000, 3),
        "mfu": round(100 * plan["flops_per_token"] * tok_per_sec / (peak * n_devices), 3) if peak != float("inf") else None,
        "compile_s": round(compile_s, 2),
        "peak_bytes": T.peak_memory_bytes(),
        "device_kind": device_kind(),
        "device_count": n_devices,
        "process_count": process_count,
        "loss": loss,
        "depth": config.n_layer, "n_embd": config.n_embd, "seq_len": config.sequence_len,
        "vocab_size": config.vocab_size, "window_pattern": config.window_pattern,
        "device_batch_size": args.device_batch_size, "total_batch_size": plan["total_batch_size"],
        "grad_accum_steps": accum, "flops_per_token": plan["flops_per_token"],
        "dtype": compute_dtype().name, "muon_dtype": T.resolve_muon_dtype(args.muon_dtype), "steps": args.steps,
    }
    if jax.process_index() == 0:
        print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    from jaxchat.common import reexec_with_hugepage_malloc, run_cli

    reexec_with_hugepage_malloc()  # before any work: see its docstring
    run_cli(main)
