"""GSM8K grade-school math, hub dataset openai/gsm8k (nanochat `tasks/gsm8k.py`).

Reference solutions mark calculator steps as <<expr=result>>; they become a python part (the expression, which
the model learns to emit as a tool call) and a python_output part (the result the tool writes back).
"""

from __future__ import annotations

import re

from evals.tasks.common import Task, load_task_dataset

# The final answer follows "#### " (the official grade-school-math format); commas are dropped before comparing.
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALC_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(completion: str) -> str | None:
    """The number after the first '#### ' with commas removed ('1,234' -> '1234'), or None."""
    match = ANSWER_RE.search(completion)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def solution_to_parts(answer: str) -> list[dict]:
    """A GSM8K reference solution -> assistant content parts.

    "Earns 12/60 = $<<12/60=0.2>>0.2 ...\\n#### 10" -> [text "Earns 12/60 = $", python "12/60",
    python_output "0.2", text "0.2 ...\\n#### 10"]. The split is on the LAST '=' inside << >>; a call without
    '=' gets an empty output. Text pieces are kept even when empty, so the last part always holds '#### N'.
    """
    parts = []
    for piece in _CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    """Math word problems; generative eval comparing the '#### N' answers.

    Rows: {"question": str, "answer": str}. Shuffled with seed 42 like nanochat.
    Local copies: `data_files=` or $JAXCHAT_BASE_DIR/datasets/gsm8k/<subset>/<split>.jsonl.

    Raises:
        ValueError: unknown subset/split. FileNotFoundError: data unavailable.
    """

    def __init__(self, subset: str, split: str, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main|socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train|test, got {split!r}")
        self.ds = load_task_dataset("openai/gsm8k", subset, split, "gsm8k", data_files).shuffle(seed=42)

    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_to_parts(row["answer"])},
        ]}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        """1 if the completion's '#### N' equals the reference's (string compare after dropping commas), else 0.

        Raises:
            TypeError: the completion is not a str. ValueError: the conversation does not end in an assistant
                message with a list of parts.
        """
        if not isinstance(assistant_response, str):
            raise TypeError(f"GSM8K.evaluate expects a str completion, got {type(assistant_response).__name__}")
        last = conversation["messages"][-1]
        if last["role"] != "assistant" or not isinstance(last["content"], list):
            raise ValueError("GSM8K.evaluate: the conversation must end with an assistant message of parts")
        ref = extract_answer(last["content"][-1]["text"])
        return int(extract_answer(assistant_response) == ref)
