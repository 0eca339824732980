"""On-policy reinforcement learning on GSM8K (nanochat `scripts/chat_rl.py`).

    python -m train.rl                                   # GSM8K from the hub, from the newest SFT checkpoint
    python -m train.rl --task-file=gsm8k_train.jsonl     # offline: a local file in the hub's schema

The algorithm is nanochat's simplified "GRPO", really REINFORCE with a group baseline:
- for each question, `num_samples` completions are sampled from the current policy through the Engine (calculator
  tool use on; tokens the tool forces in carry mask 0 and are not trained);
- reward = the task's reward (GSM8K: 1.0 when the '#### N' answer matches, else 0.0);
- advantage = reward - mean reward of the question's samples (no division by the std, no KL term, no PPO ratio
  or clipping: the data is on-policy);
- loss = -sum(logp(token) * advantage) over the sampled tokens, normalised per forward pass by that pass's number
  of sampled tokens (DAPO-style token-level normalisation), averaged over passes and over the step's questions.
  `pg_loss` computes exactly nanochat's number; `pg_row_weights` turns it into one weight per sequence so the
  loss is a weighted sum of per-token NLLs that can be accumulated over any split of the rows.
- one optimizer step per `examples_per_step` questions; lr = base lr * init_lr_frac * (1 - step / num_steps);
- every --eval-every steps pass@k on the test split (k = 1..device_batch_size, temperature 1.0, top-k 50);
  checkpoints every --save-every steps and at the end to `$JAXCHAT_BASE_DIR/chatrl_checkpoints/<tag>/`.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from jaxchat import schedules as sched
from jaxchat import gpu_compile
from jaxchat import trainer as T
from jaxchat.checkpoint import checkpoint_dir, load_model_from
from jaxchat.common import UserError, maybe_init_distributed, pow2_bucket, print0
from jaxchat.engine import Engine
from jaxchat.multihost import allgather, local_params
from jaxchat.policy_gradient import MIN_SEQ_BUCKET, compute_advantages, pass_at_k, pg_row_weights, rollout_batch

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reinforcement learning on GSM8K (nanochat chat_rl)")
    p.add_argument("--model-tag", type=str, default=None, help="SFT model tag to load")
    p.add_argument("--model-step", type=int, default=None, help="SFT model step to load")
    p.add_argument("--num-epochs", type=int, default=1, help="epochs over the GSM8K train split")
    p.add_argument("--device-batch-size", type=int, default=8, help="samples per forward pass")
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per optimization step (all ranks)")
    p.add_argument("--num-samples", type=int, default=16, help="samples per question")
    p.add_argument("--max-new-tokens", type=int, default=256, help="max tokens generated per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = disabled)")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the embeddings")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="initial lr as a fraction of the base lr")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps")
    p.add_argument("--eval-examples", type=int, default=400, help="test questions for pass@k")
    # jaxchat
    T.add_train_flags(p, save_every=60)
    gpu_compile.add_flags(p, depth=True)  # --compile-for, --hlo-out, --fp8, --remat, --depth
    p.add_argument("--task-file", type=str, default=None,
                   help="local GSM8K-schema file (.jsonl/.json/.parquet rows {question, answer}) for training")
    p.add_argument("--val-task-file", type=str, default=None,
                   help="local GSM8K-schema file for pass@k (default: the test split, or --task-file if given)")
    p.add_argument("--output-tag", type=str, default=None, help="checkpoint tag to write (default: --model-tag or d<depth>)")
    args = p.parse_args(argv)
    for name in ("device_batch_size", "examples_per_step", "num_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_samples % args.device_batch_size:
        p.error(f"--num-samples={args.num_samples} must be a multiple of --device-batch-size={args.device_batch_size}")
    return args


def load_tasks(args):
    from evals.tasks.gsm8k import GSM8K

    def build(split, data_files):
        try:
            return GSM8K(subset="main", split=split, data_files=data_files)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"GSM8K {split} split could not be loaded: {e}; use --task-file/--val-task-file with a "
                             f"local file of {{question, answer}} rows, or run where huggingface.co is reachable.")
    train = build("train", args.task_file)
    val = build("test", args.val_task_file or args.task_file)
    return train, val


def micro_batching(args, mesh) -> tuple[int, int, int]:
    """(questions per process, rows of one micro-batch per process, micro-batches per step) on `mesh`: each
    process rolls out examples_per_step / processes questions x num_samples sequences."""
    processes = len({d.process_index for d in mesh.devices.flat})
    if args.examples_per_step % processes:
        raise UserError(f"--examples-per-step={args.examples_per_step} must be divisible by {processes} processes")
    per_rank = args.examples_per_step // processes
    local_rows = args.device_batch_size * (mesh.size // processes)
    return per_rank, local_rows, -(-per_rank * args.num_samples // local_rows)


def build(args, config, mesh) -> T.Step:
    """The RL step (`jaxchat.trainer.build_step`, weighted: the policy gradient as a weighted NLL) for these flags
    on `mesh`: the real devices, or with --compile-for the described ones."""
    lrs = {"unembedding_lr": args.unembedding_lr, "embedding_lr": args.embedding_lr, "matrix_lr": args.matrix_lr}
    return T.build_step(config, mesh, device_batch_size=args.device_batch_size, seq_len=config.sequence_len,
                        grad_accum=micro_batching(args, mesh)[2], lrs=lrs, weight_decay=args.weight_decay,
                        muon_dtype=args.muon_dtype, loss_fn=T.step_loss_fn(args.fp8, args.remat), weighted=True,
                        muon_eq=args.muon_eq, muon_plus=args.muon_plus)


def compile_for(args, config, mesh, target, origin: str) -> dict:
    """--compile-for: compile the step `build` makes on the described devices; print a table with the memory per
    GPU, then one JSON line. Runs nothing, loads no weights."""
    step = build(args, config, mesh)
    report = gpu_compile.compile_report(step.fn, step.abstract_args, target, args.device_batch_size, args.hlo_out,
                                        label="RL step")
    rows = [("program", "RL step"), ("model", f"d{config.n_layer} n_embd {config.n_embd} seq {config.sequence_len} "
                                              f"({origin})"), ("grad accumulation", micro_batching(args, mesh)[2]),
            ("fp8", args.fp8), ("remat", args.remat)]
    return gpu_compile.print_report(report, rows, program="RL step", model_config=config.to_dict())


def main(argv=None) -> dict:
    """Run RL; returns the trainer's summary plus 'steps', 'rewards' and 'losses' (lists by step), 'passk'."""
    args = parse_args(argv)
    if args.compile_for:  # the SFT model's config only (no weights), else nanochat's d{--depth}
        config, meta, origin = gpu_compile.config_from_checkpoint("sft", args.model_tag, args.depth, args.model_step)
    else:
        maybe_init_distributed()
        params, config, tokenizer, meta = load_model_from("sft", args.model_tag, args.model_step)
    mesh, target = gpu_compile.mesh_for(args.compile_for, args.fsdp)
    if target:  # compile the RL step for the described GPUs and report; nothing runs
        return compile_for(args, config, mesh, target, origin)
    rank, world = jax.process_index(), jax.process_count()
    train_task, val_task = load_tasks(args)
    per_rank, local_rows, accum = micro_batching(args, mesh)
    num_steps = (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps < 1:
        raise UserError(f"{len(train_task)} training questions make no step of {args.examples_per_step} examples")
    print0(f"Calculated number of steps: {num_steps} | sequences per step: {args.examples_per_step * args.num_samples}")

    step = build(args, config, mesh)

    def init():
        sharded = jax.device_put(params, step.param_sh)
        return sharded, step.init_opt(sharded)

    tr = T.Trainer(step, config, checkpoint_dir("rl", args.output_tag or args.model_tag or f"d{config.n_layer}"),
                   args, init, tokenizer=tokenizer, guard=None, run_prefix="chatrl_",
                   meta={"user_config": vars(args).copy(), "sft_model": {"tag": args.model_tag, "step": meta.get("step")}})
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    top_k = args.top_k if args.top_k > 0 else None
    questions = list(range(rank, len(train_task), world))
    rewards_by_step = {}

    def next_batch(s, params):
        """Rollouts of this process's questions of step s (which questions and every seed: functions of s)."""
        engine = Engine(local_params(params), config, tokenizer, max_batch=args.device_batch_size)
        seqs, masks, rewards = [], [], []
        for j in range(per_rank):
            idx = questions[(s * per_rank + j) % len(questions)]
            conversation = train_task[idx]
            prompt = tokenizer.render_for_completion(conversation)
            group_seqs, group_masks = [], []
            for k in range(args.num_samples // args.device_batch_size):
                g, m = engine.generate_batch(prompt, num_samples=args.device_batch_size, max_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_k=top_k,
                                             seed=hash((args.seed, s, idx, k)) & 0x7FFFFFFF)
                group_seqs += g
                group_masks += m
            seqs.append(group_seqs)
            masks.append(group_masks)
            rewards.append([train_task.reward(conversation, tokenizer.decode(q[len(prompt):])) for q in group_seqs])
        rewards = np.asarray(rewards, np.float32)
        length = pow2_bucket(max(len(q) for g in seqs for q in g) - 1, MIN_SEQ_BUCKET, config.sequence_len)
        length = int(np.max(allgather(np.array([length]))))  # every process builds the same global shape
        rows = [rollout_batch(g, m, assistant_end, length) for g, m in zip(seqs, masks)]
        x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])  # (E_local, S, L)
        # weights normalised by the GLOBAL question count (nanochat: / examples_per_rank, then DDP mean over ranks)
        w = (pg_row_weights(y, compute_advantages(rewards), args.device_batch_size) / world).reshape(-1)
        x, y = x.reshape(-1, length), y.reshape(-1, length)
        pad = accum * local_rows - len(x)  # zero-weight rows fill the last micro-batch
        x = np.concatenate([x, np.full((pad, length), assistant_end, np.int32)])
        y = np.concatenate([y, np.full((pad, length), -1, np.int32)])
        w = np.concatenate([w, np.zeros(pad, np.float32)])
        mean_reward, mean_len = allgather(np.array([rewards.mean(), np.mean([len(q) for g in seqs for q in g])],
                                                   np.float32)).mean(0)
        rewards_by_step[s] = float(mean_reward)
        batch = {"inputs": x.reshape(accum, local_rows, length), "targets": y.reshape(accum, local_rows, length),
                 "weights": w.reshape(accum, local_rows)}
        return batch, {"reward": float(mean_reward), "sequence_length": float(mean_len)}

    def passk(s, params):
        engine = Engine(local_params(params), config, tokenizer, max_batch=args.device_batch_size)
        k, outcomes = args.device_batch_size, []
        for idx in range(rank, min(args.eval_examples, len(val_task)), world):
            conversation = val_task[idx]
            prompt = tokenizer.render_for_completion(conversation)
            seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=args.max_new_tokens, temperature=1.0,
                                            top_k=50)
            outcomes.append([bool(val_task.evaluate(conversation, tokenizer.decode(q[len(prompt):]))) for q in seqs])
        counts = allgather(pass_at_k(outcomes, k) * len(outcomes)).sum(0)
        result = counts / max(int(allgather(np.array([len(outcomes)])).sum()), 1)
        print0(f"Step {s} | " + ", ".join(f"Pass@{i + 1}: {v:.4f}" for i, v in enumerate(result)))
        return {f"pass@{i + 1}": float(v) for i, v in enumerate(result)}

    out = tr.run(next_batch, lambda s: (args.init_lr_frac * sched.rl_lr_multiplier(s, num_steps), 0.95,
                                        args.weight_decay),
                 loader_state=lambda: {}, num_iterations=num_steps,
                 hooks=[T.Hook(args.eval_every, passk, at_last=False)],
                 console=lambda s, m: f" | reward: {m['reward']:.4f} | sequence length: {m['sequence_length']:.2f}")
    out.update(steps=num_steps, losses=[out["losses"][s] for s in sorted(out["losses"])],
               rewards=[rewards_by_step[s] for s in sorted(out["losses"])],
               passk=[(s, [v for _, v in sorted(e.items(), key=lambda kv: int(kv[0][5:]))])
                      for s, e in sorted(out["evals"].items())])
    if not out["stopped"]:
        from jaxchat.report import get_report

        get_report().log(section="Chat RL", data=[
            {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
            {"Number of steps": num_steps, "Final mean reward": out["rewards"][-1] if out["rewards"] else None,
             "Checkpoint": out["checkpoint_dir"]}])
    return out


if __name__ == "__main__":
    from jaxchat.common import reexec_with_hugepage_malloc, run_cli

    reexec_with_hugepage_malloc()  # before any work: see its docstring
    run_cli(main)
