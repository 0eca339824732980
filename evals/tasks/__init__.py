"""Chat-eval and SFT tasks (nanochat `tasks/`): ARC, MMLU, GSM8K, HumanEval, SmolTalk, SpellingBee, CustomJSON."""

from evals.tasks.common import Task, TaskMixture, TaskSequence, render_mc

__all__ = ["Task", "TaskMixture", "TaskSequence", "render_mc"]
