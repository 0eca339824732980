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
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxchat import gpu_compile
from jaxchat import model as gpt
from jaxchat.checkpoint import checkpoint_dir, load_model_from, save_checkpoint
from jaxchat.common import get_base_dir, maybe_init_distributed, print0, reexec_with_hugepage_malloc
from jaxchat.engine import Engine
from jaxchat.optim import make_optimizer, set_hparams
from jaxchat.sharding import (batch_sharding, global_batch, make_mesh, opt_state_shardings, param_shardings,
                              replicated, sharded_muon_update)
from jaxchat.train_loop import MetricsWriter
from train.sft import local_view

MIN_SEQ_BUCKET = 32  # rollouts are right-padded to a power of two >= this many tokens (few compiled shapes)


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces: advantages, the policy-gradient loss, rollout batches


def compute_advantages(rewards) -> np.ndarray:
    """Advantages (..., S) float32 = rewards minus the mean over the last axis (the samples of one question).

    nanochat subtracts the group mean only (no z-score). Source: nanochat scripts/chat_rl.py `get_batch`.
    """
    rewards = np.asarray(rewards, np.float32)
    return rewards - rewards.mean(axis=-1, keepdims=True)


def pg_loss(logp, targets, advantages, device_batch_size: int):
    """nanochat's policy-gradient loss for one optimizer step, as a number.

    Args:
        logp: float (E, S, T) log-probabilities of the targets (any value where targets == -1).
        targets: int (E, S, T), -1 where the token is not trained (prompt, tool output, padding).
        advantages: float (E, S).
        device_batch_size: rows per forward pass; S must be a multiple of it (passes = S / device_batch_size).
    Returns:
        scalar: mean over the E questions and their passes of -sum(logp * adv) / max(valid tokens in the pass, 1).
        With E questions over W ranks nanochat's per-rank loss divides by examples_per_rank = E / W and DDP
        averages over the W ranks, which is this same 1 / E.
    Raises:
        ValueError: S not a multiple of device_batch_size.
    """
    logp, targets, advantages = jnp.asarray(logp), jnp.asarray(targets), jnp.asarray(advantages)
    E, S, T = targets.shape
    if S % device_batch_size:
        raise ValueError(f"num_samples {S} must be a multiple of device_batch_size {device_batch_size}")
    P = S // device_batch_size
    valid = targets >= 0
    obj = jnp.where(valid, logp, 0.0) * advantages[..., None]  # (E, S, T)
    obj = obj.reshape(E, P, device_batch_size * T).sum(-1)
    num_valid = jnp.maximum(valid.reshape(E, P, device_batch_size * T).sum(-1), 1)
    return -jnp.sum(obj / (num_valid * P * E))


def pg_row_weights(targets, advantages, device_batch_size: int) -> np.ndarray:
    """Per-sequence weights w (E, S) with pg_loss == sum_rows w * sum_t nll[row, t] (nll = -logp, 0 where ignored).

    w = advantage / (valid tokens of the row's pass * passes * E): with these, the loss is additive over rows and
    the gradient can be accumulated over micro-batches of any size without changing nanochat's normalisation.
    """
    targets, advantages = np.asarray(targets), np.asarray(advantages, np.float32)
    E, S, T = targets.shape
    if S % device_batch_size:
        raise ValueError(f"num_samples {S} must be a multiple of device_batch_size {device_batch_size}")
    P = S // device_batch_size
    valid = (targets >= 0).reshape(E, P, device_batch_size * T).sum(-1)  # (E, P)
    num_valid = np.maximum(valid, 1).repeat(device_batch_size, axis=1)  # (E, S)
    return (advantages / (num_valid * P * E)).astype(np.float32)


