"""Conversations from a local JSONL file, one JSON array of messages per line (nanochat `tasks/customjson.py`).

Used for the identity conversations in SFT: [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}].
"""

from __future__ import annotations

import json
import os

from evals.tasks.common import Task

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


class CustomJSON(Task):
    """Validated user/assistant conversations from `filepath`.

    Raises:
        FileNotFoundError: the file is missing (the message says how to get nanochat's identity file).
        ValueError: a line is not JSON, not a list of >= 2 messages, roles do not alternate user/assistant, or
            content is not a str; the message names file and line.
    """

    def __init__(self, filepath: str, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        if not os.path.exists(filepath):
            raise FileNotFoundError(
                f"CustomJSON: {filepath} does not exist. For nanochat's identity conversations run: "
                f"curl -L -o {filepath} {IDENTITY_URL}")
        self.conversations = []
        with open(filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{filepath}:{lineno}"
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(messages, list) or len(messages) < 2:
                    raise ValueError(f"{where}: expected a JSON list of at least 2 messages")
                for i, m in enumerate(messages):
                    want = "user" if i % 2 == 0 else "assistant"
                    if not isinstance(m, dict) or m.get("role") != want:
                        raise ValueError(f"{where}: message {i} must have role {want!r}")
                    if not isinstance(m.get("content"), str):
                        raise ValueError(f"{where}: message {i} content must be a string")
                self.conversations.append(messages)

    eval_type = "generative"

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}
