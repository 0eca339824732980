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
writer are `jaxchat.trainer`'s (so is resume: the packer's buffer is rebuilt by replaying the draws); `--mixture` picks a subset of the tasks by name (for offline machines), the
identity conversations default to jaxchat's own `configs/identity_conversations.jsonl`.
"""

from __future__ import annotations

import argparse

import jax

from jaxchat import model as gpt
from jaxchat import schedules as sched
from jaxchat import gpu_compile
from jaxchat import trainer as T
from jaxchat.checkpoint import checkpoint_dir, load_model_from, restore_checkpoint
from jaxchat.common import UserError, maybe_init_distributed, print0
from jaxchat.multihost import global_batch
from jaxchat.sft_data import SFTLoader
from jaxchat.sharding import abstract_with_shardings, batch_sharding
from jaxchat.loss_eval import evaluate_bpb
from train.chat_tasks import TASK_NAMES, build_train_tasks, build_val_tasks, run_chatcore

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Supervised fine-tuning (SFT) of a base model (nanochat chat_sft)")
    # model loading
    p.add_argument("--model-tag", type=str, default=None, help="base model tag to load (default: largest d<N>)")
    p.add_argument("--model-step", type=int, default=None, help="base model step to load (default: newest)")
    p.add_argument("--load-optimizer", type=int, default=1, help="warm-start the optimizer from the base checkpoint")
    # horizon
    p.add_argument("--num-iterations", type=int, default=-1, help="optimization steps (-1 = one full epoch)")
    # batch sizes (None = inherit from the base checkpoint)
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: inherit)")
    p.add_argument("--device-batch-size", type=gpu_compile.int_or_auto, default=None,
                   help="rows per device (default: inherit), or 'auto' (the largest that compiles within GPU memory)")
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
    T.add_train_flags(p)
    gpu_compile.add_flags(p, depth=True)  # --compile-for, --hlo-out, --fp8, --remat, --depth
    p.add_argument("--output-tag", type=str, default=None, help="checkpoint tag to write (default: --model-tag or d<depth>)")
    args = p.parse_args(argv)
    names = [n.strip().lower() for n in args.mixture.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TASK_NAMES))
    if unknown or not names:
        p.error(f"--mixture: unknown task(s) {unknown}; choose from {','.join(TASK_NAMES)}")
    args.mixture_names = names
    return args


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def inherit(args, meta: dict, origin: str = "the base checkpoint") -> None:
    """Fill None flags from the base checkpoint's metadata (nanochat: None = inherit, a value = override)."""
    user_config = meta.get("user_config", {}) or {}
    for name, fallback, source in [("max_seq_len", 2048, meta), ("device_batch_size", 32, meta),
                                   ("total_batch_size", 524288, meta), ("embedding_lr", 0.3, user_config),
                                   ("unembedding_lr", 0.004, user_config), ("matrix_lr", 0.02, user_config)]:
        value, pretrain_value = getattr(args, name), source.get(name)
        if value is None:
            value = pretrain_value if pretrain_value is not None else fallback
            setattr(args, name, value)
            print0(f"Inherited {name}={value} from {origin}" if pretrain_value is not None else
                   f"{name}={value} (default: {origin} does not say)")
        elif pretrain_value is not None and value != pretrain_value:
            print0(f"NOTE: --{name.replace('_', '-')}={value} overrides the base value {pretrain_value}")


