"""MMLU (Hendrycks et al.), hub dataset cais/mmlu (nanochat `tasks/mmlu.py`)."""

from __future__ import annotations

from evals.tasks.common import Task, load_task_dataset, render_mc


class MMLU(Task):
    """57-subject multiple choice with four options; categorical eval.

    Rows: {"question": str, "choices": [4 str], "answer": int 0..3, "subject": str}; the auxiliary_train subset
    wraps each row in {"train": row} on the hub, which is unwrapped here. Shuffled with seed 42 like nanochat.
    Local copies: `data_files=` or $JAXCHAT_BASE_DIR/datasets/mmlu/<subset>/<split>.jsonl.

    Raises:
        ValueError: unknown subset/split, auxiliary_train with a split other than train, a row without 4 choices.
        FileNotFoundError: data unavailable.
    """

    letters = ("A", "B", "C", "D")

    def __init__(self, subset: str, split: str, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all|auxiliary_train, got {subset!r}")
        if split not in ("train", "validation", "dev", "test"):
            raise ValueError(f"MMLU split must be train|validation|dev|test, got {split!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train only has the train split")
        self.subset, self.split = subset, split
        ds = load_task_dataset("cais/mmlu", subset, split, "mmlu", data_files).shuffle(seed=42)
        if "train" in ds.column_names and "question" not in ds.column_names:
            ds = ds.map(lambda row: row["train"], remove_columns=["train"])
        self.ds = ds

    eval_type = "categorical"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        choices = row["choices"]
        if len(choices) != 4:
            raise ValueError(f"MMLU row {index}: expected 4 choices, got {len(choices)}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
                {"role": "assistant", "content": self.letters[row["answer"]]},
            ],
            "subject": row.get("subject", ""),
            "letters": self.letters,
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> bool:
        """True when the predicted letter is the answer. Raises ValueError for a letter not offered."""
        if assistant_response not in self.letters:
            raise ValueError(f"MMLU: answer {assistant_response!r} is not one of {self.letters}")
        return assistant_response == conversation["messages"][-1]["content"]
