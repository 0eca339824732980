"""Inference benchmark: the server's engine (`jaxchat.engine.Engine`), prefill and decode, swept over the batch.

The idea is later nanochat's `scripts/infer_bench.py`: prefill is compute-bound (one big forward over the prompt),
decode is memory-bound (every step re-reads all weights and the KV cache for one token per row), so batching decode
is almost free until compute saturates. MBU (model bandwidth utilisation) is decode's distance from the bandwidth
roofline: bytes a step must read (weights as stored + each row's KV cache over the attended context, nanochat's
`kv_read_bytes` at the mid-decode context) per second, over the device's peak bandwidth
(`jaxchat.common.get_peak_bandwidth`; null where unknown, e.g. CPU).

    python -m evals.infer_bench -i base -g d20 --batch-sizes 1,8,32
    python -m evals.infer_bench --random-init --depth 4 --aspect-ratio 64 --head-dim 64 --vocab-size 8192 \\
        --max-seq-len 256 --prompt-len 16 --decode-tokens 128 --batch-sizes 1,8

Each batch size B is an Engine of B slots (cache of `cache_bucket(sequence_len)` positions per slot, as
`serve.app` builds it) serving one request of B samples, as a server would: greedy, without a tokenizer (no stop
tokens), so every sample runs the full --decode-tokens. Compile time is excluded (one untimed run first). Per batch
size, medians over --repeats: TTFT (submit to the first token: prefill, insert and the first, short, decode chunk),
TPOT (vLLM's: (last token - first token) / (tokens - 1), the mean inter-token latency; tokens arrive a chunk at a
time), decode tok/s (B / TPOT), MBU, MFU (nanochat's `estimate_decode_flops` per row
per step over the peak FLOP/s), the step time relative to batch 1 (what batching costs per step; on a GPU ~1) and
peak memory (the device's `memory_stats()` peak, or on CPU the process's peak resident set). Prints nanochat
HEAD's card (model, device, parameters, KV bytes, the batch-1 decode ceiling, prefill tok/s and MFU) and a table;
the last line is one JSON document with a `sweep` list of rows {batch_size, ttft_sec, tpot_sec, tok_per_sec,
step_vs_batch1, mbu_percent, mfu_percent, peak_memory_bytes, decode_steps, prefill_tok_per_sec,
ms_per_token, mbu}.

`--compile-for=TARGET:HxG` runs nothing: it builds the same engine's programs (`jaxchat.engine.engine_programs`,
the jitted objects an `Engine` of that many slots runs) on the described GPUs' mesh, the slots split over them, and
compiles them there (`jaxchat.gpu_compile.compile_programs`): the prefill at the bench prompt's bucket and at the
longest prompt the cache admits, and per batch size the insert of that longest prompt and the decode chunk over the
whole cache. It prints each program's memory per GPU, then one JSON line; `--hlo-out FILE` writes FILE.<program>:

    JAX_PLATFORMS=cpu python -m evals.infer_bench --compile-for=h200:1x1 --depth 20 --batch-sizes 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import numpy as np

from jaxchat import gpu_compile
from jaxchat import model as gpt
from jaxchat.common import UserError, compute_dtype, device_kind, get_peak_bandwidth, get_peak_flops, run_cli
from jaxchat.engine import MAX_TOP_K, Engine, cache_bucket, engine_programs
from jaxchat.plan import depth_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Inference benchmark (prefill and decode throughput)")
    p.add_argument("-i", "--source", default="base", choices=["base", "sft", "rl"], help="checkpoint source")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--random-init", action="store_true", help="benchmark a randomly initialised model instead")
    p.add_argument("--depth", type=int, default=20,
                   help="[random-init, or --compile-for without a checkpoint] number of layers")
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
    gpu_compile.add_flags(p, train=False)  # --compile-for, --hlo-out
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
    """The --random-init model: nanochat base_train's sizing of --depth (`jaxchat.plan.depth_config`)."""
    return depth_config(args.depth, args.vocab_size, sequence_len=args.max_seq_len, aspect_ratio=args.aspect_ratio,
                        head_dim=args.head_dim, window_pattern=args.window_pattern)