def rollout_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int, length: int | None = None):
    """(inputs, targets) int32 (N, L) from generated sequences (prompt + completion) and the Engine's masks.

    Rows are right-padded with `pad_id` (nanochat pads with <|assistant_end|>; padding is never trained) to
    `length` + 1 tokens (default the longest row), then inputs = ids[:, :-1] and targets = ids[:, 1:] with -1 where
    mask[1:] == 0 (prompt, tool-forced tokens, padding). Rows longer than length + 1 are cut.
    """
    L = (max(len(s) for s in sequences) - 1) if length is None else length
    ids = np.full((len(sequences), L + 1), pad_id, np.int32)
    mask = np.zeros((len(sequences), L + 1), np.int8)
    for i, (s, m) in enumerate(zip(sequences, masks)):
        n = min(len(s), L + 1)
        ids[i, :n], mask[i, :n] = s[:n], m[:n]
    return ids[:, :-1], np.where(mask[:, 1:] != 0, ids[:, 1:], -1).astype(np.int32)


def seq_bucket(n: int, cap: int) -> int:
    """Padded input length: the next power of two >= n (at least MIN_SEQ_BUCKET), at most cap."""
    return min(cap, max(MIN_SEQ_BUCKET, 1 << max(n - 1, 0).bit_length()))


def pass_at_k(outcomes: list[list[bool]], k_max: int) -> np.ndarray:
    """float (k_max,): fraction of problems with a correct answer among their first k samples, k = 1..k_max."""
    counts = np.array([sum(any(o[:k]) for o in outcomes) for k in range(1, k_max + 1)], np.float64)
    return counts / max(len(outcomes), 1)


# ----------------------------------------------------------------------------------------------------------------
# Jitted gradient of the weighted NLL and the optimizer step


def _weighted_nll(params, config, x, y, w):
    return jnp.sum(gpt.loss_fn(params, config, x, y, reduction="none").sum(-1) * w)


@functools.partial(jax.jit, static_argnames=("config",))
def _grad_rows(params, config, x, y, w):
    """Gradient and value of sum_rows w * sum_t nll over one micro-batch (rows split over every device)."""
    return jax.value_and_grad(_weighted_nll)(params, config, x, y, w)


def make_apply(optimizer, p_sh, o_sh, mesh):
    """Jitted (params, opt_state, grads, lrm) -> (params, opt_state): one optimizer step, params/state donated."""
    rep = replicated(mesh)

    def apply(params, opt_state, grads, lrm):
        opt_state = set_hparams(opt_state, lrm=lrm)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(apply, in_shardings=(p_sh, o_sh, p_sh, rep), out_shardings=(p_sh, o_sh), donate_argnums=(0, 1))


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reinforcement learning on GSM8K (nanochat chat_rl)")
    p.add_argument("--run", type=str, default="dummy", help="run name for TensorBoard ('dummy' disables it)")
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
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps")
    # jaxchat
    p.add_argument("--task-file", type=str, default=None,
                   help="local GSM8K-schema file (.jsonl/.json/.parquet rows {question, answer}) for training")
    p.add_argument("--val-task-file", type=str, default=None,
                   help="local GSM8K-schema file for pass@k (default: the test split, or --task-file if given)")
    p.add_argument("--output-tag", type=str, default=None, help="checkpoint tag to write (default: --model-tag or d<depth>)")
    gpu_compile.add_flags(p, device_batch_auto=False, depth=True)  # --compile-for, --hlo-out, --fp8, --remat
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
            raise SystemExit(f"GSM8K {split} split could not be loaded: {e}\nUse --task-file/--val-task-file with a "
                             f"local file of {{question, answer}} rows, or run where huggingface.co is reachable.")
    train = build("train", args.task_file)
    val = build("test", args.val_task_file or args.task_file)
    return train, val