def grad_accum(args, device_batch_size: int, num_devices: int, strict: bool = True) -> int:
    """Micro-batches per step: --total-batch-size / (device batch x --max-seq-len x devices).

    Raises:
        UserError: (strict) the total batch is not a multiple of one micro-batch.
    """
    tokens_per_fwdbwd = device_batch_size * args.max_seq_len * num_devices
    if strict and args.total_batch_size % tokens_per_fwdbwd:
        raise UserError(f"--total-batch-size={args.total_batch_size} is not a multiple of device_batch_size x "
                        f"max_seq_len x devices = {device_batch_size} x {args.max_seq_len} x {num_devices}")
    return max(1, args.total_batch_size // tokens_per_fwdbwd)


def largest_device_batch(args, num_devices: int) -> int:
    """The largest device batch --device-batch-size=auto may pick: one micro-batch holds the whole total batch."""
    return max(1, args.total_batch_size // (args.max_seq_len * num_devices))


def build(args, config, mesh, device_batch_size: int) -> T.Step:
    """The SFT step (`jaxchat.trainer.build_step`: the pretraining step with SFT's learning rates and no weight
    decay) for these (inherited) flags on `mesh`: the real devices, or with --compile-for the described ones."""
    lrs = {"unembedding_lr": args.unembedding_lr, "embedding_lr": args.embedding_lr, "matrix_lr": args.matrix_lr}
    return T.build_step(config, mesh, device_batch_size=device_batch_size, seq_len=args.max_seq_len,
                        grad_accum=grad_accum(args, device_batch_size, mesh.size, strict=False), lrs=lrs,
                        muon_dtype=args.muon_dtype, loss_fn=T.step_loss_fn(args.fp8, args.remat),
                        muon_eq=args.muon_eq, muon_plus=args.muon_plus)


def compile_for(args, config, mesh, target, origin: str) -> dict:
    """--compile-for: compile the step `build` makes on the described devices (the largest device batch that fits
    for 'auto'); print a table with the memory per GPU, then one JSON line. Runs nothing, loads no weights."""
    if args.device_batch_size != "auto":
        grad_accum(args, args.device_batch_size, mesh.size)  # bad flags fail before the compile
    b, report = gpu_compile.choose_and_compile(lambda b: build(args, config, mesh, b), target,
                                               args.device_batch_size, args.hlo_out, label="SFT step",
                                               largest=largest_device_batch(args, mesh.size))
    rows = [("program", "SFT step"), ("model", f"d{config.n_layer} n_embd {config.n_embd} seq {config.sequence_len} "
                                               f"({origin})"), ("max seq len", args.max_seq_len),
            ("grad accumulation", f"{grad_accum(args, b, mesh.size)} micro-batches of the "
                                  f"{args.total_batch_size:,}-token batch"), ("fp8", args.fp8), ("remat", args.remat)]
    return gpu_compile.print_report(report, rows, program="SFT step", model_config=config.to_dict())


def data_ranks(mesh) -> tuple[list[int], int]:
    """(ranks of this process's devices, world size): one nanochat rank per device, in the batch's device order."""
    world = mesh.size
    local = jax.local_device_count()
    start = jax.process_index() * local
    return list(range(start, start + local)), world


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Run SFT; returns the trainer's summary plus 'step', 'val_bpb_history' [(step, bpb)], 'cropped'."""
    args = parse_args(argv)
    user_config = {k: v for k, v in vars(args).items() if k != "mixture_names"}
    if args.compile_for:  # the base model's config only (no weights), else nanochat's d{--depth} as its speedrun
        config, meta, origin = gpu_compile.config_from_checkpoint("base", args.model_tag, args.depth, args.model_step)
        inherit(args, meta or {"device_batch_size": gpu_compile.SPEEDRUN_DEVICE_BATCH}, origin)
    else:
        maybe_init_distributed()
        params, config, tokenizer, meta = load_model_from("base", args.model_tag, args.model_step)
        inherit(args, meta)
    if args.max_seq_len > config.sequence_len:
        raise UserError(f"--max-seq-len={args.max_seq_len} exceeds the model's sequence_len {config.sequence_len}")
    mesh, target = gpu_compile.mesh_for(args.compile_for, args.fsdp)
    if target:  # compile the SFT step for the described GPUs and report; nothing runs
        return compile_for(args, config, mesh, target, origin)
    base_step = int(meta.get("step", args.model_step or 0))
    from evals.tasks.common import TaskMixture

    train_dataset, val_dataset = TaskMixture(build_train_tasks(args)), TaskMixture(build_val_tasks(args))
    print0(f"Training mixture: {len(train_dataset):,} conversations ({','.join(args.mixture_names)}); "
           f"validation: {len(val_dataset):,}")

    if args.device_batch_size == "auto":  # the largest power of two whose step compiles within GPU memory
        args.device_batch_size = gpu_compile.auto_device_batch_size(
            lambda b: build(args, config, mesh, b), largest=largest_device_batch(args, mesh.size))
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * mesh.size
    accum = grad_accum(args, args.device_batch_size, mesh.size)
    print0(f"Tokens / micro-batch: {tokens_per_fwdbwd:,} | total batch {args.total_batch_size:,} => "
           f"gradient accumulation steps: {accum}")
    step = build(args, config, mesh, args.device_batch_size)

    def init():
        sharded = jax.device_put(params, step.param_sh)
        opt_state = None
        if args.load_optimizer:
            try:  # the base run's moments; the SFT learning rates replace its hyperparameters each step
                abstract_opt = jax.eval_shape(step.optimizer.init, sharded)
                opt_state = restore_checkpoint(checkpoint_dir("base", args.model_tag), base_step,
                                               abstract_with_shardings(sharded, step.param_sh),
                                               abstract_with_shardings(abstract_opt, step.opt_sh)).get("opt_state")
            except Exception as e:  # absent, or saved for another device count / optimizer layout
                print0(f"WARNING: optimizer state not restored ({type(e).__name__}: {str(e)[:200]})")
            print0("Loaded the base checkpoint's optimizer state" if opt_state is not None
                   else "WARNING: starting with a fresh optimizer (slightly worse than warm-starting)")
        return sharded, opt_state if opt_state is not None else step.init_opt(sharded)

    output_tag = args.output_tag or args.model_tag or f"d{config.n_layer}"
    tr = T.Trainer(step, config, checkpoint_dir("sft", output_tag), args, init, tokenizer=tokenizer,
                   run_prefix="chatsft_", meta={
                       "user_config": user_config, "max_seq_len": args.max_seq_len,
                       "device_batch_size": args.device_batch_size, "total_batch_size": args.total_batch_size,
                       "base_model": {"tag": args.model_tag, "step": base_step}})
    ranks, world = data_ranks(mesh)
    loader = SFTLoader(train_dataset, tokenizer, args.device_batch_size, args.max_seq_len, ranks, world,
                       num_iterations=args.num_iterations)
    drawn = [int((tr.loader_state or {}).get("batches", 0))]
    for _ in range(drawn[0]):  # resume: the packer's buffer is not saved, so replay the draws (exact, host-only)
        next(loader)
    ls = tr.loop_state
    ls.setdefault("progress", 0.0)

    def next_batch(s, params):
        drawn[0] += accum
        batch = T.micro_batches(loader, accum)
        ls["progress"] = max(ls["progress"], loader.approx_progress)
        return batch, {"train/epoch": loader.epoch, "train/padding_frac": loader.padding_fraction}

    pc = jax.process_count()
    val_sh = batch_sharding(mesh, ndim=2)
    token_bytes = tokenizer.token_bytes()

    def val_bpb(s, params):
        val = SFTLoader(val_dataset, tokenizer, args.device_batch_size, args.max_seq_len, ranks, world,
                        track_epoch=False)
        batches = ((global_batch(x, val_sh, (x.shape[0] * pc, x.shape[1])),
                    global_batch(y, val_sh, (y.shape[0] * pc, y.shape[1]))) for x, y in val)
        bpb = evaluate_bpb(params, config, batches, max(1, args.eval_tokens // tokens_per_fwdbwd), token_bytes)
        print0(f"Step {s:05d} | Validation bpb: {bpb:.4f}")
        return {"val/bpb": bpb}

    def chatcore(s, params):
        scores = run_chatcore(params, config, tokenizer, args.device_batch_size, args.chatcore_max_cat,
                              args.chatcore_max_sample)
        if scores:
            cat = scores["chatcore_cat"]
            print0(f"Step {s:05d} | ChatCORE: {scores['chatcore_metric']:.4f} | ChatCORE_cat: "
                   + ("n/a" if cat is None else f"{cat:.4f}"))
        return scores

    def hparams(s):
        lrm = sched.sft_lr_multiplier(ls["progress"], args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        return args.init_lr_frac * lrm, sched.sft_muon_momentum(s), 0.0

    hooks = [T.Hook(args.eval_every, val_bpb), T.Hook(args.chatcore_every, chatcore, at_start=False,
                                                      at_last=args.chatcore_every > 0)]
    out = tr.run(next_batch, hparams, loader_state=lambda: {"batches": drawn[0], **loader.state_dict()},
                 is_last=lambda s: loader.last_step, hooks=hooks, tokens_per_step=args.total_batch_size,
                 flops_per_token=gpt.estimate_flops(config),
                 console=lambda s, m: f" | progress: {100 * ls['progress']:.2f}% | epoch: {m.get('train/epoch')}")
    out.update(step=out["final_step"], val_bpb_history=sorted(out["val_bpb"].items()), cropped=loader.cropped)
    if loader.cropped:
        print0(f"NOTE: {loader.cropped} conversations were longer than a row and were cropped to "
               f"{args.max_seq_len + 1} tokens")
    print0(f"Total training time: {out['total_time'] / 60:.2f}m | Minimum validation bpb: {out['min_val_bpb']:.4f}")
    if not out["stopped"]:
        from jaxchat.report import get_report

        get_report().log(section="Chat SFT", data=[
            {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
            {"Number of iterations": out["step"], "Minimum validation bpb": out["min_val_bpb"],
             "Conversations cropped": loader.cropped, "Total training time": f"{out['total_time'] / 60:.2f}m",
             "Checkpoint": out["checkpoint_dir"]}])
    return out


if __name__ == "__main__":
    from jaxchat.common import reexec_with_hugepage_malloc, run_cli

    reexec_with_hugepage_malloc()  # before any work: see its docstring
    run_cli(main)
