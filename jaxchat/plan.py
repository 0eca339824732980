"""The single dial of nanochat's pretraining (scripts/base_train.py): everything --depth and the flags imply
(model shape, total batch, horizon, learning rates, weight decay), as a pure function of the flags. `train.pretrain`
prints it with --dry-run and trains by it."""

from __future__ import annotations

import math

from jaxchat import model as gpt

B_REF = 2 ** 19  # nanochat: optimal total batch at d12, in tokens
BATCH_EXPONENT = 0.383  # nanochat: B_opt ~ D ** 0.383
D_REF_DEPTH = 12
DEFAULT_VOCAB = 32768  # nanochat's tokenizer size; used by --dry-run when no tokenizer is trained


def recipe(args) -> str:
    """Which nanochat recipe the flags amount to: '5019acc', 'bigram' or 'head' (see the module docstring)."""
    if args.bigram_embed_factor > 0:
        return "bigram"
    return "5019acc" if args.muon_eq == "none" and not args.muon_plus else "head"


def depth_config(depth: int, vocab_size: int = DEFAULT_VOCAB, *, sequence_len: int = 2048, aspect_ratio: int = 64,
                 head_dim: int = 128, window_pattern: str = "SSSL", bigram_embed_factor: int = 0) -> gpt.GPTConfig:
    """nanochat's model for a depth (`build_model_meta` of scripts/base_train.py; defaults are its flags'):
    n_embd = depth * aspect_ratio rounded up to a multiple of head_dim, n_head = n_kv_head = n_embd / head_dim."""
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    extra = {"bigram_embed_factor": bigram_embed_factor} if bigram_embed_factor > 0 else {}
    return gpt.GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                         n_kv_head=n_head, n_embd=n_embd, window_pattern=window_pattern, **extra)


def model_config(args, vocab_size: int, depth: int | None = None) -> gpt.GPTConfig:
    """`depth_config` for train.pretrain's flags at `depth` (default --depth)."""
    return depth_config(args.depth if depth is None else depth, vocab_size, sequence_len=args.max_seq_len,
                        aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, window_pattern=args.window_pattern,
                        bigram_embed_factor=getattr(args, "bigram_embed_factor", 0))


def scaling_params(config: gpt.GPTConfig) -> int:
    """Parameters that enter the scaling laws: transformer matrices + lm_head (nanochat `get_scaling_params`)."""
    counts = gpt.num_scaling_params(config)
    return counts["transformer_matrices"] + counts["lm_head"]


def make_plan(args, vocab_size: int, num_devices: int, strict: bool = True) -> dict:
    """Everything --depth and the flags imply, with nanochat's arithmetic (scripts/base_train.py).

    Returns a JSON-able dict: recipe, muon_eq, muon_plus, bigram_embed_factor, model_config, param_counts, num_scaling_params, flops_per_token, target_tokens,
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
            # the bigram branch (412e9a1) scales its bigram_lambdas lr (0.004) by the batch like the others
            **({"bigram_lambda_lr": 0.004 * batch_lr_scale} if getattr(args, "bigram_embed_factor", 0) > 0 else {}),
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
        "recipe": recipe(args),
        "muon_eq": args.muon_eq,
        "muon_plus": args.muon_plus,
        "bigram_embed_factor": args.bigram_embed_factor,
    }
    if error:
        plan["error"] = error
    return plan


def plan_table(plan: dict) -> str:
    """The plan as an aligned two-column text table (what --dry-run prints above the JSON line)."""
    cfg = plan["model_config"]
    rows = [("recipe", f"{plan['recipe']} (muon_eq={plan['muon_eq']}, muon_plus={plan['muon_plus']}, "
                       f"bigram_embed_factor={plan['bigram_embed_factor']})"),
            ("model", f"d{cfg['n_layer']}, n_embd {cfg['n_embd']}, {cfg['n_head']} heads, seq {cfg['sequence_len']}, "
                      f"vocab {cfg['vocab_size']}, window {cfg['window_pattern']}"),
            ("parameters", f"{plan['param_counts']['total']:,} ({plan['num_scaling_params']:,} scaling)"),
            ("FLOPs per token", f"{plan['flops_per_token']:.4e}"),
            ("total batch", f"{plan['total_batch_size']:,} tokens"),
            ("iterations", f"{plan['num_iterations']:,} ({plan['horizon']})"),
            ("tokens", f"{plan['total_tokens']:,} ({plan['tokens_per_param']:.2f} per scaling param)"),
            ("learning rates", ", ".join(f"{k} {v:.4g}" for k, v in plan["learning_rates"].items())),
            ("Muon weight decay", f"{plan['weight_decay']:.6g}"),
            ("grad accumulation", f"{plan['grad_accum_steps']} on {plan['num_devices']} devices"
             + (f"  ERROR: {plan['error']}" if plan.get("error") else ""))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
