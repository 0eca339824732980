"""Small helpers for `evals/eval.ipynb`: notebook parameters from the environment, TensorBoard scalars, plots, tables.

Kept out of the notebook so its cells stay short, and importable by tests. Nothing here needs TensorFlow: event files
(written by `jaxchat.trainer.MetricsWriter` through tensorboardX) are read with tensorboard's `EventAccumulator`.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

ENV_PREFIX = "JAXCHAT_NB_"
# Training scripts log to $JAXCHAT_BASE_DIR/runs/<prefix><run> (train/pretrain.py, train/sft.py, train/rl.py).
RUN_PREFIX = {"base": "", "sft": "chatsft_", "mid": "chatsft_", "rl": "chatrl_"}
# Curves shown first when present; any other scalar tags follow, up to `max_plots`.
PREFERRED_TAGS = ("train/loss", "val/bpb", "core_metric", "train/mfu", "train/lrm", "train/tok_per_sec",
                  "reward", "loss", "pass@1")


def env_param(name: str, default, cast: Callable = str):
    """A notebook parameter: `$JAXCHAT_NB_<NAME>` when set, else `default`.

    The strings '' and 'none' (any case) mean None, so CI can unset an optional parameter.

    Raises:
        ValueError: the variable does not convert with `cast` (the message names the variable).
    """
    var = ENV_PREFIX + name.upper()
    raw = os.environ.get(var)
    if raw is None:
        return default
    if raw.strip().lower() in ("", "none"):
        return None
    try:
        return cast(raw)
    except ValueError as e:
        raise ValueError(f"${var}={raw!r} is not a valid {getattr(cast, '__name__', cast)} ({e})") from None


def find_run_dir(base_dir: str, source: str = "base", run: str | None = None) -> str | None:
    """The TensorBoard log directory of a training run, or None when there is none.

    Args:
        base_dir: $JAXCHAT_BASE_DIR.
        source: base|sft|rl; sft and rl runs are logged as `chatsft_<run>` / `chatrl_<run>`.
        run: the `--run` name given to training; None picks the most recently modified run directory of `source`.
    """
    runs = os.path.join(base_dir, "runs")
    if source not in RUN_PREFIX:
        raise ValueError(f"source must be one of {sorted(RUN_PREFIX)}, got {source!r}")
    prefix = RUN_PREFIX[source]
    if run is not None:
        for name in (prefix + run, run):  # sft run "d20" is logged as chatsft_d20; "chatsft_d20" works too
            path = os.path.join(runs, name)
            if os.path.isdir(path):
                return path
        return None
    if not os.path.isdir(runs):
        return None
    others = tuple(p for p in set(RUN_PREFIX.values()) if p and p != prefix)
    cands = [os.path.join(runs, d) for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d))
             and d.startswith(prefix) and not d.startswith(others)]
    return max(cands, key=os.path.getmtime) if cands else None


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar series in a TensorBoard log directory.

    Returns:
        {tag: (steps int64 (N,), values float64 (N,))}, sorted by step. When a resumed run logged a step twice, the
        later write wins.
    Raises:
        FileNotFoundError: `logdir` does not exist.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise FileNotFoundError(f"no TensorBoard run directory {logdir}")
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})  # 0 = keep every point, not a reservoir sample
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for ev in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            by_step[ev.step] = ev.value
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def pick_tags(tags: Sequence[str], max_plots: int = 6) -> list[str]:
    """Tags to plot: PREFERRED_TAGS that exist, in that order, then the rest alphabetically, at most `max_plots`."""
    first = [t for t in PREFERRED_TAGS if t in tags]
    return (first + sorted(t for t in tags if t not in first))[:max_plots]


def plot_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], tags: Sequence[str] | None = None,
                title: str = ""):
    """A matplotlib figure with one panel per tag (step on x). Returns the figure."""
    import matplotlib.pyplot as plt

    tags = list(tags) if tags is not None else pick_tags(list(scalars))
    if not tags:
        raise ValueError("plot_curves: no scalar tags to plot")
    ncols = min(3, len(tags))
    nrows = -(-len(tags) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        steps, values = scalars[tag]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_scores(scores: dict[str, float], title: str = "scores", xlabel: str = "score"):
    """Horizontal bar chart of {label: value} with a zero line (centered scores can be negative). Returns the figure."""
    import matplotlib.pyplot as plt

    labels = list(scores)
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(labels) + 1.2))
    ax.barh(labels, [scores[k] for k in labels], color="tab:blue")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.invert_yaxis()  # first label on top
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table; floats formatted with `floatfmt`, None shown as '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def make_chat_task(name: str, data_file: str | None = None):
    """The eval split of a chat task (names as `evals.chat_eval.ALL_TASKS`), optionally from a local file.

    Args:
        name: ARC-Easy | ARC-Challenge | MMLU | GSM8K | HumanEval | SpellingBee.
        data_file: None for the usual sources (`$JAXCHAT_BASE_DIR/datasets/...`, else the hub); otherwise a file in
            the hub's schema (.jsonl/.json/.parquet), or for SpellingBee a word list (one word per line).
    Raises:
        ValueError: unknown task. FileNotFoundError: data unavailable (the message says where to put it).
    """
    from evals.chat_eval import make_task

    if data_file is None:
        return make_task(name)
    from evals.tasks.arc import ARC
    from evals.tasks.gsm8k import GSM8K
    from evals.tasks.humaneval import HumanEval
    from evals.tasks.mmlu import MMLU
    from evals.tasks.spellingbee import SpellingBee

    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(subset=name, split="test", data_files=data_file)
    if name == "MMLU":
        return MMLU(subset="all", split="test", data_files=data_file)
    if name == "GSM8K":
        return GSM8K(subset="main", split="test", data_files=data_file)
    if name == "HumanEval":
        return HumanEval(data_files=data_file)
    if name == "SpellingBee":
        return SpellingBee(size=256, split="test", word_list=data_file)
    return make_task(name)  # raises ValueError naming the known tasks
