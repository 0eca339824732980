"""Evaluate a chat model (SFT or RL) on ARC, MMLU, GSM8K, HumanEval, SpellingBee (nanochat `scripts/chat_eval.py`).

    python -m evals.chat_eval -i sft                      # all tasks, then ChatCORE
    python -m evals.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100

Categorical tasks (multiple choice) read the logits of the answer letters at the assistant's first position, a
batch of problems per forward. Generative tasks sample with the KV-cache Engine and check the completion (a
problem passes if any of its samples does). ChatCORE = mean over all six tasks of the accuracy centered on the
task's random baseline (0 at chance, 1 perfect). Problems are split across processes; counts are summed.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.common import maybe_init_distributed, pow2_bucket, print0, run_cli

ALL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
# Random-guess accuracy: 1 of 4 for multiple choice, 0 for open-ended answers.
BASELINE_ACCURACIES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                       "SpellingBee": 0.0}


def make_task(name: str):
    """The eval split of a task by its chat_eval name. Raises ValueError for an unknown name."""
    from evals.tasks.arc import ARC
    from evals.tasks.gsm8k import GSM8K
    from evals.tasks.humaneval import HumanEval
    from evals.tasks.mmlu import MMLU
    from evals.tasks.spellingbee import SpellingBee

    factories = {
        "ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
        "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
        "MMLU": partial(MMLU, subset="all", split="test"),
        "GSM8K": partial(GSM8K, subset="main", split="test"),
        "HumanEval": HumanEval,
        "SpellingBee": partial(SpellingBee, size=256, split="test"),
    }
    if name not in factories:
        raise ValueError(f"unknown task {name!r}; choose from {'|'.join(ALL_TASKS)}")
    return factories[name]()


def _sum_over_processes(*values: int) -> list[int]:
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.array(values, np.int32))).sum(axis=0)]


def chatcore(results: dict[str, float]) -> float | None:
    """Mean centered accuracy when every task of ALL_TASKS was evaluated, else None."""
    if not all(t in results for t in ALL_TASKS):
        return None
    return sum((results[t] - BASELINE_ACCURACIES[t]) / (1.0 - BASELINE_ACCURACIES[t]) for t in ALL_TASKS) / len(ALL_TASKS)


def run_categorical_eval(task, tokenizer, params=None, config=None, batch_size: int = 8,
                         max_problems: int | None = None, forward_fn: Callable | None = None) -> float:
    """Accuracy of a multiple-choice task from the logits of its letters (nanochat `run_categorical_eval`).

    Each batch of `batch_size` problems is rendered for completion, right-padded with BOS to a power-of-two
    length (at most config.sequence_len; longer prompts keep their last tokens) and run in one jitted forward
    sharded over the local devices. The prediction is the letter with the largest logit at the last prompt
    position, among the problem's own letters only.

    Args:
        params, config: the model; or `forward_fn(idx) -> logits` (tests).
    Raises:
        ValueError: a letter does not encode to exactly one token.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if forward_fn is None:
        from jaxchat.model import forward
        logits_fn = jax.jit(lambda p, idx, pos: forward(p, config, idx)[jnp.arange(idx.shape[0]), pos])
        max_len = config.sequence_len
    else:
        logits_fn = jax.jit(lambda p, idx, pos: forward_fn(idx)[jnp.arange(idx.shape[0]), pos])
        max_len = None
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    rows = NamedSharding(mesh, P("data"))
    if params is not None:  # replicated over this process's devices, whatever device the caller left it on
        params = jax.device_put(params, NamedSharding(mesh, P()))
    B = -(-batch_size // len(devices)) * len(devices)  # a multiple of the local device count
    bos = tokenizer.get_bos_token_id()
    rank, world = jax.process_index(), jax.process_count()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    letter_ids: dict[str, int] = {}
    passed = total = 0
    for b in range(rank, -(-n // batch_size), world):
        convs = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        if max_len:
            prompts = [p[-max_len:] for p in prompts]
        T = pow2_bucket(max(len(p) for p in prompts), 64)
        T = min(T, max_len) if max_len else T
        idx = np.full((B, T), bos, np.int32)
        pos = np.zeros(B, np.int32)
        for r, p in enumerate(prompts):
            idx[r, :len(p)] = p
            pos[r] = len(p) - 1
        logits = np.asarray(logits_fn(params, jax.device_put(idx, rows), jax.device_put(pos, rows)))
        for r, conv in enumerate(convs):
            letters = conv["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise ValueError(f"answer letter {letter!r} encodes to {len(ids)} tokens; expected one")
                    letter_ids[letter] = ids[0]
            choice = int(np.argmax(logits[r, [letter_ids[l] for l in letters]]))
            passed += int(task.evaluate(conv, letters[choice]))
            total += 1
    passed, total = _sum_over_processes(passed, total)
    acc = passed / max(total, 1)
    print0(f"Final: {passed}/{total} ({100 * acc:.2f}%)")
    return acc


def run_generative_eval(task, tokenizer, engine, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None) -> float:
    """Fraction of problems where at least one of `num_samples` completions passes `task.evaluate`."""
    rank, world = jax.process_index(), jax.process_count()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    passed = total = 0
    for i in range(rank, n, world):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(s[len(prompt):]) for s in seqs]
        passed += int(any(task.evaluate(conv, c) for c in completions))
        total += 1
        if rank == 0:
            print(f"\r\033[KProcess {rank} | {passed}/{total} ({100 * passed / total:.2f}%)", end="", flush=True)
    if rank == 0:
        print()
    passed, total = _sum_over_processes(passed, total)
    acc = passed / max(total, 1)
    print0(f"Final: {passed}/{total} ({100 * acc:.2f}%)")
    return acc


def run_chat_eval(task_name: str, params, config, tokenizer, engine, batch_size: int = 8, num_samples: int = 1,
                  max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                  max_problems: int | None = None, task=None) -> float:
    """Accuracy on one task by name (or the given `task` object), by the method its eval_type calls for.

    Argument order follows nanochat's run_chat_eval(task_name, model, tokenizer, engine, ...), with the model as
    (params, config). Raises FileNotFoundError when the task's data is missing (see evals.tasks).
    """
    task = task if task is not None else make_task(task_name)
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, params, config, batch_size, max_problems)
    if task.eval_type == "generative":
        return run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                                   max_problems)
    raise ValueError(f"{task_name}: unsupported eval_type {task.eval_type!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat model evaluation")
    p.add_argument("-i", "--source", required=True, choices=["sft", "rl"], help="which checkpoints: sft|rl")
    p.add_argument("-a", "--task-name", default=None, help=f"tasks split by '|' (default all: {'|'.join(ALL_TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward for categorical tasks")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-x", "--max-problems", type=int, default=None)
    p.add_argument("--unsafe-exec", action="store_true",
                   help="run HumanEval's model-written code without isolation where bubblewrap is unavailable")
    args = p.parse_args(argv)
    if args.unsafe_exec:  # evals.execution reads it; without it, a machine with no sandbox refuses HumanEval
        import os
        os.environ["JAXCHAT_UNSAFE_EXEC"] = "1"
    args.tasks = list(ALL_TASKS) if args.task_name is None else [t.strip() for t in args.task_name.split("|")]
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown:
        p.error(f"-a/--task-name: unknown tasks {unknown}; choose from {'|'.join(ALL_TASKS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    maybe_init_distributed()
    from evals.core import _local_copy
    from jaxchat.checkpoint import load_model_from
    from jaxchat.engine import Engine

    params, config, tokenizer, meta = load_model_from(args.source, model_tag=args.model_tag, step=args.step)
    params = jax.device_put(_local_copy(params), jax.local_devices()[0])
    engine = Engine(params, config, tokenizer, max_batch=args.num_samples)  # a problem's samples decode together
    results = {}
    for name in args.tasks:
        print0(f"\n=== {name} ===")
        results[name] = run_chat_eval(name, params, config, tokenizer, engine, batch_size=args.batch_size,
                                      num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k or None,
                                      max_problems=args.max_problems)
        print0(f"{name} accuracy: {100 * results[name]:.2f}%")
    score = chatcore(results)
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
    try:
        from jaxchat.report import get_report
        flags = {k: v for k, v in vars(args).items() if k != "tasks"}
        get_report().log(section=f"Chat evaluation {args.source}",
                         data=[flags, results, {"ChatCORE": score} if score is not None else {}])
    except ImportError:
        pass
    return {"results": results, "ChatCORE": score}


if __name__ == "__main__":
    run_cli(main)
