"""Task base classes and data helpers shared by the chat tasks (nanochat `tasks/common.py`).

A Task is a read-only list of conversations ({"messages": [...], plus task-specific fields}) with an optional
lightweight view (start/stop/step), an `eval_type` ('categorical': score the answer letters' logits;
'generative': sample and check), and `evaluate(conversation, completion)` / `reward(...)`.

Data comes from the Hugging Face hub through `datasets.load_dataset` (the same hub names as nanochat), or, for
offline machines, from local files in the same schema: a `data_files=` argument, or files under
`$JAXCHAT_BASE_DIR/datasets/<name>/[<config>/]<split>.{jsonl,json,parquet}` (see `load_task_dataset`).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import tempfile
import urllib.request
from typing import Sequence

from jaxchat.common import get_base_dir


class Task:
    """A dataset of conversations with a logical view [start:stop:step] over it (nanochat `Task`).

    Subclasses implement `num_examples()` (physical size), `get_example(i)` (physical index -> conversation),
    `eval_type`, and for eval tasks `evaluate(conversation, completion)`.

    Raises:
        ValueError: start < 0, stop < start, or step < 1.
    """

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0:
            raise ValueError(f"{type(self).__name__}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"{type(self).__name__}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"{type(self).__name__}: step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    eval_type: str = ""  # 'categorical' or 'generative', set by each task class

    def num_examples(self) -> int:
        """Examples in the underlying dataset; tasks built on a `datasets.Dataset` in `self.ds` need not override."""
        if hasattr(self, "ds"):
            return len(self.ds)
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        """The index-th conversation of the view. Raises TypeError for non-int, IndexError out of range."""
        if not isinstance(index, int):
            raise TypeError(f"{type(self).__name__} index must be an int, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {n} examples")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: dict, completion: str):
        raise NotImplementedError

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward: 1.0 when `evaluate` says correct, else 0.0 (nanochat uses the eval as the reward)."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """Several tasks interleaved by a fixed shuffle (random.Random(42)), as nanochat's SFT mixture.

    A task passed twice is seen twice as often.
    """

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]
        self.index_map = [(ti, li) for ti, n in enumerate(self.lengths) for li in range(n)]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        if not 0 <= index < len(self.index_map):
            raise IndexError(f"TaskMixture index {index} out of range for {len(self.index_map)} conversations")
        ti, li = self.index_map[index]
        return self.tasks[ti][li]


class TaskSequence(Task):
    """Several tasks one after the other (a curriculum), as nanochat's TaskSequence."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        if not 0 <= index < self.num_examples():
            raise IndexError(f"TaskSequence index {index} out of range for {self.num_examples()} conversations")
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise AssertionError("unreachable")


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice user prompt of nanochat's chat tasks.

    Each choice is followed by "=<letter>" with no space: the assistant answers with the bare letter, and " A" and
    "A" are different tokens, so the prompt must show the exact token the answer uses.
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


# --------------------------------------------------------------------------------------------- data loading

_LOCAL_EXTS = ("jsonl", "json", "parquet", "jsonl.gz")


def local_dataset_dir(name: str) -> str:
    """Where local copies of hub dataset `name` are looked for: $JAXCHAT_BASE_DIR/datasets/<name>."""
    return os.path.join(get_base_dir(), "datasets", name)


def _read_local(files: Sequence[str]):
    """Local JSONL/JSON/parquet files -> an in-memory `datasets.Dataset` (nothing written to any cache)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, rows = [], []
    for path in files:
        if path.endswith(".parquet"):
            tables.append(pq.read_table(path))
            continue
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            rows.extend(json.loads(text))
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
    if rows:
        tables.append(pa.Table.from_pylist(rows))
    if not tables:
        raise ValueError(f"no rows in {list(files)}")
    return datasets.Dataset(pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0])


def _find_local(name: str, config: str | None, split: str) -> list[str]:
    root = local_dataset_dir(name)
    stems = ([os.path.join(root, config, split)] if config else []) + [os.path.join(root, split)]
    for stem in stems:
        for ext in _LOCAL_EXTS:
            hits = sorted(glob.glob(f"{stem}.{ext}")) + sorted(glob.glob(f"{stem}-*.{ext}"))
            if hits:
                return hits
    return []


def load_task_dataset(hub_name: str, config: str | None, split: str, local_name: str,
                      data_files: str | Sequence[str] | None = None, hint: str = ""):
    """Load one split of a task's data, preferring local files (offline) over the hub.

    Order: `data_files` (a path or list of paths, .jsonl/.json/.parquet/.jsonl.gz), then
    `$JAXCHAT_BASE_DIR/datasets/<local_name>/<config>/<split>.*` or `.../<local_name>/<split>.*` (also sharded as
    `<split>-*.parquet`), then `datasets.load_dataset(hub_name, config, split=split)`.

    Returns:
        a `datasets.Dataset` (not shuffled).
    Raises:
        FileNotFoundError: a `data_files` path does not exist, or nothing local and the hub load failed; the
            message names the dataset and where to put a local copy.
    """
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{hub_name}: data_files not found: {missing}")
        return _read_local(files)
    local = _find_local(local_name, config, split)
    if local:
        return _read_local(local)
    try:
        import datasets
        return datasets.load_dataset(hub_name, config, split=split) if config else \
            datasets.load_dataset(hub_name, split=split)
    except Exception as e:  # network, auth, missing config: all end the same way for the user
        where = os.path.join(local_dataset_dir(local_name), *( [config] if config else []), f"{split}.jsonl")
        raise FileNotFoundError(
            f"Dataset {hub_name!r} (config={config!r}, split={split!r}) is not available: loading it from the "
            f"Hugging Face hub failed ({type(e).__name__}: {e}). Either run where huggingface.co is reachable "
            f"(it is cached after the first download), or put the split in the hub's schema at {where} "
            f"(.jsonl, .json or .parquet), or pass data_files=. {hint}".strip()) from e


def download_file_with_lock(url: str, path: str, desc: str | None = None) -> str:
    """Download `url` to `path` once, even with many processes racing (nanochat `download_file_with_lock`).

    A `filelock` lock next to the target serialises the processes; the winner streams into a temporary file with
    a tqdm bar and renames it into place, so a crash never leaves a half-written file behind. Returns `path`.

    Raises:
        urllib.error.URLError / OSError: the download failed (the message names the URL).
    """
    from filelock import FileLock
    from tqdm import tqdm

    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        if os.path.exists(path):  # another process finished it while we waited
            return path
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=desc or os.path.basename(path)) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, Exception):
                raise OSError(f"downloading {url} to {path} failed: {e}") from e
            raise
    return path
