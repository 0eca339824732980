"""tests/lm_eval_tasks: the two offline lm-evaluation-harness tasks load with lm-eval 0.4.13 (`.[dev]`) and build the
requests the server will get: loglikelihood pairs (context, " choice") and generate_until with a newline stop."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dev dependency: pip install -e '.[dev]'")
    from lm_eval.tasks import TaskManager

    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # data_files are relative to the repository root, where lm_eval runs
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        manager = TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks"), include_defaults=False)
        yield manager.load(["jaxchat_tiny_mc", "jaxchat_tiny_gen"])["tasks"]
    finally:
        mp.undo()


def _task(tasks, name):
    return next(task for key, task in tasks.items() if name in str(key))  # keys are names or task objects


def test_multiple_choice_task_builds_loglikelihood_requests(tasks):
    task = _task(tasks, "jaxchat_tiny_mc")
    docs = list(task.test_docs())
    assert len(docs) == 6 and task.OUTPUT_TYPE == "multiple_choice"
    for doc in docs:
        assert 0 <= task.doc_to_target(doc) < len(task.doc_to_choice(doc)) == 4
    task.build_all_requests(limit=1, rank=0, world_size=1)
    requests = task.instances
    assert [r.request_type for r in requests] == ["loglikelihood"] * 4
    context, continuation = requests[0].args
    assert context == "Question: What is the capital of France?\nAnswer:" and continuation == " Paris"


def test_generate_until_task_stops_at_a_newline(tasks):
    task = _task(tasks, "jaxchat_tiny_gen")
    docs = list(task.test_docs())
    assert len(docs) == 6 and task.OUTPUT_TYPE == "generate_until"
    task.build_all_requests(limit=2, rank=0, world_size=1)
    context, gen_kwargs = task.instances[0].args
    assert context == "Q: What is 2 + 3?\nA:" and gen_kwargs["until"] == ["\n"] and gen_kwargs["max_gen_toks"] == 16
    # an exact match of the (filtered) reply, case and punctuation ignored
    assert task.process_results(docs[0], ["5"]) == {"exact_match": 1.0}
    assert task.process_results(docs[0], ["6"]) == {"exact_match": 0.0}
    assert task.process_results(docs[3], ["Cold."]) == {"exact_match": 1.0}
