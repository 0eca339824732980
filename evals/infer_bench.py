"""Inference benchmark: prefill and decode throughput of the engine, swept over the decode batch size.

The idea is later nanochat's `scripts/infer_bench.py`: prefill is compute-bound (one big forward over the prompt),
decode is memory-bound (every step re-reads all weights and the KV cache for one token per row), so batching decode
is almost free until compute saturates. MBU (model bandwidth utilisation) is decode's distance from the bandwidth
roofline: bytes a step must read (weights as stored + each row's KV cache over the attended context, nanochat's
`kv_read_bytes` at the mid-decode context) per second, over the device's peak bandwidth
(`jaxchat.common.get_peak_bandwidth`; null where unknown, e.g. CPU). Our decode attends over the whole bucketed
cache with a mask, so it moves more bytes than that minimum: MBU measures distance from the ideal.

    python -m evals.infer_bench -i base -g d20 --batch-sizes 1,8,32
    python -m evals.infer_bench --random-init --depth 4 --aspect-ratio 64 --head-dim 64 --vocab-size 8192 \\
        --max-seq-len 256 --prompt-len 16 --decode-tokens 128 --batch-sizes 1,8

Compile time is excluded: each batch size runs once untimed first. Decoding is greedy, without a tokenizer (no stop
tokens), so every row runs the full --decode-tokens. Prints a table, and last one JSON line with a `sweep` list of
rows {batch_size, prefill_tok_per_sec, tok_per_sec, ms_per_token, mbu}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jaxchat import gpu_compile
from jaxchat import model as gpt
from jaxchat.common import compute_dtype, device_kind, get_peak_bandwidth
from jaxchat.engine import Engine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Inference benchmark (prefill and decode throughput)")
    p.add_argument("-i", "--source", default="base", choices=["base", "sft", "rl"], help="checkpoint source")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--random-init", action="store_true", help="benchmark a randomly initialised model instead")
    p.add_argument("--depth", type=int, default=20, help="[random-init] number of layers")
    p.add_argument("--aspect-ratio", type=int, default=64, help="[random-init] n_embd = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=128, help="[random-init] head dim (n_embd rounded up to it)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="[random-init] sequence_len")
    p.add_argument("--vocab-size", type=int, default=32768, help="[random-init] vocab size")
    p.add_argument("--window-pattern", default="SSSL", help="[random-init] sliding window pattern")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (prefill length)")
    p.add_argument("--decode-tokens", type=int, default=256, help="tokens generated per row")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated decode batch sizes")
    p.add_argument("--decode-chunk", type=int, default=32, help="tokens per host round-trip of the decode loop")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="random-init and prompt seed")
    gpu_compile.add_flags(p, device_batch_auto=False, train=False)  # --compile-for, --hlo-out
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated ints, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs at least one positive batch size")
    if args.prompt_len < 1 or args.decode_tokens < 2 or args.repeats < 1:
        p.error("--prompt-len >= 1, --decode-tokens >= 2 and --repeats >= 1 are required")
    return args


def random_init_config(args) -> gpt.GPTConfig:
    """nanochat base_train's sizing: n_embd = depth * aspect_ratio rounded up to a multiple of head_dim, n_head =
    n_embd / head_dim, n_kv_head = n_head."""
    n_embd = -(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim
    n_head = n_embd // args.head_dim
    return gpt.GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                         n_kv_head=n_head, n_embd=n_embd, window_pattern=args.window_pattern)


def weight_bytes(params) -> int:
    """Bytes of the parameters as stored (a decode step reads all of them)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def kv_read_bytes(config: gpt.GPTConfig, context: int, dtype) -> int:
    """Bytes of K and V one row must read per decode step at this context (each layer up to its window)."""
    per_pos = 2 * config.n_kv_head * config.head_dim * np.dtype(dtype).itemsize
    return sum(min(w + 1, context) * per_pos for w in config.window_sizes)


