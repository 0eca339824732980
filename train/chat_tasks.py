"""SFT's task mixtures (nanochat scripts/chat_sft.py) and the ChatCORE metric over `evals.chat_eval`, for
`train.sft`: which tasks, how many epochs of each, where to get their data when it is missing. It sits in train/,
beside its one user, because it builds on evals/ (the tasks, chat_eval): the library (jaxchat/) imports no evals/."""

from __future__ import annotations

import os

from jaxchat.common import UserError, get_base_dir, print0
from jaxchat.multihost import local_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IDENTITY_FILE = os.path.join(REPO_ROOT, "configs", "identity_conversations.jsonl")
TASK_NAMES = ("smoltalk", "identity", "mmlu", "gsm8k", "simplespelling", "spellingbee")
HOW_TO_GET = {
    "smoltalk": "hub dataset HuggingFaceTB/smol-smoltalk (or a local copy at $JAXCHAT_BASE_DIR/datasets/smol-smoltalk/<split>.jsonl)",
    "mmlu": "hub dataset cais/mmlu (or a local copy at $JAXCHAT_BASE_DIR/datasets/mmlu/<subset>/<split>.jsonl)",
    "gsm8k": "hub dataset openai/gsm8k (or a local copy at $JAXCHAT_BASE_DIR/datasets/gsm8k/main/<split>.jsonl)",
    "identity": "a CustomJSON file: --identity-file (default configs/identity_conversations.jsonl)",
    "simplespelling": "a word list: $JAXCHAT_WORD_LIST, or `apt-get install wamerican` for /usr/share/dict/words",
    "spellingbee": "a word list: $JAXCHAT_WORD_LIST, or `apt-get install wamerican` for /usr/share/dict/words",
}


def identity_file(args) -> str:
    if args.identity_file:
        return args.identity_file
    user_copy = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    return user_copy if os.path.exists(user_copy) else DEFAULT_IDENTITY_FILE


def _build(name: str, factory):
    """Run a task factory; on missing data exit with what is missing and how to get it."""
    try:
        return factory()
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"SFT task '{name}' could not be loaded: {e}; get it from: {HOW_TO_GET[name]}, or leave it "
                         f"out with --mixture (e.g. --mixture=identity,simplespelling,spellingbee).") from e


def build_train_tasks(args) -> list:
    """nanochat's SFT training mixture, restricted to --mixture (the order of the list is nanochat's)."""
    from evals.tasks.customjson import CustomJSON
    from evals.tasks.gsm8k import GSM8K
    from evals.tasks.mmlu import MMLU
    from evals.tasks.smoltalk import SmolTalk
    from evals.tasks.spellingbee import SimpleSpelling, SpellingBee

    chosen = set(args.mixture_names)
    tasks = []
    if "smoltalk" in chosen:
        tasks.append(_build("smoltalk", lambda: SmolTalk(split="train")))
    if "identity" in chosen:
        path = identity_file(args)
        tasks += [_build("identity", lambda: CustomJSON(filepath=path)) for _ in range(2)]  # 2 epochs
    if "mmlu" in chosen:
        mmlu = _build("mmlu", lambda: MMLU(subset="auxiliary_train", split="train"))
        tasks += [mmlu] * args.mmlu_epochs
    if "gsm8k" in chosen:
        gsm8k = _build("gsm8k", lambda: GSM8K(subset="main", split="train"))
        tasks += [gsm8k] * args.gsm8k_epochs
    if "simplespelling" in chosen:
        tasks.append(_build("simplespelling", lambda: SimpleSpelling(size=args.simple_spelling_size, split="train")))
    if "spellingbee" in chosen:
        tasks.append(_build("spellingbee", lambda: SpellingBee(size=args.spelling_bee_size, split="train")))
    return tasks


def build_val_tasks(args) -> list:
    """nanochat's validation mixture (SmolTalk test, MMLU all test[:5200], GSM8K test[:420]) for the chosen tasks.

    A mixture without any of those three (the offline quickstart) validates on the spelling tasks' test splits
    (5% of their train size), or, failing that, on the identity conversations themselves.
    """
    from evals.tasks.customjson import CustomJSON
    from evals.tasks.gsm8k import GSM8K
    from evals.tasks.mmlu import MMLU
    from evals.tasks.smoltalk import SmolTalk
    from evals.tasks.spellingbee import SimpleSpelling, SpellingBee

    chosen = set(args.mixture_names)
    tasks = []
    if "smoltalk" in chosen:
        tasks.append(_build("smoltalk", lambda: SmolTalk(split="test")))
    if "mmlu" in chosen:
        tasks.append(_build("mmlu", lambda: MMLU(subset="all", split="test", stop=5200)))
    if "gsm8k" in chosen:
        tasks.append(_build("gsm8k", lambda: GSM8K(subset="main", split="test", stop=420)))
    if tasks:
        return tasks
    if "simplespelling" in chosen:
        n = max(1, args.simple_spelling_size // 20)
        tasks.append(_build("simplespelling", lambda: SimpleSpelling(size=n, split="test")))
    if "spellingbee" in chosen:
        n = max(1, args.spelling_bee_size // 20)
        tasks.append(_build("spellingbee", lambda: SpellingBee(size=n, split="test")))
    if not tasks:
        print0("WARNING: no validation split in this mixture; validating on the identity conversations")
        tasks.append(_build("identity", lambda: CustomJSON(filepath=identity_file(args))))
    return tasks



def run_chatcore(params, config, tokenizer, batch_size: int, max_cat: int, max_sample: int) -> dict[str, float]:
    """ChatCORE (nanochat): mean centered accuracy over ARC-E/C, MMLU, GSM8K, HumanEval, SpellingBee.

    Returns {'chatcore/<task>': accuracy, 'chatcore_metric', 'chatcore_cat'}; when tasks were skipped the two
    means cover the evaluated ones only (the log says which were skipped). Uses `evals.chat_eval.run_chat_eval(task_name, params, config, tokenizer, engine, batch_size=..., max_problems=...)`;
    tasks whose data is missing are skipped with a note (the metric then covers the rest). Returns {} when
    evals.chat_eval is not available.
    """
    try:
        from evals.chat_eval import BASELINE_ACCURACIES as baseline, run_chat_eval
    except ImportError as e:
        print0(f"ChatCORE skipped: evals.chat_eval unavailable ({e})")
        return {}
    from jaxchat.engine import Engine

    local = local_params(params)
    engine = Engine(local, config, tokenizer)
    categorical = {"ARC-Easy", "ARC-Challenge", "MMLU"}
    results = {}
    for name in baseline:
        limit = max_cat if name in categorical else max_sample
        try:
            acc = run_chat_eval(name, local, config, tokenizer, engine, batch_size=batch_size,
                                max_problems=None if limit < 0 else limit)
        except (FileNotFoundError, OSError) as e:
            print0(f"  {name}: skipped ({str(e).splitlines()[0][:160]})")
            continue
        results[name] = float(acc)
        print0(f"  {name}: {100 * acc:.2f}%")
    if not results:
        return {}

    def centered(names):
        names = [n for n in names if n in results]
        if not names:
            return None
        return sum((results[n] - baseline[n]) / (1 - baseline[n]) for n in names) / len(names)

    out = {f"chatcore/{k}": v for k, v in results.items()}
    out["chatcore_metric"] = centered(list(baseline))
    out["chatcore_cat"] = centered(categorical)
    return out