def engine_size(args, config: gpt.GPTConfig) -> tuple[int, int]:
    """(max_len, prompt_len): each slot's cache as `serve.app` sizes it (`cache_bucket(sequence_len)`), and the
    bench prompt's length (--prompt-len, cut to leave --decode-tokens of room in sequence_len).

    Raises:
        UserError: --decode-tokens leaves no room for a prompt.
    """
    prompt_len = min(args.prompt_len, config.sequence_len - args.decode_tokens)
    if prompt_len < 1:
        raise UserError(f"--decode-tokens={args.decode_tokens} leaves no room for a prompt in sequence_len="
                        f"{config.sequence_len}")
    return cache_bucket(config.sequence_len), prompt_len


def build_programs(args, config: gpt.GPTConfig, mesh) -> dict[str, tuple]:
    """--compile-for's programs: the jitted objects the bench's engines run on `mesh` (`engine_programs`), with
    abstract arguments. {"prefill_t<T>": the prefill of a T-token bucket, at the bench prompt's bucket and at the
    largest (a prompt of max_len - 1 tokens, the most a slot admits); "insert_b<B>": that largest prefix into B slots;
    "decode_b<B>": a chunk of --decode-chunk steps over B slots attending the whole cache (the largest decode
    shape); "decode_logprobs_b<B>": the same in the variant a request with logprobs or a top_k above SMALL_TOP_K
    runs; "score_b<B>": prompt scoring (`Engine.score`) of B prompts of that longest length} as (jitted,
    abstract_args, batch) for `gpu_compile.compile_programs`.

    Raises:
        UserError: a --batch-sizes entry that is not a multiple of the mesh's devices (the slots split evenly).
    """
    max_len, prompt_len = engine_size(args, config)
    uneven = [b for b in args.batch_sizes if b % mesh.size]
    if uneven:
        raise UserError(f"--batch-sizes={','.join(map(str, args.batch_sizes))}: the slots split evenly over the "
                        f"{mesh.size} GPUs of --compile-for={args.compile_for}, so each batch size must be a multiple "
                        f"of {mesh.size} (not {','.join(map(str, uneven))}), e.g. --batch-sizes={mesh.size * 4}")
    prefills, programs = {}, {}
    for n in (prompt_len, max_len - 1):
        prefill, prefill_args = engine_programs(config, mesh, args.batch_sizes[0], max_len, prompt_len=n,
                                                decode_chunk=args.decode_chunk)["prefill"]
        prefills[f"prefill_t{prefill_args[1].shape[1]}"] = (prefill, prefill_args, 1)
    for b in args.batch_sizes:
        progs = engine_programs(config, mesh, b, max_len, prompt_len=max_len - 1, decode_chunk=args.decode_chunk)
        programs[f"insert_b{b}"] = (*progs["insert"], b)
        programs[f"decode_b{b}"] = (*progs["decode"], b)
        programs[f"decode_logprobs_b{b}"] = (*engine_programs(
            config, mesh, b, max_len, prompt_len=max_len - 1, decode_chunk=args.decode_chunk, kmax=MAX_TOP_K,
            logprobs=True)["decode"], b)
        programs[f"score_b{b}"] = (*progs["score"], b)
    return {**prefills, **programs}


def compile_for(args) -> dict:
    """--compile-for: the bench's engine programs (`build_programs`) compiled for the described GPUs; prints their
    memory per GPU, then one JSON line (`gpu_compile.compile_programs`). Loads no weights, runs nothing."""
    if args.random_init:
        config, origin = random_init_config(args), "random-init"
    else:
        config, _, origin = gpu_compile.config_from_checkpoint(args.source, args.model_tag, args.depth, args.step)
    mesh, target = gpu_compile.mesh_for(args.compile_for)
    programs = build_programs(args, config, mesh)
    max_len, prompt_len = engine_size(args, config)
    rows = [("program", "inference engine (jaxchat.engine)"),
            ("model", f"d{config.n_layer} n_embd {config.n_embd} seq {config.sequence_len} ({origin})"),
            ("engine", f"{max_len} positions per slot, slots split over {mesh.size} GPUs, decode chunk "
                       f"{args.decode_chunk}, bench prompt {prompt_len} tokens")]
    return gpu_compile.compile_programs(programs, target, args.hlo_out, rows, program="inference engine",
                                        model_config=config.to_dict(), max_len=max_len)


