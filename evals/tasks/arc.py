"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge), hub dataset allenai/ai2_arc (nanochat `tasks/arc.py`)."""

from __future__ import annotations

from evals.tasks.common import Task, load_task_dataset, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    """Grade-school science multiple choice; categorical eval over the choice letters.

    Rows (hub schema): {"question": str, "choices": {"text": [str], "label": ["A", ...]}, "answerKey": "A"}.
    Shuffled with seed 42 like nanochat so slices pick the same problems.
    Local copies: `data_files=` or $JAXCHAT_BASE_DIR/datasets/ai2_arc/<subset>/<split>.jsonl.

    Raises:
        ValueError: unknown subset/split. FileNotFoundError: data unavailable (see `load_task_dataset`).
    """

    def __init__(self, subset: str, split: str, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.ds = load_task_dataset("allenai/ai2_arc", subset, split, "ai2_arc", data_files).shuffle(seed=42)

    eval_type = "categorical"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        letters = list(row["choices"]["label"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {index}: answerKey {answer!r} is not one of the labels {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,  # the categorical eval compares logits of exactly these tokens
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> bool:
        """True when the predicted letter is the answer. Raises ValueError for a letter not offered."""
        if assistant_response not in conversation["letters"]:
            raise ValueError(f"ARC: answer {assistant_response!r} is not one of {conversation['letters']}")
        return assistant_response == conversation["messages"][-1]["content"]
