"""SpellingBee (count a letter in a word) and SimpleSpelling (spell a word) (nanochat `tasks/spellingbee.py`).

Small models struggle to map a token to its letters; these synthetic tasks teach spelling, and SpellingBee's
reference answers count letter by letter and then check with a python tool call. Examples are generated from a
word list with a per-index seed, so any index is reproducible without storing data.

Word list, first found: the `word_list` argument, $JAXCHAT_WORD_LIST, $JAXCHAT_BASE_DIR/words_alpha.txt (where
nanochat's download lands), Debian's /usr/share/dict/words (package wamerican; lowercased, letters only), else
nanochat's words_alpha.txt downloaded once from WORD_LIST_URL. A different list gives different examples.
"""

from __future__ import annotations

import os
import random
import re

from evals.tasks.common import Task, download_file_with_lock
from jaxchat.common import get_base_dir

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
SYSTEM_WORD_LIST = "/usr/share/dict/words"
# Larger than the word list, so train seeds (index) and test seeds (offset + index) never collide.
TEST_RANDOM_SEED_OFFSET = 10_000_000

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(completion: str) -> str | None:
    """The number after '#### ' with commas removed, or None (same rule as GSM8K)."""
    match = ANSWER_RE.search(completion)
    return match.group(1).strip().replace(",", "") if match else None


# Phrasings of the question (several languages) for augmentation; nanochat's list, in its order, so that the same
# seed picks the same phrasing.
USER_MSG_TEMPLATES = (
    'How many {letter} are in the word {word}',
    'How many {letter} are in {word}',
    'Count the number of {letter} in {word}',
    'How many times does {letter} appear in {word}',
    "What's the count of {letter} in {word}",
    'In the word {word}, how many {letter} are there',
    'How many letter {letter} are in the word {word}',
    'Count how many {letter} appear in {word}',
    'Tell me the number of {letter} in {word}',
    'How many occurrences of {letter} are in {word}',
    'Find the count of {letter} in {word}',
    'Can you count the {letter} letters in {word}',
    'What is the frequency of {letter} in {word}',
    'How many {letter}s are in {word}',
    "How many {letter}'s are in {word}",
    'Count all the {letter} in {word}',
    'How many times is {letter} in {word}',
    'Number of {letter} in {word}',
    'Total count of {letter} in {word}',
    'How many {letter} does {word} have',
    'How many {letter} does {word} contain',
    "What's the number of {letter} in {word}",
    '{word} has how many {letter}',
    'In {word}, count the {letter}',
    'How many {letter} appear in {word}',
    'Count the {letter} in {word}',
    'Give me the count of {letter} in {word}',
    'How many instances of {letter} in {word}',
    'Show me how many {letter} are in {word}',
    'Calculate the number of {letter} in {word}',
    '¿Cuántas {letter} hay en {word}?',
    '¿Cuántas veces aparece {letter} en {word}?',
    'Cuenta las {letter} en {word}',
    '¿Cuántas letras {letter} tiene {word}?',
    '{word}中有多少个{letter}',
    '{word}里有几个{letter}',
    '数一下{word}中的{letter}',
    '{word}这个词里有多少{letter}',
    '{word}에 {letter}가 몇 개 있나요',
    '{word}에서 {letter}의 개수는',
    '{word}에 {letter}가 몇 번 나오나요',
    '{word}라는 단어에 {letter}가 몇 개',
    'Combien de {letter} dans {word}',
    'Combien de fois {letter} apparaît dans {word}',
    'Compte les {letter} dans {word}',
    'Wie viele {letter} sind in {word}',
    'Wie oft kommt {letter} in {word} vor',
    'Zähle die {letter} in {word}',
    '{word}に{letter}は何個ありますか',
    '{word}の中に{letter}がいくつ',
    '{word}に{letter}が何回出てくる',
)


def load_words(word_list: str | None = None) -> list[str]:
    """The word list (see module docstring), one word per line, blank lines dropped.

    Raises:
        FileNotFoundError: `word_list` or $JAXCHAT_WORD_LIST names a missing file.
        OSError: nothing local and the download failed.
    """
    explicit = word_list or os.environ.get("JAXCHAT_WORD_LIST")
    if explicit:
        if not os.path.exists(explicit):
            raise FileNotFoundError(f"SpellingBee word list {explicit!r} does not exist")
        path, system = explicit, False
    else:
        path = os.path.join(get_base_dir(), "words_alpha.txt")
        system = not os.path.exists(path) and os.path.exists(SYSTEM_WORD_LIST)
        if system:
            path = SYSTEM_WORD_LIST
        elif not os.path.exists(path):
            download_file_with_lock(WORD_LIST_URL, path, desc="words_alpha.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        words = [line.strip() for line in f if line.strip()]
    if system:  # dict/words has names and possessives ("Aaron's"); keep plain lowercase words, once each
        words = list(dict.fromkeys(w.lower() for w in words if w.isascii() and w.isalpha()))
    if not words:
        raise ValueError(f"SpellingBee word list {path} is empty")
    return words


def _seed(index: int, split: str) -> int:
    return index if split == "train" else TEST_RANDOM_SEED_OFFSET + index


class SpellingBee(Task):
    """'How many r are in strawberry?' with a worked answer ending in '#### N'; generative eval.

    Raises:
        ValueError: split not train|test.
    """

    def __init__(self, size: int = 1000, split: str = "train", word_list: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be train|test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words(word_list)

    eval_type = "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        # The order of rng calls is part of the format: it fixes which example each seed produces.
        rng = random.Random(_seed(index, self.split))
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: maybe absent
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        quotes = ["", "'", '"']
        lq, wq = rng.choice(quotes), rng.choice(quotes)
        user_msg = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            user_msg += "?"

        # Worked answer: spell, count with a running tally, then confirm with the python tool. "3:r" has no space
        # on purpose: " r" and "r" are different tokens.
        lines = [f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
                 f"first.", "", "First spell the word out:", f"{word}:{','.join(word)}", "",
                 f"Then count the occurrences of '{letter}':"]
        running = 0
        for i, ch in enumerate(word, 1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} hit! count={running}")
            else:
                lines.append(f"{i}:{ch}")
        manual = "\n".join(lines) + f"\n\nThis gives us {running}."
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": user_msg}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        """1 if the completion's '#### N' equals the reference count, else 0. Raises TypeError for non-str."""
        if not isinstance(assistant_response, str):
            raise TypeError(f"SpellingBee.evaluate expects a str completion, got {type(assistant_response).__name__}")
        ref = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(extract_answer(assistant_response) == ref)


class SimpleSpelling(Task):
    """'Spell the word: apple' -> 'apple:a,p,p,l,e'; SFT only (words in a different order than SpellingBee)."""

    def __init__(self, size: int = 1000, split: str = "train", word_list: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SimpleSpelling split must be train|test, got {split!r}")
        self.size, self.split = size, split
        words = load_words(word_list)
        random.Random(42).shuffle(words)
        self.words = words

    eval_type = "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        word = random.Random(_seed(index, self.split)).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}