def weight_bytes(params) -> int:
    """Bytes of a params pytree: of `Engine.decode_params`, what a decode step reads (bfloat16 matrices on GPU)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def kv_read_bytes(config: gpt.GPTConfig, context: int, dtype) -> int:
    """Bytes of K and V one row must read per decode step at this context (each layer up to its window)."""
    per_pos = 2 * config.n_kv_head * config.head_dim * np.dtype(dtype).itemsize
    return sum(min(w + 1, context) * per_pos for w in config.window_sizes)


def matmul_params(config: gpt.GPTConfig) -> int:
    """Parameters that take part in a matmul per token: the transformer matrices and lm_head (not the embeddings
    gathered by row, nor the scalars)."""
    counts = gpt.num_scaling_params(config)
    return counts["transformer_matrices"] + counts["lm_head"]


def decode_flops(config: gpt.GPTConfig, context: int) -> int:
    """Forward FLOPs to decode one token at this context (nanochat `GPT.estimate_decode_flops`): 2 per matmul
    parameter, plus 4 * n_head * head_dim per attended position, each layer up to its window."""
    attn = sum(4 * config.n_head * config.head_dim * min(context, w + 1) for w in config.window_sizes)
    return 2 * matmul_params(config) + attn


def prefill_flops(config: gpt.GPTConfig, n: int) -> int:
    """Forward FLOPs to prefill n tokens (nanochat `GPT.estimate_prefill_flops`): causal, token t attends to
    min(t, window) positions."""
    attn = 0
    for w in config.window_sizes:
        w = min(w + 1, n)
        attn += 4 * config.n_head * config.head_dim * (w * (w + 1) // 2 + (n - w) * w)
    return 2 * matmul_params(config) * n + attn


def peak_memory() -> tuple[int | None, str]:
    """(bytes, kind): the first device's peak bytes in use, or on CPU (no memory_stats) the process's peak RSS."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "host_rss"


def bench_once(engine: Engine, prompt: list[int], batch_size: int, decode_tokens: int) -> dict:
    """One request of batch_size samples: TTFT and TPOT of sample 0, in seconds, and its tokens."""
    t0 = time.perf_counter()
    times = [time.perf_counter() for out in engine.submit(prompt, n=batch_size, max_tokens=decode_tokens,
                                                           temperature=0.0) if out.index == 0]
    return {"ttft_s": times[0] - t0, "tpot_s": (times[-1] - times[0]) / (len(times) - 1), "steps": len(times)}


