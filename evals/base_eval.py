"""Evaluate a base (pretrained) model: CORE metric, bits per byte, samples (nanochat `scripts/base_eval.py`).

    python -m evals.base_eval                                   # core,bpb,sample on the newest base checkpoint
    python -m evals.base_eval --eval core --max-per-task 100    # quick, approximate CORE
    python -m evals.base_eval --eval bpb --split-tokens 524288 --device-batch-size 16

Multi-host: start one process per host as for training (jax.distributed). CORE examples are split across
processes, bpb batches are global arrays over every device, samples come from process 0.
Results go to stdout, $JAXCHAT_BASE_DIR/base_eval/<slug>.csv (nanochat's CORE table) and <slug>.json (all of it),
and the "Base model evaluation" section of the report.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

from jaxchat.common import get_base_dir, is_main_process, maybe_init_distributed, print0, run_cli

from jaxchat.engine import SAMPLE_PROMPTS  # noqa: E402
VALID_MODES = ("core", "bpb", "sample")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Base model evaluation: CORE, bits per byte, samples")
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    p.add_argument("--model-tag", default=None, help="checkpoint tag under base_checkpoints/ (default: largest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE items per task (-1: all)")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb rows per device per step")
    p.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    p.add_argument("--eval-bundle", default=None, help="CORE bundle: directory, .zip or URL (default: download)")
    p.add_argument("--core-tokens-per-device", type=int, default=16384,
                   help="CORE: padded tokens per device per forward (bounds the logits' memory)")
    args = p.parse_args(argv)
    modes = {m.strip() for m in args.eval.split(",") if m.strip()}
    bad = modes - set(VALID_MODES)
    if bad or not modes:
        p.error(f"--eval: invalid modes {sorted(bad)}; choose from {','.join(VALID_MODES)}")
    args.modes = modes
    return args


def run_samples(params, config, tokenizer) -> tuple[list[str], list[str]]:
    """Greedy completions of SAMPLE_PROMPTS (16 tokens) and 8 unconditioned samples (128 tokens, temperature 1)."""
    from evals.core import _local_copy
    from jaxchat.engine import Engine

    local = jax.device_put(_local_copy(params), jax.local_devices()[0])
    engine = Engine(local, config, tokenizer, max_batch=8)  # the 8 unconditioned samples decode together
    samples, unconditioned = [], []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend="<|bos|>")
        seqs, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0.0)
        samples.append(tokenizer.decode(seqs[0]))
        print0("-" * 80 + "\n" + samples[-1])
    seqs, _ = engine.generate_batch(tokenizer.encode("", prepend="<|bos|>"), num_samples=8, max_tokens=128,
                                    temperature=1.0)
    for s in seqs:
        unconditioned.append(tokenizer.decode(s))
        print0("-" * 80 + "\n" + unconditioned[-1])
    return samples, unconditioned


def run_bpb(params, config, tokenizer, device_batch_size: int, split_tokens: int) -> dict[str, float]:
    """bpb on the train and val splits, `split_tokens` tokens each (rounded down to whole global batches).

    Raises:
        ValueError: split_tokens is smaller than one global batch.
    """
    from jaxchat.dataloader import make_pretrain_loader
    from jaxchat.loss_eval import evaluate_bpb
    from jaxchat.sharding import batch_sharding, global_batch, make_mesh, replicated
    from jaxchat.tokenizer import get_token_bytes

    mesh = make_mesh()
    rows_local = device_batch_size * jax.local_device_count()
    rows_global = device_batch_size * jax.device_count()
    T = config.sequence_len
    tokens_per_step = rows_global * T
    steps = split_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"--split-tokens={split_tokens} is less than one global batch ({tokens_per_step} tokens "
                         f"= --device-batch-size {device_batch_size} x {jax.device_count()} devices x {T})")
    if split_tokens % tokens_per_step:
        print0(f"Adjusted split_tokens to {steps * tokens_per_step} (a multiple of {tokens_per_step})")
    rows = batch_sharding(mesh, ndim=2)
    params = jax.device_put(params, replicated(mesh))
    token_bytes = get_token_bytes()
    out = {}
    for split in ("train", "val"):
        loader = make_pretrain_loader(tokenizer, rows_local, T, split)
        batches = ((global_batch(x, rows, (rows_global, T)), global_batch(y, rows, (rows_global, T)))
                   for x, y in loader)
        out[split] = evaluate_bpb(params, config, batches, steps, token_bytes)
        print0(f"{split} bpb: {out[split]:.6f}")
    return out


def run_core(params, config, tokenizer, max_per_task: int, bundle: str | None, tokens_per_device: int) -> dict:
    from evals.core import CoreScorer, ensure_eval_bundle, evaluate_core

    bundle_dir = ensure_eval_bundle(bundle)
    scorer = CoreScorer(params=params, config=config, pad_id=tokenizer.get_bos_token_id(),
                        tokens_per_device=tokens_per_device)
    return evaluate_core(scorer, tokenizer, bundle_dir, max_per_task=max_per_task)


def write_results(slug: str, model_name: str, core: dict | None, bpb: dict, samples: list, uncond: list) -> str:
    """nanochat's CORE CSV (if CORE ran) and a JSON of everything, under $JAXCHAT_BASE_DIR/base_eval/."""
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    if core is not None:
        with open(os.path.join(out_dir, f"{slug}.csv"), "w", encoding="utf-8", newline="") as f:
            f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
            for label, acc in core["results"].items():
                f.write(f"{label:<35}, {acc:<10.6f}, {core['centered_results'][label]:<10.6f}\n")
            f.write(f"{'CORE':<35}, {'':<10}, {core['core_metric']:<10.6f}\n")
    path = os.path.join(out_dir, f"{slug}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"model": model_name, "core": core, "bpb": bpb, "samples": samples,
                   "unconditioned_samples": uncond}, f, indent=2)
    return path


