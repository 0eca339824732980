"""The DCLM CORE metric (Li et al. 2024, "DataComp-LM", arXiv:2406.11794) as nanochat computes it.

nanochat `nanochat/core_eval.py` + the CORE part of `scripts/base_eval.py`, written for JAX:
- The eval bundle (22 in-context-learning tasks as JSONL, `core.yaml`, random baselines in `eval_meta_data.csv`)
  is fetched once into $JAXCHAT_BASE_DIR/eval_bundle (from nanochat's URL, a local zip or a local directory).
- Each example becomes one or more token rows: multiple_choice (one row per choice, shared context), schema (one
  row per context option, shared continuation) and language_modeling (one row, context + continuation). Few-shot
  examples are drawn with random.Random(1234 + index), as nanochat, so the prompts are identical.
- Rows from many examples are scored together: padded to power-of-two lengths (few compiles), batched, sharded
  over the local devices, one jitted forward per batch. MC/schema pick the row with the lowest mean loss over
  its continuation tokens; LM is correct when greedy argmax reproduces every continuation token.
- Per task: accuracy, centered = (acc - 0.01*baseline) / (1 - 0.01*baseline); CORE = mean of the centered.
Examples are split across processes (process p scores examples p, p+P, ...) and the outcomes all-gathered.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import time
import zipfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evals.tasks.common import download_file_with_lock
from jaxchat.common import get_base_dir, pow2_bucket, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# ------------------------------------------------------------------------------------------------ the bundle


def _bundle_root(directory: str) -> str | None:
    """The folder holding core.yaml: `directory` itself or its eval_bundle/ child (how the zip is laid out)."""
    for cand in (directory, os.path.join(directory, "eval_bundle")):
        if os.path.isfile(os.path.join(cand, "core.yaml")):
            return cand
    return None


def _extract_bundle(zip_path: str, target: str) -> None:
    """Unzip into a temporary folder next to `target`, then move the bundle into place in one rename."""
    parent = os.path.dirname(os.path.abspath(target))
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        root = _bundle_root(tmp)
        if root is None:
            raise ValueError(f"{zip_path}: no core.yaml in the archive (expected eval_bundle/core.yaml)")
        os.replace(root, target)


def ensure_eval_bundle(source: str | None = None) -> str:
    """Directory of the CORE eval bundle, fetching it on first use.

    Args:
        source: a bundle directory (used in place), a local .zip, or a URL; default $JAXCHAT_EVAL_BUNDLE, else
            nanochat's EVAL_BUNDLE_URL. Zips and URLs are unpacked to $JAXCHAT_BASE_DIR/eval_bundle once; a file
            lock makes concurrent processes wait for the first one.
    Returns:
        the path of the folder that holds core.yaml, eval_meta_data.csv and eval_data/.
    Raises:
        FileNotFoundError: `source` is a local path that does not exist.
        ValueError: the archive or directory has no core.yaml.
        OSError: the download failed.
    """
    from filelock import FileLock

    source = source or os.environ.get("JAXCHAT_EVAL_BUNDLE")
    if source and os.path.isdir(source):
        root = _bundle_root(source)
        if root is None:
            raise ValueError(f"eval bundle {source}: no core.yaml there (nor in {source}/eval_bundle)")
        return root
    target = os.path.join(get_base_dir(), "eval_bundle")
    if _bundle_root(target) is None:
        with FileLock(target + ".lock"):
            if _bundle_root(target) is None:
                if source and not source.startswith(("http://", "https://", "file://")):
                    if not os.path.isfile(source):
                        raise FileNotFoundError(f"eval bundle {source!r} does not exist")
                    zip_path = source
                else:
                    zip_path = os.path.join(get_base_dir(), "eval_bundle.zip")
                    print0(f"Downloading the CORE eval bundle from {source or EVAL_BUNDLE_URL}")
                    download_file_with_lock(source or EVAL_BUNDLE_URL, zip_path, desc="eval_bundle.zip")
                _extract_bundle(zip_path, target)
                print0(f"Placed the eval bundle at {target}")
    return _bundle_root(target)


def load_core_config(bundle_dir: str) -> tuple[list[dict], dict[str, float]]:
    """Tasks of core.yaml and the random baselines (percent) of eval_meta_data.csv.

    Returns:
        (tasks, baselines): tasks are dicts {label, task_type, dataset_uri, num_fewshot, continuation_delimiter};
        baselines map label -> random-guess accuracy in percent.
    Raises:
        ValueError: a task lacks a field, has an unknown type, or has no baseline.
    """
    import yaml

    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    for i, t in enumerate(cfg.get("icl_tasks") or []):
        missing = [k for k in ("label", "icl_task_type", "dataset_uri", "num_fewshot") if k not in t]
        if missing:
            raise ValueError(f"core.yaml icl_tasks[{i}]: missing {missing}")
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"core.yaml task {t['label']!r}: icl_task_type {t['icl_task_type']!r} not in {TASK_TYPES}")
        if t["label"] not in baselines:
            raise ValueError(f"eval_meta_data.csv: no random baseline for task {t['label']!r}")
        shots = t["num_fewshot"]
        tasks.append({
            "label": t["label"],
            "task_type": t["icl_task_type"],
            "dataset_uri": t["dataset_uri"],
            "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
            "continuation_delimiter": t.get("continuation_delimiter", " "),
        })
    return tasks, baselines


def load_task_data(bundle_dir: str, dataset_uri: str) -> list[dict]:
    """The items of one task (eval_data/<dataset_uri>, JSONL)."""
    with open(os.path.join(bundle_dir, "eval_data", dataset_uri), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def centered_accuracy(accuracy: float, baseline_percent: float) -> float:
    """(acc - b) / (1 - b) with b = baseline_percent / 100: 0 at random guessing, 1 at perfect."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)