def prefill_seconds(engine: Engine, prompt: list[int]) -> float:
    """The engine's prefill program on the prompt, blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(engine._prefill(prompt))
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile_for:  # compile the engine's programs for described GPUs; nothing runs
        return compile_for(args)
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
    max_len, prompt_len = engine_size(args, config)
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, prompt_len).tolist()
    engines = {}

    def engine_of(batch_size: int) -> Engine:  # as serve.app builds it: B slots of cache_bucket(sequence_len)
        if batch_size not in engines:
            engines.clear()  # one KV cache at a time
            engines[batch_size] = Engine(params, config, max_batch=batch_size, decode_chunk=args.decode_chunk,
                                         max_len=max_len)
        return engines[batch_size]

    engine = engine_of(1)

    kind = device_kind()
    peak_bw = get_peak_bandwidth(kind)
    peak_flops = get_peak_flops(kind)
    peak_flops = None if peak_flops == float("inf") else peak_flops
    w_bytes = weight_bytes(engine.decode_params)  # the copy decode reads (`jaxchat.engine.decode_weights`)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    context_mid = prompt_len + args.decode_tokens // 2
    kv_bytes = kv_read_bytes(config, context_mid, engine.cache_dtype)
    kv_store = 2 * config.n_layer * config.n_kv_head * config.head_dim * engine.cache_dtype.itemsize
    flops_tok = decode_flops(config, context_mid)
    ceiling = None if peak_bw is None else peak_bw / (w_bytes + kv_bytes)
    print("=" * 100)
    print(f"Model: {source} step {step} | depth {config.n_layer}, dim {config.n_embd}, heads {config.n_head}, "
          f"kv heads {config.n_kv_head}, vocab {config.vocab_size}, seq {config.sequence_len}")
    print(f"Device: {kind} x{jax.device_count()} | peak bandwidth "
          f"{'unknown' if peak_bw is None else f'{peak_bw/1e12:.2f} TB/s'} | peak compute "
          f"{'unknown' if peak_flops is None else f'{peak_flops/1e12:.0f} TFLOPS'} | compute dtype "
          f"{compute_dtype().name}, cache dtype {engine.cache_dtype.name}")
    print("-" * 100)
    print(f"Parameters: {num_params:,} | weight bytes read per decode step: {w_bytes/2**20:.1f} MiB")
    print(f"KV cache: {kv_store:,} bytes/token stored | {kv_bytes:,} bytes read/step at context {context_mid} "
          f"(window pattern {config.window_pattern})")
    print(f"Theoretical decode ceiling at batch 1: {'unknown' if ceiling is None else f'{ceiling:,.0f} tok/s'} | "
          f"prompt {prompt_len}, decode {args.decode_tokens}, chunk {args.decode_chunk}")
    print("=" * 100)
    # the prefill card: batch 1, compute-bound, so MFU is its distance from the roofline
    prefill_seconds(engine, prompt)
    prefill_s = statistics.median(prefill_seconds(engine, prompt) for _ in range(args.repeats))
    prefill_mfu = None if peak_flops is None else 100 * prefill_flops(config, prompt_len) / prefill_s / peak_flops
    print(f"Prefill (batch 1, {prompt_len} tokens): {prompt_len / prefill_s:,.0f} tok/s | MFU "
          f"{'n/a' if prefill_mfu is None else f'{prefill_mfu:.1f}%'}")
    header = (f"{'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'step/b1':>8} "
              f"{'MBU %':>7} {'MFU %':>7} {'peak MiB':>9} {'steps':>6}")
    print(header)
    print("-" * len(header))
    sweep, tpot_b1 = [], None
    for batch_size in args.batch_sizes:
        engine = engine_of(batch_size)
        bench_once(engine, prompt, batch_size, args.decode_tokens)  # compile this engine's programs
        runs = [bench_once(engine, prompt, batch_size, args.decode_tokens) for _ in range(args.repeats)]
        ttft, tpot = (statistics.median(r[k] for r in runs) for k in ("ttft_s", "tpot_s"))
        tpot_b1 = tpot if batch_size == 1 else tpot_b1
        steps = runs[0]["steps"]
        tok_per_sec = batch_size / tpot
        mbu = None if peak_bw is None else (w_bytes + batch_size * kv_bytes) / tpot / peak_bw
        mfu = None if peak_flops is None else 100 * batch_size * flops_tok / tpot / peak_flops
        ratio = None if tpot_b1 is None else round(tpot / tpot_b1, 3)
        mem, mem_kind = peak_memory()
        row = {"batch_size": batch_size, "ttft_sec": round(ttft, 6), "tpot_sec": round(tpot, 6),
               "tok_per_sec": round(tok_per_sec, 1), "step_vs_batch1": ratio,
               "mbu_percent": None if mbu is None else round(100 * mbu, 2),
               "mfu_percent": None if mfu is None else round(mfu, 4), "peak_memory_bytes": mem,
               "decode_steps": steps, "prefill_tok_per_sec": round(prompt_len / ttft, 1),
               "ms_per_token": round(1e3 * tpot, 4), "mbu": None if mbu is None else round(mbu, 4)}
        sweep.append(row)
        print(f"{batch_size:>6} {1e3 * ttft:>9.1f} {1e3 * tpot:>9.2f} {tok_per_sec:>10,.0f} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>8} {'-' if mbu is None else f'{100 * mbu:.1f}':>7} "
              f"{'-' if mfu is None else f'{mfu:.2f}':>7} {'-' if mem is None else f'{mem / 2**20:,.0f}':>9} "
              f"{steps:>6}")
    print("-" * len(header))
    payload = {"source": source, "step": step, "model_config": config.to_dict(), "device": kind,
               "peak_bandwidth_bytes_per_sec": peak_bw, "peak_flops_per_sec": peak_flops, "num_params": num_params,
               "weight_bytes": w_bytes, "kv_bytes_per_token": kv_store, "kv_read_bytes_per_row": kv_bytes,
               "context_mid": context_mid, "decode_flops_per_token": flops_tok,
               "ceiling_bs1_tok_per_sec": None if ceiling is None else round(ceiling, 1),
               "peak_memory_kind": peak_memory()[1], "prompt_len": prompt_len, "decode_tokens": args.decode_tokens,
               "decode_chunk": args.decode_chunk,
               "prefill": {"tok_per_sec": round(prompt_len / prefill_s, 1), "time_sec": round(prefill_s, 6),
                           "mfu_percent": None if prefill_mfu is None else round(prefill_mfu, 2)},
               "sweep": sweep}
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    run_cli(main)
