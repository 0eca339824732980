"""Supervised fine-tuning (SFT) of a pretrained base model into a chat model (nanochat `scripts/chat_sft.py`).

    python -m train.sft                                # nanochat's full mixture (needs the hub datasets)
    python -m train.sft --mixture=identity,simplespelling,spellingbee --num-iterations=200   # offline
    python -m train.sft -- --device-batch-size=16      # flags as nanochat's chat_sft, in kebab-case

What it does, as nanochat:
- loads `base_checkpoints/<tag>` (newest step unless --model-step) and, unless --load-optimizer=0, the optimizer
  state saved with it (momentum buffers; the SFT learning rates replace the pretraining ones);
- inherits max_seq_len, device_batch_size, total_batch_size and the three learning rates from the checkpoint's
  metadata unless given;
- trains on a task mixture: SmolTalk, the identity conversations twice, MMLU auxiliary_train x --mmlu-epochs,
  GSM8K train x --gsm8k-epochs, SimpleSpelling (200K) and SpellingBee (80K), each conversation rendered with
  `Tokenizer.render_conversation` so only assistant tokens are supervised, packed best-fit into rows
  (`jaxchat.sft_data`);
- one epoch by default (or --num-iterations); lr = base lr * init_lr_frac * schedule(progress) with warmup /
  constant / linear warmdown over the epoch progress, Muon momentum 0.85 -> 0.95 over 300 steps, no weight decay;
- every --eval-every steps the validation bits per byte (SmolTalk test, MMLU test[:5200], GSM8K test[:420]); every
  --chatcore-every steps the ChatCORE metric through `evals.chat_eval` when it is available;
- at the end writes `$JAXCHAT_BASE_DIR/chatsft_checkpoints/<tag>/` (params, optimizer state, metadata).

jaxchat specifics: the batch is split over every device of a ('data', 'fsdp') mesh (`jaxchat.sharding`), each
device plays one nanochat rank for the data order; the jitted step, bits-per-byte evaluation and TensorBoard
writer are `jaxchat.train_loop`'s; `--mixture` picks a subset of the tasks by name (for offline machines), the
identity conversations default to jaxchat's own `configs/identity_conversations.jsonl`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys

import jax
import numpy as np

from jaxchat import gpu_compile
from jaxchat import model as gpt
from jaxchat.checkpoint import checkpoint_dir, load_model_from, restore_checkpoint, save_checkpoint
from jaxchat.common import (device_kind, get_base_dir, get_peak_flops, maybe_init_distributed, print0,
                            reexec_with_hugepage_malloc)
from jaxchat.optim import make_optimizer
from jaxchat.sft_data import SFTLoader
from jaxchat.sharding import (abstract_with_shardings, batch_sharding, global_batch, make_mesh, opt_state_shardings,
                              param_shardings, sharded_muon_update)
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.train_loop import (MetricsWriter, StepTimer, hparams_array, jit_train_step,
                                timestamp)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IDENTITY_FILE = os.path.join(REPO_ROOT, "configs", "identity_conversations.jsonl")
TASK_NAMES = ("smoltalk", "identity", "mmlu", "gsm8k", "simplespelling", "spellingbee")
HOW_TO_GET = {
    "smoltalk": "hub dataset HuggingFaceTB/smol-smoltalk (or a local copy at $JAXCHAT_BASE_DIR/datasets/smol-smoltalk/<split>.jsonl)",
    "mmlu": "hub dataset cais/mmlu (or a local copy at $JAXCHAT_BASE_DIR/datasets/mmlu/<subset>/<split>.jsonl)",
    "gsm8k": "hub dataset openai/gsm8k (or a local copy at $JAXCHAT_BASE_DIR/datasets/gsm8k/main/<split>.jsonl)",
    "identity": "a CustomJSON file: --identity-file (default configs/identity_conversations.jsonl)",
    "simplespelling": "a word list: $JAXCHAT_WORD_LIST, or `apt-get install wamerican` for /usr/share/dict/words",
    "spellingbee": "a word list: $JAXCHAT_WORD_LIST, or `apt-get install wamerican` for /usr/share/dict/words",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Supervised fine-tuning (SFT) of a base model (nanochat chat_sft)")
    # logging
    p.add_argument("--run", type=str, default="dummy", help="run name for TensorBoard ('dummy' disables it)")
    # model loading
    p.add_argument("--model-tag", type=str, default=None, help="base model tag to load (default: largest d<N>)")
    p.add_argument("--model-step", type=int, default=None, help="base model step to load (default: newest)")
    p.add_argument("--load-optimizer", type=int, default=1, help="warm-start the optimizer from the base checkpoint")
    # horizon
    p.add_argument("--num-iterations", type=int, default=-1, help="optimization steps (-1 = one full epoch)")
    # batch sizes (None = inherit from the base checkpoint)
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: inherit)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per device (default: inherit)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (default: inherit)")
    # optimization (None = inherit)
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW lr of the embeddings (default: inherit)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW lr of lm_head (default: inherit)")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon lr of the matrices (default: inherit)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="initial lr as a fraction of the base lr")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the run for lr warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="fraction of the run for lr warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="final lr as a fraction of the initial lr")
    # evaluation
    p.add_argument("--eval-every", type=int, default=200, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens of validation per evaluation")
    p.add_argument("--chatcore-every", type=int, default=200, help="ChatCORE every N steps (-1 = disable)")
    p.add_argument("--chatcore-max-cat", type=int, default=-1, help="max problems per categorical ChatCORE task")
    p.add_argument("--chatcore-max-sample", type=int, default=24, help="max problems per generative ChatCORE task")
    # data mixture
    p.add_argument("--mmlu-epochs", type=int, default=3, help="epochs of MMLU auxiliary_train in the mixture")
    p.add_argument("--gsm8k-epochs", type=int, default=4, help="epochs of GSM8K train in the mixture")
    p.add_argument("--mixture", type=str, default=",".join(TASK_NAMES),
                   help=f"comma-separated subset of {','.join(TASK_NAMES)}")
    p.add_argument("--identity-file", type=str, default=None,
                   help="identity conversations (CustomJSON); default $JAXCHAT_BASE_DIR/identity_conversations.jsonl "
                        "if present, else configs/identity_conversations.jsonl")
    p.add_argument("--simple-spelling-size", type=int, default=200_000, help="SimpleSpelling rows in the mixture")
    p.add_argument("--spelling-bee-size", type=int, default=80_000, help="SpellingBee rows in the mixture")
    # jaxchat
    p.add_argument("--fsdp", type=int, default=1, help="size of the mesh's 'fsdp' axis (shards the parameters)")
    p.add_argument("--output-tag", type=str, default=None, help="checkpoint tag to write (default: --model-tag or d<depth>)")
    gpu_compile.add_flags(p, depth=True)  # --compile-for, --hlo-out, --fp8, --remat, --device-batch-size=auto
    args = p.parse_args(argv)
    names = [n.strip().lower() for n in args.mixture.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TASK_NAMES))
    if unknown or not names:
        p.error(f"--mixture: unknown task(s) {unknown}; choose from {','.join(TASK_NAMES)}")
    args.mixture_names = names
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data


def identity_file(args) -> str:
    if args.identity_file:
        return args.identity_file
    user_copy = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    return user_copy if os.path.exists(user_copy) else DEFAULT_IDENTITY_FILE


def _build(name: str, factory):
    """Run a task factory; on missing data exit with what is missing and how to get it."""
    try:
        return factory()
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f"SFT task '{name}' could not be loaded: {e}\nGet it from: {HOW_TO_GET[name]}, or leave it "
                         f"out with --mixture (e.g. --mixture=identity,simplespelling,spellingbee).") from e


def build_train_tasks(args) -> list:
    """nanochat's SFT training mixture, restricted to --mixture (the order of the list is nanochat's)."""
    from evals.tasks.customjson import CustomJSON
    from evals.tasks.gsm8k import GSM8K
    from evals.tasks.mmlu import MMLU
    from evals.tasks.smoltalk import SmolTalk
    from evals.tasks.spellingbee import SimpleSpelling, SpellingBee

    chosen = set(args.mixture_names)
    tasks = []
    if "smoltalk" in chosen:
        tasks.append(_build("smoltalk", lambda: SmolTalk(split="train")))
    if "identity" in chosen:
        path = identity_file(args)
        tasks += [_build("identity", lambda: CustomJSON(filepath=path)) for _ in range(2)]  # 2 epochs
    if "mmlu" in chosen:
        mmlu = _build("mmlu", lambda: MMLU(subset="auxiliary_train", split="train"))
        tasks += [mmlu] * args.mmlu_epochs
    if "gsm8k" in chosen:
        gsm8k = _build("gsm8k", lambda: GSM8K(subset="main", split="train"))
        tasks += [gsm8k] * args.gsm8k_epochs
    if "simplespelling" in chosen:
        tasks.append(_build("simplespelling", lambda: SimpleSpelling(size=args.simple_spelling_size, split="train")))
    if "spellingbee" in chosen:
        tasks.append(_build("spellingbee", lambda: SpellingBee(size=args.spelling_bee_size, split="train")))
    return tasks


def build_val_tasks(args) -> list:
    """nanochat's validation mixture (SmolTalk test, MMLU all test[:5200], GSM8K test[:420]) for the chosen tasks.

    A mixture without any of those three (the offline quickstart) validates on the spelling tasks' test splits
    (5% of their train size), or, failing that, on the identity conversations themselves.
    """
    from evals.tasks.customjson import CustomJSON
    from evals.tasks.gsm8k import GSM8K
    from evals.tasks.mmlu import MMLU
    from evals.tasks.smoltalk import SmolTalk
    from evals.tasks.spellingbee import SimpleSpelling, SpellingBee

    chosen = set(args.mixture_names)
    tasks = []
    if "smoltalk" in chosen:
        tasks.append(_build("smoltalk", lambda: SmolTalk(split="test")))
    if "mmlu" in chosen:
        tasks.append(_build("mmlu", lambda: MMLU(subset="all", split="test", stop=5200)))
    if "gsm8k" in chosen:
        tasks.append(_build("gsm8k", lambda: GSM8K(subset="main", split="test", stop=420)))
    if tasks:
        return tasks
    if "simplespelling" in chosen:
        n = max(1, args.simple_spelling_size // 20)
        tasks.append(_build("simplespelling", lambda: SimpleSpelling(size=n, split="test")))
    if "spellingbee" in chosen:
        n = max(1, args.spelling_bee_size // 20)
        tasks.append(_build("spellingbee", lambda: SpellingBee(size=n, split="test")))
    if not tasks:
        print0("WARNING: no validation split in this mixture; validating on the identity conversations")
        tasks.append(_build("identity", lambda: CustomJSON(filepath=identity_file(args))))
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# Schedules (nanochat chat_sft)


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, constant, linear warmdown to final_lr_frac, over progress 0 -> 1 (not steps: the number of
    SFT steps is only known once the epoch ends)."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) + decay * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 linearly over the first 300 steps."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared with train.rl


def inherit(args, meta: dict) -> None:
    """Fill None flags from the base checkpoint's metadata (nanochat: None = inherit, a value = override)."""
    user_config = meta.get("user_config", {}) or {}
    for name, fallback, source in [("max_seq_len", 2048, meta), ("device_batch_size", 32, meta),
                                   ("total_batch_size", 524288, meta), ("embedding_lr", 0.3, user_config),
                                   ("unembedding_lr", 0.004, user_config), ("matrix_lr", 0.02, user_config)]:
        value, pretrain_value = getattr(args, name), source.get(name)
        if value is None:
            value = pretrain_value if pretrain_value is not None else fallback
            setattr(args, name, value)
            print0(f"Inherited {name}={value} from the base checkpoint")
        elif pretrain_value is not None and value != pretrain_value:
            print0(f"NOTE: --{name.replace('_', '-')}={value} overrides the base value {pretrain_value}")