def main(argv=None) -> dict:
    """Run RL; returns {'steps', 'rewards', 'losses', 'passk', 'checkpoint_dir'}."""
    args = parse_args(argv)
    if args.compile_for:  # compile the RL update step for described GPUs (jaxchat.gpu_compile); nothing runs
        return gpu_compile.sft_compile_for(args, rl=True)
    user_config = vars(args).copy()
    maybe_init_distributed()
    rank, world = jax.process_index(), jax.process_count()
    params, config, tokenizer, meta = load_model_from("sft", args.model_tag, args.model_step)
    mesh = make_mesh(1)
    p_sh = param_shardings(params, mesh)
    params = jax.device_put(params, p_sh)
    optimizer = make_optimizer(params, config, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                               matrix_lr=args.matrix_lr, weight_decay=args.weight_decay, stack_multiple=mesh.size,
                               muon_update_fn=sharded_muon_update(mesh))
    o_sh = opt_state_shardings(jax.eval_shape(optimizer.init, params), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)
    apply_fn = make_apply(optimizer, p_sh, o_sh, mesh)
    b_sh = batch_sharding(mesh, ndim=2)

    train_task, val_task = load_tasks(args)
    if args.examples_per_step % world:
        raise SystemExit(f"--examples-per-step={args.examples_per_step} must be divisible by {world} processes")
    examples_per_rank = args.examples_per_step // world
    num_steps = (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps < 1:
        raise SystemExit(f"{len(train_task)} training questions make no step of {args.examples_per_step} examples")
    print0(f"Calculated number of steps: {num_steps} | sequences per step: {args.examples_per_step * args.num_samples}")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    top_k = args.top_k if args.top_k > 0 else None
    base_dir = get_base_dir()
    output_tag = args.output_tag or args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("rl", output_tag)
    writer = MetricsWriter(os.path.join(base_dir, "runs", f"chatrl_{args.run}"), enabled=args.run != "dummy")
    # micro-batch rows for the gradient: one pass per device, padded with zero-weight rows
    micro_rows = args.device_batch_size * mesh.size

    def rollouts(engine, step):
        """Yield, per question of this process: (sequences, inputs-ready data, rewards, advantages)."""
        indices = range(rank, len(train_task), world)
        while True:
            for idx in indices:
                conversation = train_task[idx]
                prompt = tokenizer.render_for_completion(conversation)
                seqs, masks = [], []
                for sampling_step in range(args.num_samples // args.device_batch_size):
                    seed = hash((step[0], idx, sampling_step)) & 0x7FFFFFFF
                    s, m = engine[0].generate_batch(prompt, num_samples=args.device_batch_size,
                                                    max_tokens=args.max_new_tokens, temperature=args.temperature,
                                                    top_k=top_k, seed=seed)
                    seqs += s
                    masks += m
                rewards = [train_task.reward(conversation, tokenizer.decode(s[len(prompt):])) for s in seqs]
                yield seqs, masks, np.asarray(rewards, np.float32)

    def evaluate_passk(engine) -> np.ndarray:
        k = args.device_batch_size
        outcomes = []
        for idx in range(rank, min(args.eval_examples, len(val_task)), world):
            conversation = val_task[idx]
            prompt = tokenizer.render_for_completion(conversation)
            seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=args.max_new_tokens, temperature=1.0,
                                            top_k=50)
            outcomes.append([bool(val_task.evaluate(conversation, tokenizer.decode(s[len(prompt):]))) for s in seqs])
        counts = pass_at_k(outcomes, k) * len(outcomes)
        n = len(outcomes)
        if world > 1:
            from jax.experimental import multihost_utils
            counts = multihost_utils.process_allgather(counts).sum(0)
            n = int(multihost_utils.process_allgather(np.array([n])).sum())
        return counts / max(n, 1)

    step_box = [0]  # the rollout generator reads the current step for its seeds
    engine_box = [Engine(local_view(params), config, tokenizer)]
    batches = rollouts(engine_box, step_box)
    history = {"rewards": [], "losses": [], "passk": []}
    for step in range(num_steps):
        step_box[0] = step
        if step % args.eval_every == 0:
            passk = evaluate_passk(engine_box[0])
            print0(f"Step {step} | " + ", ".join(f"Pass@{k + 1}: {v:.4f}" for k, v in enumerate(passk)))
            writer.log(step, {f"pass@{k + 1}": float(v) for k, v in enumerate(passk)})
            history["passk"].append((step, passk.tolist()))

        # ---- rollouts for this step's questions
        seqs_all, masks_all, adv_all, rewards_all = [], [], [], []
        for _ in range(examples_per_rank):
            seqs, masks, rewards = next(batches)
            seqs_all.append(seqs)
            masks_all.append(masks)
            rewards_all.append(rewards)
            adv_all.append(compute_advantages(rewards))
        longest = max(len(s) for group in seqs_all for s in group) - 1
        length = seq_bucket(longest, config.sequence_len)
        if world > 1:  # every process must build the same global shape
            from jax.experimental import multihost_utils
            length = int(np.max(multihost_utils.process_allgather(np.array([length]))))
        rows = [rollout_batch(s, m, assistant_end, length) for s, m in zip(seqs_all, masks_all)]
        inputs = np.stack([r[0] for r in rows])  # (E_local, S, L)
        targets = np.stack([r[1] for r in rows])
        # weights normalised by the GLOBAL question count (nanochat: / examples_per_rank, then DDP mean over ranks)
        weights = pg_row_weights(targets, np.stack(adv_all), args.device_batch_size) / world
        x, y, w = inputs.reshape(-1, length), targets.reshape(-1, length), weights.reshape(-1)
        pad = (-len(x)) % micro_rows
        if pad:
            x = np.concatenate([x, np.full((pad, length), assistant_end, np.int32)])
            y = np.concatenate([y, np.full((pad, length), -1, np.int32)])
            w = np.concatenate([w, np.zeros(pad, np.float32)])

        # ---- gradient, accumulated over micro-batches of rows
        grads, loss = None, 0.0
        local_rows = micro_rows // world
        for i in range(0, len(x), local_rows):
            sl = slice(i, i + local_rows)
            gx = global_batch(x[sl], b_sh, (micro_rows, length))
            gy = global_batch(y[sl], b_sh, (micro_rows, length))
            gw = global_batch(w[sl], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(b_sh.spec[0])),
                              (micro_rows,))
            l, g = _grad_rows(params, config, gx, gy, gw)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            loss = loss + l

        mean_reward = float(np.mean([r.mean() for r in rewards_all]))
        mean_len = float(np.mean([len(s) for group in seqs_all for s in group]))
        if world > 1:
            from jax.experimental import multihost_utils
            mean_reward, mean_len = (float(v) for v in multihost_utils.process_allgather(
                np.array([mean_reward, mean_len])).mean(0))
        lrm = 1.0 - step / num_steps
        params, opt_state = apply_fn(params, opt_state, grads, np.float32(args.init_lr_frac * lrm))
        loss = float(loss)
        engine_box[0] = Engine(local_view(params), config, tokenizer)
        print0(f"Step {step}/{num_steps} | loss: {loss:.6f} | Average reward: {mean_reward:.4f} | "
               f"Average sequence length: {mean_len:.2f} | lrm: {lrm:.3f}")
        writer.log(step, {"reward": mean_reward, "sequence_length": mean_len, "lrm": lrm, "loss": loss})
        history["rewards"].append(mean_reward)
        history["losses"].append(loss)

        if (step > 0 and step % args.save_every == 0) or step == num_steps - 1:
            save_checkpoint(ckpt_dir, step, params, config, {"user_config": user_config,
                                                             "sft_model": {"tag": args.model_tag,
                                                                           "step": meta.get("step")}})
            print0(f"Saved checkpoint to {ckpt_dir} (step {step})")
    writer.close()
    from jaxchat.report import get_report

    get_report().log(section="Chat RL", data=[
        {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
        {"Number of steps": num_steps, "Final mean reward": history["rewards"][-1] if history["rewards"] else None,
         "Checkpoint": ckpt_dir},
    ])
    return {"steps": num_steps, **history, "checkpoint_dir": ckpt_dir}


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # before any work: see its docstring
    main(sys.argv[1:])
