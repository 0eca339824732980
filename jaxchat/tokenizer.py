"""GPT-4-style byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

Same design and constants as nanochat's `nanochat/tokenizer.py` (RustBPETokenizer):
- the split regex is GPT-4's (cl100k) except that digits are grouped by at most two (`\\p{N}{1,2}`),
- rustbpe learns the merges (ranks 0..255 are the raw bytes, then one rank per merge),
- a `tiktoken.Encoding` built from those ranks does the encoding, and nine special tokens get the ids right
  after the last rank, so `vocab_size` counts them (32768 = 32759 ranks + 9 specials).

On disk (`$JAXCHAT_BASE_DIR/tokenizer/`):
- `tokenizer.pkl`: a pickled plain dict {name, pat_str, mergeable_ranks: {bytes: int}, special_tokens: {str: int}}.
  It needs neither rustbpe nor any jaxchat class to load. A nanochat `tokenizer.pkl` (a pickled tiktoken
  Encoding, which pickles to the same pieces) loads too. Loading runs no code from the file: a restricted
  unpickler admits only the few globals those two formats contain (`_SafeTokenizerUnpickler`), so a model
  directory someone shared cannot run a payload through its tokenizer.
- `token_bytes.npy`: int32 (vocab_size,), the UTF-8 byte length of every token, 0 for special tokens; the
  denominator of bits-per-byte (nanochat's `token_bytes.pt`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import tiktoken

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the only special token pretraining sees
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output is pasted back (never trained on)
    "<|output_end|>",
]

# GPT-4's pattern with numbers split into groups of 1-2 digits instead of 1-3: at a 32K vocab, nanochat found
# that tokens spent on 3-digit numbers are wasted (nanochat/tokenizer.py).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.npy"
TRAIN_COMMAND = "python -m train.tokenizer"

PART_TYPES = ("text", "python", "python_output")


class Tokenizer:
    """Wrapper around a `tiktoken.Encoding` with nanochat's special tokens and chat rendering.

    Args:
        enc: the encoding (ordinary ranks + special tokens).
        bos_token: name of the document delimiter; "<|bos|>" for our tokenizers, "<|endoftext|>" for OpenAI's.

    Source: nanochat/tokenizer.py (RustBPETokenizer).
    """

    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self._special = dict(enc._special_tokens)  # name -> id
        self.bos_token_id = self.encode_special(bos_token)

    # ------------------------------------------------------------------ construction / persistence

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pat_str: str = SPLIT_PATTERN,
                   name: str = "rustbpe") -> "Tokenizer":
        """Build from learned ranks, appending nanochat's nine special tokens after the last rank."""
        offset = len(mergeable_ranks)
        special_tokens = {tok: offset + i for i, tok in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn BPE merges with rustbpe on an iterable of documents.

        Args:
            text_iterator: documents (str); the split regex never crosses a document boundary.
            vocab_size: total vocabulary INCLUDING the 9 special tokens (nanochat's convention).

        Returns a tokenizer whose vocab is `vocab_size`, or smaller (with a warning) when the text runs out of
        pairs to merge.

        Raises:
            ValueError: vocab_size leaves fewer than 256 ordinary tokens (the byte alphabet).
        """
        import rustbpe  # training only: loading a saved tokenizer never needs it

        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        if n_ranks < 256:
            raise ValueError(f"vocab_size={vocab_size} leaves {n_ranks} ordinary tokens; need at least 256 "
                             f"(the bytes) + {len(SPECIAL_TOKENS)} specials = {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(text_iterator), n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        if len(ranks) < n_ranks:
            warnings.warn(f"training text ran out of pairs to merge: {len(ranks)} ordinary tokens instead of "
                          f"{n_ranks}, vocab_size {len(ranks) + len(SPECIAL_TOKENS)} instead of {vocab_size}")
        return cls.from_ranks(ranks, bpe.get_pattern())

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> "Tokenizer":
        """Load `tokenizer_dir/tokenizer.pkl` (ours, or nanochat's pickled tiktoken Encoding) without running code.

        The file is read by a restricted unpickler (`_SafeTokenizerUnpickler`): a pickle that names any global
        besides the few a tiktoken Encoding pickles to (os.system, builtins.eval, subprocess.Popen, ...) is
        refused before anything is called.

        Raises:
            MissingInputError (a UserError and FileNotFoundError): no tokenizer.pkl there (the message names the
                path and `python -m train.tokenizer`).
            BadInputError (a UserError and ValueError): the file is not a pickle, holds something else, or would
                run code (the one-line message names the path and the refused global).
        """
        from jaxchat.common import BadInputError, MissingInputError  # lazy: importing common imports jax

        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise MissingInputError(f"no tokenizer at {path}: train one with `{TRAIN_COMMAND}` "
                                    f"(it writes to $JAXCHAT_BASE_DIR/tokenizer)")
        try:
            with open(path, "rb") as f:
                obj = _SafeTokenizerUnpickler(f).load()
        except _RefusedGlobal as e:
            raise BadInputError(f"{path}: refused to load: {e}; a tokenizer file holds only ranks and special "
                                f"tokens (do not trust this model directory, or retrain with `{TRAIN_COMMAND}`)") from e
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError, KeyError,
                IndexError, RecursionError, MemoryError) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise BadInputError(f"{path}: not a readable tokenizer ({type(e).__name__}: {msg}); retrain it with "
                                f"`{TRAIN_COMMAND}`") from e
        if isinstance(obj, _EncodingState):  # nanochat's pickled tiktoken Encoding
            obj = obj.state
        pieces = _encoding_pieces(obj)
        if pieces is None:
            raise BadInputError(f"{path}: expected a dict with str pat_str, mergeable_ranks {{bytes: int}} and "
                                f"special_tokens {{str: int}} or a tiktoken Encoding, got {type(obj).__name__}; "
                                f"retrain it with `{TRAIN_COMMAND}`")
        try:
            return cls(tiktoken.Encoding(**pieces), "<|bos|>")
        except (ValueError, KeyError) as e:  # a pat_str that is not a regex; no <|bos|> special token
            raise BadInputError(f"{path}: not a usable tokenizer ({e}); retrain it with `{TRAIN_COMMAND}`") from e

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> "Tokenizer":
        """OpenAI's encodings ("gpt2", "cl100k_base"), BOS = <|endoftext|>. Needs tiktoken's download cache."""
        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    def fingerprint(self) -> str:
        """'bpe-<vocab size>-<16 hex digits>': a sha256 over the split pattern, the merges (ranks) and the special
        tokens, so two tokenizers of the same size but different merges differ. Stored in checkpoint meta."""
        h = hashlib.sha256(self.enc._pat_str.encode())
        for tok, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(tok).to_bytes(2, "little") + tok)
        for name, idx in sorted(self._special.items()):
            h.update(name.encode() + idx.to_bytes(4, "little"))
        return f"bpe-{self.get_vocab_size()}-{h.hexdigest()[:16]}"

    def save(self, tokenizer_dir: str) -> None:
        """Write tokenizer.pkl (plain dict of the encoding's pieces) and token_bytes.npy into tokenizer_dir."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        pieces = {"name": self.enc.name, "pat_str": self.enc._pat_str,
                  "mergeable_ranks": dict(self.enc._mergeable_ranks), "special_tokens": dict(self._special)}
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(pieces, f)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        np.save(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), self.token_bytes())

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        """Special token names in id order."""
        return sorted(self._special, key=self._special.get)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, name: str) -> int:
        """Id of a special token by exact name, e.g. "<|assistant_start|>".

        Raises:
            KeyError: not a special token of this tokenizer.
        """
        try:
            return self._special[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token; known: {self.get_special_tokens()}") from None

    def id_to_token(self, token_id: int) -> str:
        """The token as text (a partial UTF-8 sequence shows as U+FFFD; see `id_to_bytes`)."""
        return self.enc.decode([token_id])

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of a token (special tokens: their name in UTF-8)."""
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): byte length of every ordinary token, 0 for special tokens.

        Computed from the raw bytes of the ranks, not by decoding to str: a token holding part of a multi-byte
        character would decode to U+FFFD (3 bytes) whatever its real length.
        """
        out = np.zeros(self.get_vocab_size(), dtype=np.int32)
        for tok, rank in self.enc._mergeable_ranks.items():
            out[rank] = len(tok)
        for rank in self._special.values():
            out[rank] = 0
        return out

    # ------------------------------------------------------------------ encode / decode

    def _resolve(self, token: int | str | None, what: str) -> int | None:
        if token is None:
            return None
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            if not 0 <= int(token) < self.get_vocab_size():
                raise ValueError(f"{what}={token} is outside the vocab [0, {self.get_vocab_size()})")
            return int(token)
        if isinstance(token, str):
            return self.encode_special(token)
        raise ValueError(f"{what} must be a special token name or an id, got {type(token).__name__}")

    def encode(self, text: str | Sequence[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode text as ordinary text: special-token strings inside it are NOT turned into special ids.

        Args:
            text: one string -> list[int]; a list of strings -> list[list[int]] (encoded by tiktoken in
                `num_threads` threads).
            prepend, append: optional special token (name like "<|bos|>" or id) added to each sequence.

        Raises:
            ValueError: text is neither str nor a list/tuple of str; bad prepend/append.
        """
        first = self._resolve(prepend, "prepend")
        last = self._resolve(append, "append")
        if isinstance(text, str):
            rows, single = [self.enc.encode_ordinary(text)], True
        elif isinstance(text, (list, tuple)):
            if not all(isinstance(t, str) for t in text):
                raise ValueError("encode: every item of a batch must be a str")
            rows, single = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads), False
        else:
            raise ValueError(f"encode: expected str or list of str, got {type(text).__name__}")
        if first is not None or last is not None:
            head = [first] if first is not None else []
            tail = [last] if last is not None else []
            rows = [head + r + tail for r in rows]
        return rows[0] if single else rows

    __call__ = encode

    def decode(self, ids: Sequence[int]) -> str:
        """Ids (list, tuple, numpy or jax array) -> text; invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.enc.decode(list(ids))

    # ------------------------------------------------------------------ chat

    def render_conversation(self, conversation: dict[str, Any], max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Tokenize one chat for SFT: ids and a loss mask (1 = the assistant is trained to produce it).

        Layout (nanochat): <|bos|>, then per turn
          user:      <|user_start|> text <|user_end|>                          all mask 0
          assistant: <|assistant_start|> (mask 0) content <|assistant_end|> (mask 1)
        Assistant content is a str (mask 1) or a list of parts: {"type": "text"} (mask 1), {"type": "python"}
        wrapped in <|python_start|>..<|python_end|> (mask 1), {"type": "python_output"} wrapped in
        <|output_start|>..<|output_end|> (mask 0: the tool writes it at inference time).
        A leading system message is merged into the first user message as "system\\n\\nuser".
        Both lists are cut to `max_tokens`.

        Raises:
            ValueError: malformed conversation (no messages, roles not alternating user/assistant starting with
                user, a system message not first or not followed by a user message, non-str user content, unknown
                part type, part without str "text").
        """
        messages = _validated_messages(conversation)
        if messages[0]["role"] == "system":
            merged = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
            messages = [merged] + messages[2:]

        sp = self.encode_special
        ids: list[int] = []
        mask: list[int] = []

        def add(token_ids: int | list[int], m: int) -> None:
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        add(self.get_bos_token_id(), 0)
        for msg in messages:
            content = msg["content"]
            if msg["role"] == "user":
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    part_ids = self.encode(part["text"])
                    if part["type"] == "text":
                        add(part_ids, 1)
                    elif part["type"] == "python":
                        add(sp("<|python_start|>"), 1)
                        add(part_ids, 1)
                        add(sp("<|python_end|>"), 1)
                    else:  # python_output
                        add(sp("<|output_start|>"), 0)
                        add(part_ids, 0)
                        add(sp("<|output_end|>"), 0)
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict[str, Any], max_tokens: int = 2048) -> list[int]:
        """Prompt for sampling (RL, chat eval): drop the final assistant message, render, add <|assistant_start|>.

        As nanochat, the rendering is cut to `max_tokens` BEFORE <|assistant_start|> is appended.

        Raises:
            ValueError: the last message is not from the assistant, or the rest is malformed.
        """
        messages = _validated_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"render_for_completion: last message must be from the assistant, "
                             f"got {messages[-1]['role']!r}")
        prompt = dict(conversation, messages=copy.deepcopy(messages[:-1]))
        ids, _ = self.render_conversation(prompt, max_tokens=max_tokens)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids: Sequence[int], mask: Sequence[int], with_token_id: bool = False) -> str:
        """Debug view: tokens joined by '|', green where mask=1 (trained), red where mask=0 (ANSI colours)."""
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        out = []
        for tid, m in zip(ids, mask):
            s = f"{green if m else red}{self.id_to_token(tid)}{reset}"
            out.append(s + (f"{gray}({tid}){reset}" if with_token_id else ""))
        return "|".join(out)


def _validated_messages(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """Check a nanochat conversation's structure and return its messages (not copied, not mutated)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("conversation must be a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
    start = 0
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            raise ValueError("system message content must be a str")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        start = 1
    for i, msg in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ValueError(f"message {i} is from {msg['role']!r} but should be from {expected!r} "
                             f"(roles alternate user/assistant, optional system message first)")
        content = msg["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    raise ValueError(f"message {i} part {j}: type must be one of {PART_TYPES}, got "
                                     f"{part.get('type') if isinstance(part, dict) else part!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} part {j}: 'text' must be a str")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: assistant content must be a str or a list of parts, "
                             f"got {type(content).__name__}")
    return messages



# ---------------------------------------------------------------------------------------------- safe loading
# A pickle runs code by naming a global (module.attribute) and calling it. Our tokenizer.pkl is a plain dict (no
# globals at protocol >= 3); nanochat's is `pickle.dump(tiktoken.Encoding)`, which names tiktoken.core.Encoding
# and, at protocols 0-2, copyreg._reconstructor, builtins.object and _codecs.encode (for bytes). Each of those
# maps to a stand-in below that only stores or converts data: even tiktoken's own Encoding.__setstate__ is not
# run, since a str state makes it fetch a registered encoding by name.

class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the tokenizer formats (e.g. os.system): it would run code."""


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state it is given, runs nothing."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstructor(cls: Any, base: Any, state: Any) -> _EncodingState:
    """copyreg._reconstructor, as protocols 0-1 pickle an Encoding: only the (Encoding, object, None) form."""
    if cls is not _EncodingState or base is not object or state is not None:
        raise _RefusedGlobal("copyreg._reconstructor used for something other than a tiktoken Encoding")
    return _EncodingState()


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """_codecs.encode, as protocols 0-2 pickle bytes (str, "latin1"): that form only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode used with {type(text).__name__}, {encoding!r} instead of str, 'latin1'")
    return text.encode("latin-1")


_SAFE_GLOBALS = {
    ("tiktoken.core", "Encoding"): _EncodingState,
    ("copy_reg", "_reconstructor"): _reconstructor, ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object, ("builtins", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
}


class _SafeTokenizerUnpickler(pickle.Unpickler):
    """Unpickles only the tokenizer formats: every global outside `_SAFE_GLOBALS` raises `_RefusedGlobal`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"it names the global {module}.{name}, which would run code") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("it holds a persistent reference, which a tokenizer file never does")


def _encoding_pieces(obj: Any) -> dict[str, Any] | None:
    """tiktoken.Encoding keyword arguments from an unpickled state dict, or None if any piece has a wrong type."""
    if not isinstance(obj, dict):
        return None
    name, pat_str = obj.get("name", "rustbpe"), obj.get("pat_str")
    ranks, special = obj.get("mergeable_ranks"), obj.get("special_tokens")
    if not (isinstance(name, str) and isinstance(pat_str, str) and isinstance(ranks, dict)
            and isinstance(special, dict)):
        return None
    if not all(type(k) is bytes and type(v) is int for k, v in ranks.items()):
        return None
    if not all(type(k) is str and type(v) is int for k, v in special.items()):
        return None
    return {"name": name, "pat_str": pat_str, "mergeable_ranks": ranks, "special_tokens": special}


def _tokenizer_dir() -> str:
    from jaxchat.common import get_base_dir  # lazy: importing common imports jax

    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer() -> Tokenizer:
    """The trained tokenizer in $JAXCHAT_BASE_DIR/tokenizer.

    Raises:
        MissingInputError (a UserError and FileNotFoundError): none trained yet (names the path and
            `python -m train.tokenizer`). BadInputError (a ValueError): an unreadable tokenizer.pkl.
    """
    return Tokenizer.from_directory(_tokenizer_dir())


def get_token_bytes() -> np.ndarray:
    """int32 (vocab_size,) byte length per token id, 0 for special tokens (for bits per byte).

    Raises:
        MissingInputError (a UserError and FileNotFoundError): token_bytes.npy missing (names the path and
            `python -m train.tokenizer`).
    """
    from jaxchat.common import MissingInputError

    path = os.path.join(_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise MissingInputError(f"no token byte lengths at {path}: train a tokenizer with `{TRAIN_COMMAND}`")
    return np.load(path).astype(np.int32, copy=False)
