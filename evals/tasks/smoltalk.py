"""SmolTalk general chat data (HuggingFaceTB/smol-smoltalk) for SFT (nanochat `tasks/smoltalk.py`)."""

from __future__ import annotations

from evals.tasks.common import Task, load_task_dataset


class SmolTalk(Task):
    """smol-smoltalk conversations (train ~460K, test ~24K rows), shuffled with seed 42 like nanochat.

    Rows: {"messages": [{"role", "content": str}, ...]} with an optional leading system message, then strictly
    alternating user/assistant (at least two). Local copies: `data_files=` or
    $JAXCHAT_BASE_DIR/datasets/smol-smoltalk/<split>.{jsonl,parquet} (also <split>-*.parquet shards).

    Raises:
        ValueError: unknown split; a malformed row (on access, naming the index). FileNotFoundError: no data.
    """

    def __init__(self, split: str, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train|test, got {split!r}")
        self.ds = load_task_dataset("HuggingFaceTB/smol-smoltalk", None, split, "smol-smoltalk",
                                    data_files).shuffle(seed=42)

    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        messages = self.ds[index]["messages"]
        rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if len(rest) < 2:
            raise ValueError(f"SmolTalk row {index}: needs at least a user and an assistant message")
        for i, m in enumerate(rest):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want or not isinstance(m["content"], str):
                raise ValueError(f"SmolTalk row {index}: message {i} should be a {want} message with str content")
        return {"messages": messages}