# ------------------------------------------------------------------------------------------- prompt rendering
# The DCLM/nanochat formats: each few-shot example is "<context><delimiter><answer>" followed by a blank line,
# then the item itself.


def render_prompts_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: few-shot "query<delim>gold choice\\n\\n" blocks, then "query<delim>choice".

    item: {"query": str, "choices": [str], "gold": int}.
    """
    head = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option, all ending in the same continuation (Winograd-style).

    item: {"context_options": [str], "continuation": str, "gold": int}.
    """
    head = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{head}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[prompt without continuation, prompt with it]; contexts are whitespace-stripped.

    The prompt without the continuation is stripped again at the end: a trailing space would merge into the
    continuation's first token and the shorter prompt would no longer be a token prefix of the longer one.
    item: {"context": str, "continuation": str}.
    """
    head = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    base = f"{head}{item['context'].strip()}{delimiter}"
    return [base.strip(), base + item["continuation"]]


def find_common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        pos = i if direction == "left" else -1 - i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return n


def sample_fewshot(data: Sequence[dict], index: int, k: int) -> list[dict]:
    """k examples other than data[index], drawn with random.Random(1234 + index) as nanochat does."""
    if k <= 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    return [data[i] for i in random.Random(1234 + index).sample(others, k)]


def example_rows(item: dict, task_meta: dict, fewshot: Sequence[dict], tokenizer) -> tuple[list, list, list]:
    """Token rows of one example and each row's scored span [start, end) (positions of the answer tokens).

    Every row starts with BOS. MC: the span starts where the choices' tokens diverge; schema: it is the common
    suffix; LM: the tokens the continuation adds.

    Raises:
        ValueError: unknown task type, or (LM) the prompt without continuation is not a token prefix.
    """
    kind, delim = task_meta["task_type"], task_meta["continuation_delimiter"]
    bos = tokenizer.get_bos_token_id()
    if kind == "multiple_choice":
        rows = tokenizer.encode(render_prompts_mc(item, delim, fewshot), prepend=bos)
        start = find_common_length(rows, "left")
        return rows, [start] * len(rows), [len(r) for r in rows]
    if kind == "schema":
        rows = tokenizer.encode(render_prompts_schema(item, delim, fewshot), prepend=bos)
        suffix = find_common_length(rows, "right")
        return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]
    if kind == "language_modeling":
        without, with_ = tokenizer.encode(render_prompts_lm(item, delim, fewshot), prepend=bos)
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            raise ValueError(f"CORE LM item: the prompt without continuation is not a token prefix of the full "
                             f"prompt (context={item.get('context', '')[-40:]!r})")
        return [with_], [len(without)], [len(with_)]
    raise ValueError(f"unknown CORE task type {kind!r}; expected one of {TASK_TYPES}")

# -------------------------------------------------------------------------------------------------- scoring


class CoreScorer:
    """Scores token rows in padded, device-sharded, jitted batches.

    Give either `forward_fn(idx) -> logits` (a pure jnp function: int32 (B, T) -> float (B, T, V); used by tests
    with scripted models) or `params` + `config` (runs `jaxchat.model.forward`).

    Rows longer than the model's sequence_len are scored whole, as nanochat scores them: its `core_eval.py` crops
    only models with a `max_seq_len` attribute, which nanochat's GPT lacks, and its rotary table covers
    10 x sequence_len positions. jaxchat's forward computes the rotary angles for the actual positions, and the
    "long" layers attend over a window of sequence_len keys, as nanochat's window (sequence_len, 0) does.

    Args:
        max_seq_len: rows longer than this keep their last max_seq_len tokens (span shifted, as nanochat does for
            models with a length limit); default for params + config: `jaxchat.model.ROTARY_LEN_FACTOR` (10) x
            config.sequence_len, the longest input nanochat's model accepts; unlimited with forward_fn.
        tokens_per_device: padded tokens per device per forward; sets the batch (e.g. 16384 tokens = 64 rows of
            256 = 8 rows of 2048). The (tokens, vocab) float32 logits of one batch must fit in memory.
        min_len: shortest padded length (lengths are padded up to powers of two, at least this).
        pad_id: token for padding (positions past a row's end never affect its score under a causal model).
    """

    def __init__(self, forward_fn: Callable | None = None, params=None, config=None, *, max_seq_len: int | None = None,
                 tokens_per_device: int = 16384, min_len: int = 64, pad_id: int = 0):
        if (forward_fn is None) == (params is None or config is None):
            raise ValueError("CoreScorer: pass either forward_fn or both params and config")
        if forward_fn is None:
            from jaxchat import model as gpt

            max_seq_len = max_seq_len or gpt.ROTARY_LEN_FACTOR * config.sequence_len

            def logits_fn(p, idx):
                return gpt.forward(p, config, idx, max_len=max_seq_len)
        else:
            def logits_fn(p, idx):
                return forward_fn(idx)
        self.max_seq_len = max_seq_len
        self.tokens_per_device, self.min_len, self.pad_id = tokens_per_device, min_len, pad_id
        self.devices = jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.row_sharding = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = None if params is None else jax.device_put(_local_copy(params), replicated)

        def score(p, idx, start, end):
            logits = logits_fn(p, idx).astype(jnp.float32)                     # (B, T, V)
            targets = jnp.roll(idx, -1, axis=1)                                # position t predicts token t+1
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            pos = jnp.arange(idx.shape[1])[None, :]
            span = (pos >= start[:, None] - 1) & (pos < end[:, None] - 1)      # predictions of the answer tokens
            mean_loss = jnp.sum(jnp.where(span, nll, 0.0), axis=1) / jnp.maximum(span.sum(axis=1), 1)
            hit = jnp.all(jnp.where(span, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
            return mean_loss, hit

        self._score = jax.jit(score)

    def _bucket(self, n: int) -> int:
        return pow2_bucket(n, self.min_len, self.max_seq_len or None)

    def score_rows(self, rows: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int]):
        """Mean continuation loss (nats) and greedy exact-match flag of each row.

        Returns:
            (mean_loss float64 (R,), hit bool (R,)) in the order of `rows`.
        Raises:
            ValueError: a span is empty or starts at position 0 (there must be a token before the answer).
        """
        rows, starts, ends = list(rows), list(starts), list(ends)
        if self.max_seq_len:
            for i, r in enumerate(rows):
                cut = len(r) - self.max_seq_len
                if cut > 0:
                    rows[i], starts[i], ends[i] = r[cut:], starts[i] - cut, ends[i] - cut
        for i, (s, e) in enumerate(zip(starts, ends)):
            if not 1 <= s < e <= len(rows[i]):
                raise ValueError(f"CORE row {i}: bad answer span [{s}, {e}) for a row of {len(rows[i])} tokens")
        n_dev = len(self.devices)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pending = []  # (row ids, device outputs); fetched once at the end so batches run back to back
        i = 0
        while i < len(order):
            T = self._bucket(len(rows[order[i]]))
            per_dev = max(1, self.tokens_per_device // T)
            batch = [j for j in order[i:i + per_dev * n_dev] if len(rows[j]) <= T]
            i += len(batch)
            B = -(-len(batch) // n_dev) * n_dev
            idx = np.full((B, T), self.pad_id, dtype=np.int32)
            st, en = np.ones(B, np.int32), np.full(B, 2, np.int32)  # dummy rows: a valid 1-token span
            for b, j in enumerate(batch):
                idx[b, :len(rows[j])] = rows[j]
                st[b], en[b] = starts[j], ends[j]
            args = [jax.device_put(a, self.row_sharding) for a in (idx, st, en)]
            pending.append((batch, self._score(self.params, *args)))
        mean_loss = np.zeros(len(rows), np.float64)
        hit = np.zeros(len(rows), bool)
        for batch, (loss_b, hit_b) in jax.device_get(pending):
            mean_loss[batch] = np.asarray(loss_b)[:len(batch)]
            hit[batch] = np.asarray(hit_b)[:len(batch)]
        return mean_loss, hit


def _local_copy(tree):
    """Params as arrays this process can address (a replicated multi-host array -> its local shard)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return x
    return jax.tree.map(one, tree)


def _allgather_sum(local: np.ndarray) -> np.ndarray:
    """Sum an array over processes (each contributes its own examples; the rest are zero)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


def evaluate_task(scorer: CoreScorer, tokenizer, data: Sequence[dict], task_meta: dict) -> float:
    """Accuracy of one CORE task (nanochat `evaluate_task`).

    Args:
        data: the task's items (already shuffled/truncated by the caller).
        task_meta: {task_type, num_fewshot, continuation_delimiter}.
    Returns:
        fraction of items answered correctly, identical on every process.
    """
    rank, world = jax.process_index(), jax.process_count()
    rows, starts, ends, owner = [], [], [], []
    mine = list(range(rank, len(data), world))
    for idx in mine:
        fewshot = sample_fewshot(data, idx, task_meta["num_fewshot"])
        r, s, e = example_rows(data[idx], task_meta, fewshot, tokenizer)
        rows += r
        starts += s
        ends += e
        owner += [idx] * len(r)
    correct = np.zeros(len(data), np.float32)
    if rows:
        mean_loss, hit = scorer.score_rows(rows, starts, ends)
        owner = np.asarray(owner)
        for idx in mine:
            sel = np.flatnonzero(owner == idx)
            if task_meta["task_type"] == "language_modeling":
                correct[idx] = float(hit[sel[0]])
            else:  # lowest mean loss wins; ties go to the first option, like list.index(min(...))
                correct[idx] = float(int(np.argmin(mean_loss[sel])) == data[idx]["gold"])
    correct = _allgather_sum(correct)
    return float(correct.mean()) if len(data) else 0.0


def evaluate_core(scorer: CoreScorer, tokenizer, bundle_dir: str | None = None, max_per_task: int = -1,
                  tasks: Sequence[str] | None = None) -> dict:
    """The CORE metric over the bundle's tasks (nanochat `evaluate_core`).

    Args:
        bundle_dir: default `ensure_eval_bundle()`.
        max_per_task: keep the first N items after a fixed shuffle (random.Random(1337)); -1 for all.
        tasks: only these labels (default all in core.yaml).
    Returns:
        {"results": {label: accuracy}, "centered_results": {label: centered}, "core_metric": mean centered}.
    """
    bundle_dir = bundle_dir or ensure_eval_bundle()
    task_list, baselines = load_core_config(bundle_dir)
    if tasks is not None:
        unknown = set(tasks) - {t["label"] for t in task_list}
        if unknown:
            raise ValueError(f"unknown CORE tasks {sorted(unknown)}")
        task_list = [t for t in task_list if t["label"] in tasks]
    results, centered = {}, {}
    for meta in task_list:
        t0 = time.time()
        data = load_task_data(bundle_dir, meta["dataset_uri"])
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        acc = evaluate_task(scorer, tokenizer, data, meta)
        results[meta["label"]] = acc
        centered[meta["label"]] = centered_accuracy(acc, baselines[meta["label"]])
        print0(f"{meta['label']:<35} ({meta['num_fewshot']}-shot, {meta['task_type']}): accuracy {acc:.4f} | "
               f"centered {centered[meta['label']]:.4f} | {time.time() - t0:.1f}s")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core}