def bench_once(engine: Engine, prompt: list[int], batch_size: int, decode_tokens: int) -> dict:
    """One generation: prefill seconds (blocked on), decode seconds and steps."""
    stream = engine.stream_chunks(prompt, num_samples=batch_size, max_tokens=decode_tokens, temperature=0.0)
    t0 = time.perf_counter()
    (logits,) = next(stream)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    steps = sum(toks.shape[1] for toks, _, _ in stream)  # each chunk's tokens come back to the host
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile_for:  # compile the prefill and the decode loop for described GPUs; nothing runs
        config = random_init_config(args) if args.random_init else gpu_compile.config_from_checkpoint(
            args.source, args.model_tag, args.depth)[0]
        return gpu_compile.infer_bench_compile_for(args, config)
    if args.random_init:
        config = random_init_config(args)
        params = gpt.init_params(config, jax.random.PRNGKey(args.seed))
        # init_params zeroes the output projections (the trunk would be inert): fill them so the work is real
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), len(leaves))
        params = jax.tree_util.tree_unflatten(treedef, [
            0.02 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 2 and not x.any() else x
            for k, x in zip(keys, leaves)])
        source = "random-init"
        step = None
    else:
        from jaxchat.checkpoint import load_model_from
        params, config, _, meta = load_model_from(args.source, args.model_tag, args.step)
        source, step = args.source, meta.get("step")
    prompt_len = min(args.prompt_len, config.sequence_len - args.decode_tokens)
    if prompt_len < 1:
        raise SystemExit(f"--decode-tokens={args.decode_tokens} leaves no room for a prompt in sequence_len="
                         f"{config.sequence_len}")
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, prompt_len).tolist()
    engine = Engine(params, config, decode_chunk=args.decode_chunk)

    kind = device_kind()
    peak_bw = get_peak_bandwidth(kind)
    w_bytes = weight_bytes(params)
    context_mid = prompt_len + args.decode_tokens // 2
    kv_bytes = kv_read_bytes(config, context_mid, engine.cache_dtype)
    print("=" * 80)
    print(f"Model: {source} step {step} | depth {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head}, "
          f"kv heads {config.n_kv_head}, vocab {config.vocab_size}, seq {config.sequence_len}")
    print(f"Device: {kind} x{jax.device_count()} | compute dtype {compute_dtype().name}, cache dtype "
          f"{engine.cache_dtype.name} | peak bandwidth {'unknown' if peak_bw is None else f'{peak_bw/1e12:.2f} TB/s'}")
    print(f"Weights {w_bytes/2**20:.1f} MiB | KV read per row per step {kv_bytes/2**10:.1f} KiB at context "
          f"{context_mid} | prompt {prompt_len}, decode {args.decode_tokens}, chunk {args.decode_chunk}")
    print("=" * 80)
    header = f"{'batch':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9} {'MBU %':>7}"
    print(header)
    print("-" * len(header))
    sweep = []
    for batch_size in args.batch_sizes:
        bench_once(engine, prompt, batch_size, args.decode_tokens)  # compile prefill and decode for these shapes
        runs = [bench_once(engine, prompt, batch_size, args.decode_tokens) for _ in range(args.repeats)]
        prefill_s = statistics.median(r["prefill_s"] for r in runs)
        decode_s = statistics.median(r["decode_s"] for r in runs)
        steps = runs[0]["steps"]
        ms_per_token = 1e3 * decode_s / steps  # latency of one decode step (one token for every row)
        tok_per_sec = batch_size * steps / decode_s
        mbu = None if peak_bw is None else (w_bytes + batch_size * kv_bytes) / (decode_s / steps) / peak_bw
        row = {"batch_size": batch_size, "prefill_tok_per_sec": round(prompt_len / prefill_s, 1),
               "tok_per_sec": round(tok_per_sec, 1), "ms_per_token": round(ms_per_token, 4),
               "mbu": None if mbu is None else round(mbu, 4)}
        sweep.append(row)
        print(f"{batch_size:>6} {row['prefill_tok_per_sec']:>14,.0f} {row['tok_per_sec']:>13,.0f} "
              f"{ms_per_token:>9.3f} {'-' if mbu is None else f'{100 * mbu:.1f}':>7}")
    print("-" * len(header))
    payload = {"source": source, "step": step, "model_config": config.to_dict(), "device": kind,
               "peak_bandwidth_bytes_per_sec": peak_bw, "weight_bytes": w_bytes, "kv_read_bytes_per_row": kv_bytes,
               "context_mid": context_mid, "prompt_len": prompt_len, "decode_tokens": args.decode_tokens,
               "decode_chunk": args.decode_chunk, "sweep": sweep}
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