def log_report(model_name: str, core: dict | None, bpb: dict, samples: list, uncond: list) -> None:
    try:
        from jaxchat.report import get_report
    except ImportError:
        return
    summary = {"model": model_name}
    if core is not None:
        summary["CORE"] = core["core_metric"]
    if bpb:
        summary["train bpb"], summary["val bpb"] = bpb.get("train"), bpb.get("val")
    data = [summary]
    if core is not None:
        data.append(core["centered_results"])
    if samples:
        data.append({f"sample {i}": s for i, s in enumerate(samples)})
    if uncond:
        data.append({f"unconditioned {i}": s for i, s in enumerate(uncond)})
    get_report().log(section="Base model evaluation", data=data)


def main(argv=None) -> dict:
    args = parse_args(argv)
    maybe_init_distributed()
    from jaxchat.checkpoint import load_model_from

    params, config, tokenizer, meta = load_model_from("base", model_tag=args.model_tag, step=args.step)
    step = int(meta.get("step", args.step or 0))
    model_name, slug = f"base_model (step {step})", f"base_model_{step:06d}"
    print0(f"Evaluating model: {model_name}\nEval modes: {', '.join(sorted(args.modes))}")

    core, bpb, samples, uncond = None, {}, [], []
    if "sample" in args.modes:
        print0("\n" + "=" * 80 + "\nModel samples\n" + "=" * 80)
        if is_main_process():
            samples, uncond = run_samples(params, config, tokenizer)
    if "bpb" in args.modes:
        print0("\n" + "=" * 80 + "\nBPB evaluation\n" + "=" * 80)
        bpb = run_bpb(params, config, tokenizer, args.device_batch_size, args.split_tokens)
    if "core" in args.modes:
        print0("\n" + "=" * 80 + "\nCORE evaluation\n" + "=" * 80)
        core = run_core(params, config, tokenizer, args.max_per_task, args.eval_bundle, args.core_tokens_per_device)
        print0(f"CORE metric: {core['core_metric']:.4f}")
    if is_main_process():
        path = write_results(slug, model_name, core, bpb, samples, uncond)
        print0(f"Results written to {path}")
        log_report(model_name, core, bpb, samples, uncond)
    return {"core": core, "bpb": bpb, "samples": samples, "unconditioned_samples": uncond}


if __name__ == "__main__":
    run_cli(main)