def local_view(params):
    """This process's full copy of replicated (or fully addressable) params on one local device, for the Engine."""
    def one(a):
        if getattr(a, "is_fully_replicated", False):
            return a.addressable_data(0)
        return jax.device_put(a, jax.local_devices()[0])
    return jax.tree.map(one, params)


def data_ranks(mesh) -> tuple[list[int], int]:
    """(ranks of this process's devices, world size): one nanochat rank per device, in the batch's device order."""
    world = mesh.size
    local = jax.local_device_count()
    start = jax.process_index() * local
    return list(range(start, start + local)), world


def any_process(flag: bool) -> bool:
    """OR of a host flag over processes (nanochat all-reduces last_step with MAX)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.array([int(flag)], np.int32))))


def run_chatcore(params, config, tokenizer, batch_size: int, max_cat: int, max_sample: int) -> dict[str, float]:
    """ChatCORE (nanochat): mean centered accuracy over ARC-E/C, MMLU, GSM8K, HumanEval, SpellingBee.

    Returns {'chatcore/<task>': accuracy, 'chatcore_metric', 'chatcore_cat'}; when tasks were skipped the two
    means cover the evaluated ones only (the log says which were skipped). Uses `evals.chat_eval.run_chat_eval(task_name, params, config, tokenizer, engine, batch_size=..., max_problems=...)`;
    tasks whose data is missing are skipped with a note (the metric then covers the rest). Returns {} when
    evals.chat_eval is not available.
    """
    try:
        from evals.chat_eval import BASELINE_ACCURACIES as baseline, run_chat_eval
    except ImportError as e:
        print0(f"ChatCORE skipped: evals.chat_eval unavailable ({e})")
        return {}
    from jaxchat.engine import Engine

    local = local_view(params)
    engine = Engine(local, config, tokenizer)
    categorical = {"ARC-Easy", "ARC-Challenge", "MMLU"}
    results = {}
    for name in baseline:
        limit = max_cat if name in categorical else max_sample
        try:
            acc = run_chat_eval(name, local, config, tokenizer, engine, batch_size=batch_size,
                                max_problems=None if limit < 0 else limit)
        except (FileNotFoundError, OSError) as e:
            print0(f"  {name}: skipped ({str(e).splitlines()[0][:160]})")
            continue
        results[name] = float(acc)
        print0(f"  {name}: {100 * acc:.2f}%")
    if not results:
        return {}

    def centered(names):
        names = [n for n in names if n in results]
        if not names:
            return None
        return sum((results[n] - baseline[n]) / (1 - baseline[n]) for n in names) / len(names)

    out = {f"chatcore/{k}": v for k, v in results.items()}
    out["chatcore_metric"] = centered(list(baseline))
    out["chatcore_cat"] = centered(categorical)
    return out


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Run SFT; returns a summary {'step', 'min_val_bpb', 'val_bpb_history', 'checkpoint_dir', 'cropped'}."""
    args = parse_args(argv)
    if args.compile_for:  # compile the SFT step for described GPUs (jaxchat.gpu_compile); nothing runs
        return gpu_compile.sft_compile_for(args)
    user_config = {k: v for k, v in vars(args).items() if k != "mixture_names"}
    maybe_init_distributed()
    base_dir = get_base_dir()

    # ---- model, tokenizer, hyperparameters
    params, config, tokenizer, meta = load_model_from("base", args.model_tag, args.model_step)
    base_step = int(meta.get("step", args.model_step or 0))
    inherit(args, meta)
    if args.max_seq_len > config.sequence_len:
        raise SystemExit(f"--max-seq-len={args.max_seq_len} exceeds the model's sequence_len {config.sequence_len}")
    # ---- data
    from evals.tasks.common import TaskMixture

    train_dataset = TaskMixture(build_train_tasks(args))
    val_dataset = TaskMixture(build_val_tasks(args))
    print0(f"Training mixture: {len(train_dataset):,} conversations ({','.join(args.mixture_names)}); "
           f"validation: {len(val_dataset):,}")

    # ---- mesh, optimizer, jitted step
    mesh = make_mesh(args.fsdp)
    world = mesh.size
    if args.device_batch_size == "auto":  # the largest power of two whose step compiles within GPU memory
        args.device_batch_size = gpu_compile.auto_for_mesh(lambda b: gpu_compile.build_pretrain_step(
            config, mesh, b, fp8=args.fp8, remat=args.remat), mesh)
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world
    if args.total_batch_size % tokens_per_fwdbwd:
        raise SystemExit(f"--total-batch-size={args.total_batch_size} is not a multiple of device_batch_size x "
                         f"max_seq_len x devices = {args.device_batch_size} x {args.max_seq_len} x {world}")
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    print0(f"Tokens / micro-batch: {tokens_per_fwdbwd:,} | total batch {args.total_batch_size:,} => "
           f"gradient accumulation steps: {grad_accum_steps}")

    p_sh = param_shardings(params, mesh)
    params = jax.device_put(params, p_sh)
    optimizer = make_optimizer(params, config, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                               matrix_lr=args.matrix_lr, weight_decay=0.0, stack_multiple=mesh.size,
                               muon_update_fn=sharded_muon_update(mesh))
    abstract_opt = jax.eval_shape(optimizer.init, params)
    o_sh = opt_state_shardings(abstract_opt, mesh)
    opt_state = None
    if args.load_optimizer:
        try:
            restored = restore_checkpoint(checkpoint_dir("base", args.model_tag), base_step,
                                          abstract_with_shardings(params, p_sh),
                                          abstract_with_shardings(abstract_opt, o_sh))
            opt_state = restored.get("opt_state")
        except Exception as e:  # absent, or saved for another device count / optimizer layout
            print0(f"WARNING: optimizer state not restored ({type(e).__name__}: {str(e)[:200]})")
        if opt_state is None:
            print0("WARNING: starting with a fresh optimizer (slightly worse than warm-starting)")
        else:
            print0("Loaded optimizer state from the base checkpoint (moments only; SFT learning rates)")
    if opt_state is None:
        opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)

    b_sh = batch_sharding(mesh, ndim=3)
    b2_sh = batch_sharding(mesh, ndim=2)
    step_fn = jit_train_step(config, optimizer, p_sh, o_sh, b_sh,
                             functools.partial(gpt.loss_fn, fp8=args.fp8, remat=args.remat))
    token_bytes = jax.device_put(tokenizer.token_bytes(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    ranks, world = data_ranks(mesh)
    train_loader = SFTLoader(train_dataset, tokenizer, args.device_batch_size, args.max_seq_len, ranks, world,
                             num_iterations=args.num_iterations)
    pc = jax.process_count()

    def global_micro_batches(n):
        xs, ys = zip(*(next(train_loader) for _ in range(n)))
        x, y = np.stack(xs), np.stack(ys)
        shape = (n, x.shape[1] * pc, x.shape[2])
        return global_batch(x, b_sh, shape), global_batch(y, b_sh, shape)

    def val_batches():
        loader = SFTLoader(val_dataset, tokenizer, args.device_batch_size, args.max_seq_len, ranks, world,
                           track_epoch=False)
        for x, y in loader:
            shape = (x.shape[0] * pc, x.shape[1])
            yield global_batch(x, b2_sh, shape), global_batch(y, b2_sh, shape)

    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)
    output_tag = args.output_tag or args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("sft", output_tag)
    writer = MetricsWriter(os.path.join(base_dir, "runs", f"chatsft_{args.run}"), enabled=args.run != "dummy")
    flops_per_token = gpt.estimate_flops(config)
    peak_flops = get_peak_flops(device_kind()) * world

    # ---- loop
    x, y = global_micro_batches(grad_accum_steps)
    step, progress, smooth_loss, timer = 0, 0.0, 0.0, StepTimer()
    min_val_bpb, val_bpb, history = float("inf"), None, []
    while True:
        last_step = any_process(train_loader.last_step)
        flops_so_far = flops_per_token * args.total_batch_size * step
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = evaluate_bpb(params, config, val_batches(), eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            history.append((step, val_bpb))
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
            writer.log(step, {"val/bpb": val_bpb, "total_training_flops": flops_so_far})
        if args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            scores = run_chatcore(params, config, tokenizer, args.device_batch_size, args.chatcore_max_cat,
                                  args.chatcore_max_sample)
            if scores:
                cat = scores["chatcore_cat"]
                print0(f"Step {step:05d} | ChatCORE: {scores['chatcore_metric']:.4f} | ChatCORE_cat: "
                       + ("n/a" if cat is None else f"{cat:.4f}"))
                writer.log(step, scores)
        if last_step:
            save_meta = {"val_bpb": val_bpb, "user_config": user_config, "max_seq_len": args.max_seq_len,
                         "device_batch_size": args.device_batch_size, "total_batch_size": args.total_batch_size,
                         "base_model": {"tag": args.model_tag, "step": base_step}, "cropped": train_loader.cropped}
            save_checkpoint(ckpt_dir, step, params, config, save_meta, opt_state=opt_state,
                            loader_state=train_loader.state_dict())
            print0(f"Saved checkpoint to {ckpt_dir} (step {step})")
            break

        lrm = lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        hp = hparams_array(args.init_lr_frac * lrm, muon_momentum(step), 0.0)
        t0 = timestamp()
        params, opt_state, loss = step_fn(params, opt_state, x, y, hp)
        x, y = global_micro_batches(grad_accum_steps)  # the host packs the next batch while the device works
        progress = max(progress, train_loader.approx_progress)
        train_loss = float(loss)
        dt = timestamp() - t0
        step += 1
        timer.add(step, dt)
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        tok_per_sec = args.total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_sec / peak_flops
        print0(f"step {step:05d} ({100 * progress:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {int(tok_per_sec):,} | mfu: {mfu:.2f} | "
               f"epoch: {train_loader.epoch} | total time: {timer.total / 60:.2f}m")
        if step % 10 == 0:
            writer.log(step, {"train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                              "train/mfu": mfu, "train/epoch": train_loader.epoch,
                              "train/padding_frac": train_loader.padding_fraction,
                              "total_training_flops": flops_so_far, "total_training_time": timer.total})
        if step == 1:  # as nanochat: the collector's periodic scans stall the loop; collect once, then freeze
            gc.collect()
            gc.freeze()

    if train_loader.cropped:
        print0(f"NOTE: {train_loader.cropped} conversations were longer than a row and were cropped to "
               f"{args.max_seq_len + 1} tokens")
    print0(f"Total training time: {timer.total / 60:.2f}m | Minimum validation bpb: {min_val_bpb:.4f}")
    writer.close()
    from jaxchat.report import get_report

    get_report().log(section="Chat SFT", data=[
        {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
        {"Number of iterations": step, "Minimum validation bpb": min_val_bpb, "Conversations cropped":
         train_loader.cropped, "Total training time": f"{timer.total / 60:.2f}m", "Checkpoint": ckpt_dir},
    ])
    return {"step": step, "min_val_bpb": min_val_bpb, "val_bpb_history": history, "checkpoint_dir": ckpt_dir,
            "cropped": train_loader.cropped}


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # before any work: see its docstring
    main(sys.argv[1:])
