"""Tokenizer: training, encoding, special tokens, chat rendering, token byte lengths, persistence, scripts.

Tiny tokenizers (vocab 512) are trained on Python stdlib docstrings plus the unicode samples below, so every test
runs in seconds and needs no shards.
"""

import collections
import functools
import inspect
import itertools
import json
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from jaxchat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_token_bytes, get_tokenizer

UNICODE_SAMPLES = [
    "Hello world! Numbers: 123, 4567, 89. Contractions: I'm, you're, it's.",
    "Special chars: @#$%^&*() [] {} <> ~`|\\ \t tab\r\nCRLF\n\n\nblank lines   trailing spaces   ",
    "你好世界，今天天气很好。東京は晴れです。",
    "정직한 사실 위에 공정한 시선을 더하다",
    "Emoji: 🌍🚀👍🏽 family 👨‍👩‍👧‍👦 flags 🇵🇹🇰🇷",
    "Accents: café naïve Ørsted Straße e\u0301 (combining) Ωμέγα русский текст",
    "RTL: שלום עולם مرحبا بالعالم",
    "Math: ∑_{k=1}^{n} k² = n(n+1)/2, ∫₀¹ x dx = ½, √2 ≈ 1.41421356",
    "Zero width: a\u200bb\u200dc, BOM \ufeff, NUL-free control \x07\x1b[0m",
]


def _corpus() -> list[str]:
    """Docstrings of a few stdlib modules and their members, plus the unicode samples: ~100 KB of text."""
    import argparse
    import json as json_mod
    import os
    import re
    import textwrap

    docs = []
    for mod in (argparse, collections, functools, itertools, json_mod, os, re, textwrap, inspect):
        docs.append(mod.__doc__ or "")
        for _, obj in vars(mod).items():
            doc = getattr(obj, "__doc__", None)
            if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and isinstance(doc, str):
                docs.append(doc)
    docs.extend(UNICODE_SAMPLES * 20)
    return [d for d in docs if d]


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train_from_iterator(corpus, vocab_size=512)


def _conv_tool():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Computing."},
            {"type": "python", "text": "print(6*7)"},
            {"type": "python_output", "text": "42\n"},
            {"type": "text", "text": "It is 42."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome"},
    ]}


# ---------------------------------------------------------------------------------------------- training / vocab

def test_corpus_is_big_enough(corpus):
    assert sum(len(d) for d in corpus) > 50_000


def test_vocab_counts_specials_and_specials_follow_ranks(tok):
    assert tok.get_vocab_size() == 512
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(512 - 9, 512))
    assert tok.get_bos_token_id() == 503
    assert len(tok.enc._mergeable_ranks) == 503
    assert sorted(tok.enc._mergeable_ranks.values()) == list(range(503))


def test_split_pattern_groups_digits_by_two(tok):
    assert r"\p{N}{1,2}" in SPLIT_PATTERN
    ids = tok.encode("x 1234567 9876543210")
    digit_tokens = [tok.id_to_token(i).strip() for i in ids if tok.id_to_token(i).strip().isdigit()]
    assert "".join(digit_tokens) == "12345679876543210"
    assert max(len(t) for t in digit_tokens) <= 2


def test_vocab_too_small_raises():
    with pytest.raises(ValueError, match="at least 256"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=264)


def test_tiny_text_warns_about_smaller_vocab():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        t = Tokenizer.train_from_iterator(["hello world"] * 5, vocab_size=400)
    assert t.get_vocab_size() < 400
    assert t.encode_special("<|bos|>") == t.get_vocab_size() - 9


def test_tiktoken_matches_rustbpe_encoder(corpus):
    """The tiktoken encoding built from rustbpe's ranks gives the ids rustbpe itself gives."""
    import rustbpe

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(corpus), 400, pattern=SPLIT_PATTERN)
    tok = Tokenizer.from_ranks({bytes(k): v for k, v in bpe.get_mergeable_ranks()}, bpe.get_pattern())
    for text in UNICODE_SAMPLES + corpus[:30]:
        assert tok.encode(text) == list(bpe.encode(text))


# ---------------------------------------------------------------------------------------------- encode / decode

@pytest.mark.parametrize("text", UNICODE_SAMPLES + ["", " ", "\n", "a"])
def test_round_trip_unicode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 503 for i in ids)  # ordinary ids only
    assert tok.decode(ids) == text


def test_round_trip_corpus_and_batch(tok, corpus):
    sample = corpus[:200]
    batch = tok.encode(sample, num_threads=2)
    assert batch == [tok.encode(t) for t in sample]
    assert [tok.decode(ids) for ids in batch] == sample
    # compression on training text: a 512 vocab must beat raw bytes
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    assert n_bytes / sum(map(len, batch)) > 1.5


def test_decode_accepts_numpy(tok):
    ids = tok.encode("hello numpy")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "hello numpy"


def test_encode_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="expected str or list"):
        tok.encode(123)
    with pytest.raises(ValueError, match="every item"):
        tok.encode(["ok", None])
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.encode("x", prepend=10_000)
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode("x", append="<|eos|>")


def test_prepend_append_by_name_or_id(tok):
    body = tok.encode("some text")
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode("some text", prepend="<|bos|>") == [bos] + body
    assert tok.encode("some text", prepend=bos, append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.encode("some text", append=end) == body + [end]
    batch = tok.encode(["a b", "c"], prepend="<|bos|>", append=end)
    assert batch == [[bos] + tok.encode("a b") + [end], [bos] + tok.encode("c") + [end]]


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_special_token_literal_is_ordinary_text(tok, name):
    sid = tok.encode_special(name)
    assert isinstance(sid, int) and sid >= 503
    assert tok.id_to_token(sid) == name
    text = f"before {name} after{name}"
    ids = tok.encode(text)
    assert all(i < 503 for i in ids), "ordinary encode must never produce special ids"
    assert len(tok.encode(name)) > 1
    assert tok.decode(ids) == text
    # and inside chat rendering, a user typing the literal string cannot forge a turn boundary
    ids, _ = tok.render_conversation({"messages": [{"role": "user", "content": name}]})
    assert ids.count(sid) == (1 if name in ("<|bos|>", "<|user_start|>", "<|user_end|>") else 0)


def test_unknown_special_raises(tok):
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode_special("<|endoftext|>")


# ---------------------------------------------------------------------------------------------- token bytes

def test_token_bytes_from_raw_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (512,)
    assert (tb[503:] == 0).all() and (tb[:503] > 0).all()
    assert (tb[:256] == 1).all()  # the byte alphabet, including continuation bytes 0x80-0xBF
    # a lone continuation byte decodes to U+FFFD (3 bytes in UTF-8): computing from str would say 3
    assert tok.id_to_token(0x80) == "\ufffd" and tb[0x80] == 1
    for i in range(503):
        assert tb[i] == len(tok.id_to_bytes(i))


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_token_bytes_sum_to_utf8_length(tok, text):
    ids = tok.encode(text, prepend="<|bos|>", append="<|assistant_end|>")  # specials count 0
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_partial_utf8_tokens_exist(tok):
    """CJK gets split inside characters at vocab 512: exactly where decode-to-str byte counts go wrong."""
    ids = tok.encode("你好世界，今天天气很好。")
    assert any("\ufffd" in tok.id_to_token(i) for i in ids)


# ---------------------------------------------------------------------------------------------- chat rendering

def test_render_simple_conversation(tok):
    conv = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]}
    sp = tok.encode_special
    u, a = tok.encode("Hello"), tok.encode("Hi there!")
    ids, mask = tok.render_conversation(conv)
    assert ids == [sp("<|bos|>"), sp("<|user_start|>"), *u, sp("<|user_end|>"),
                   sp("<|assistant_start|>"), *a, sp("<|assistant_end|>")]
    assert mask == [0, 0] + [0] * len(u) + [0, 0] + [1] * len(a) + [1]


def test_render_tool_call_and_system_message(tok):
    conv = _conv_tool()
    before = json.dumps(conv)
    ids, mask = tok.render_conversation(conv)
    assert json.dumps(conv) == before, "render_conversation must not mutate its input"
    sp, e = tok.encode_special, tok.encode
    expected = [  # (ids, mask) per piece, written out by hand from nanochat's rules
        ([sp("<|bos|>")], 0),
        ([sp("<|user_start|>")], 0), (e("Be brief.\n\nWhat is 6*7?"), 0), ([sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0),
        (e("Computing."), 1),
        ([sp("<|python_start|>")], 1), (e("print(6*7)"), 1), ([sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")], 0), (e("42\n"), 0), ([sp("<|output_end|>")], 0),
        (e("It is 42."), 1),
        ([sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>")], 0), (e("Thanks"), 0), ([sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0), (e("You're welcome"), 1), ([sp("<|assistant_end|>")], 1),
    ]
    assert ids == [i for piece, _ in expected for i in piece]
    assert mask == [m for piece, m in expected for _ in piece]
    assert len(ids) == len(mask)
    # decode shows the layout
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 6*7?<|user_end|><|assistant_start|>")
    assert "<|python_start|>print(6*7)<|python_end|><|output_start|>42\n<|output_end|>It is 42." in text
    # trained tokens are exactly the assistant's own output
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("Computing.<|python_start|>print(6*7)<|python_end|>It is 42.<|assistant_end|>"
                       "You're welcome<|assistant_end|>")


def test_render_truncates(tok):
    full_ids, full_mask = tok.render_conversation(_conv_tool())
    ids, mask = tok.render_conversation(_conv_tool(), max_tokens=10)
    assert ids == full_ids[:10] and mask == full_mask[:10]


def test_render_for_completion(tok):
    conv = _conv_tool()
    ids = tok.render_for_completion(conv)
    prompt = {"messages": conv["messages"][:-1]}
    assert ids == tok.render_conversation(prompt)[0] + [tok.encode_special("<|assistant_start|>")]
    assert tok.decode(ids).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    assert len(conv["messages"]) == 5, "input not mutated"
    with pytest.raises(ValueError, match="last message must be from the assistant"):
        tok.render_for_completion(prompt)


@pytest.mark.parametrize("conv, match", [
    ({"messages": []}, "no messages"),
    ({"msgs": []}, "'messages' list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "should be from 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "should be from 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, "followed by a user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "s"}]}, "message 2 is from 'system'"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "user content must be a str"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "type must be one of"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "text"}]}]}, "'text' must be a str"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}, "str or a list of parts"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
])
def test_render_validation(tok, conv, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(conv)


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]})
    out = tok.visualize_tokenization(ids, mask, with_token_id=True)
    assert out.count("|") >= len(ids) - 1 and "\033[92m" in out and "\033[91m" in out
    assert f"({ids[0]})" in out


# ---------------------------------------------------------------------------------------------- persistence

def test_save_load_identical(tok, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    loaded = get_tokenizer()
    for text in UNICODE_SAMPLES + corpus[:50]:
        assert loaded.encode(text) == tok.encode(text)
    conv = _conv_tool()
    assert loaded.render_conversation(conv) == tok.render_conversation(conv)
    assert loaded.get_vocab_size() == 512 and loaded.get_special_tokens() == SPECIAL_TOKENS
    tb = get_token_bytes()
    assert tb.dtype == np.int32 and np.array_equal(tb, tok.token_bytes())
    # the file is a plain dict of bytes/str/int: loadable without rustbpe or any jaxchat class
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "rb") as f:
        pieces = pickle.load(f)
    assert type(pieces) is dict and pieces["pat_str"] == SPLIT_PATTERN
    assert all(type(k) is bytes for k in pieces["mergeable_ranks"])


def test_loads_pickled_tiktoken_encoding(tok, tmp_path):
    """nanochat saves pickle.dump(tiktoken.Encoding): that file loads too."""
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
    loaded = Tokenizer.from_directory(str(tmp_path))
    assert loaded.encode(UNICODE_SAMPLES[4]) == tok.encode(UNICODE_SAMPLES[4])
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict"):
        Tokenizer.from_directory(str(tmp_path))



FIXTURES = Path(__file__).parent / "fixtures"


def test_real_nanochat_tokenizer_file_loads_with_nanochat_encodings():
    """tokenizer.pkl written by nanochat's own RustBPETokenizer.save (5019acc and 92d63d4 write the same bytes):
    it loads through the restricted unpickler and encodes and renders exactly as nanochat did."""
    ref = json.loads((FIXTURES / "nanochat-tokenizer" / "encodings.json").read_text(encoding="utf-8"))
    loaded = Tokenizer.from_directory(str(FIXTURES / "nanochat-tokenizer"))
    assert loaded.get_vocab_size() == ref["vocab_size"] == 512
    for text, ids, bos_ids in zip(ref["samples"], ref["encodings"], ref["bos_encodings"]):
        assert loaded.encode(text) == ids
        assert loaded.encode(text, prepend="<|bos|>") == bos_ids
    assert loaded.render_conversation(ref["conversation"]) == (ref["render_ids"], ref["render_mask"])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_tokenizer_pickled_at_any_protocol_loads_identically(tok, tmp_path, protocol):
    """A pickled tiktoken Encoding (nanochat) and our plain dict, at every pickle protocol: at 0-2 these name
    copyreg._reconstructor, builtins.object and _codecs.encode, which the restricted unpickler admits."""
    pieces = {"name": "rustbpe", "pat_str": tok.enc._pat_str, "mergeable_ranks": dict(tok.enc._mergeable_ranks),
              "special_tokens": dict(tok.enc._special_tokens)}
    for obj in (tok.enc, pieces):
        (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
        loaded = Tokenizer.from_directory(str(tmp_path))
        assert loaded.fingerprint() == tok.fingerprint()
        for text in UNICODE_SAMPLES:
            assert loaded.encode(text, prepend="<|bos|>") == tok.encode(text, prepend="<|bos|>")


def _global_call(module: str, name: str, arg) -> bytes:
    """A protocol-4 pickle that calls module.name(arg) (a dotted name is looked up attribute by attribute)."""
    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + pickle.dumps(arg, protocol=4)[2:-1] + b"\x85R."


class _Reduce:
    """Pickles as fn(*args): the classic code-running payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _pickled_encoding(tok, state, protocol: int = 4) -> bytes:
    """Pickle a tiktoken Encoding exactly as nanochat's file does (global tiktoken.core.Encoding, NEWOBJ, BUILD;
    copyreg._reconstructor at protocols 0-1), but with any state in place of the real one."""
    import copyreg
    import io

    import tiktoken

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=protocol)
    if protocol >= 2:
        reduced = (copyreg.__newobj__, (tiktoken.Encoding,), state)
    else:  # what object.__reduce_ex__ gives at protocols 0-1
        reduced = (copyreg._reconstructor, (tiktoken.Encoding, object, None), state)
    pickler.dispatch_table = {tiktoken.Encoding: lambda enc: reduced}
    pickler.dump(tok.enc)
    return buf.getvalue()

def test_tokenizer_that_would_run_code_is_refused_and_never_runs(tok, tmp_path, monkeypatch):
    """A planted tokenizer.pkl that runs code when unpickled (each payload is first shown to create the marker
    under plain pickle.loads) is refused with a one-line UserError naming the file and the global; no code runs."""
    import builtins
    import os
    import subprocess

    from jaxchat.common import UserError

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    touch = f"open({str(marker)!r}, 'w').close()"
    good = {"name": "rustbpe", "pat_str": tok.enc._pat_str, "mergeable_ranks": dict(tok.enc._mergeable_ranks),
            "special_tokens": dict(tok.enc._special_tokens)}
    payloads = {
        "posix.system": pickle.dumps(_Reduce(os.system, f"touch {marker}")),  # os.system's real home
        "builtins.eval": pickle.dumps(_Reduce(builtins.eval, touch)),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)])),
        # a tiktoken-looking global that is not the Encoding class (tiktoken.load imports os)
        "tiktoken.load.os.system": _global_call("tiktoken.load", "os.system", f"touch {marker}"),
        # the payload nested inside an otherwise valid nanochat Encoding, at protocols 2 and 0
        "__builtin__.exec": _pickled_encoding(tok, dict(good, name=_Reduce(builtins.exec, touch)), protocol=2),
        "os.popen": _pickled_encoding(tok, dict(good, pat_str=_Reduce(os.popen, f"touch {marker}")), protocol=0),
    }
    path = tmp_path / "tokenizer.pkl"
    for refused, payload in payloads.items():
        try:  # proof that the payload is live: plain pickle runs it ...
            pickle.loads(payload)
        except Exception:  # (the nested ones break tiktoken, after their code ran)
            pass
        for _ in range(100):  # (Popen and popen run touch in the background)
            if marker.exists():
                break
            time.sleep(0.02)
        assert marker.exists(), refused
        marker.unlink()
        path.write_bytes(payload)
        with pytest.raises(UserError) as e:  # ... the tokenizer loader does not
            Tokenizer.from_directory(str(tmp_path))
        message = str(e.value)
        assert "\n" not in message and str(path) in message and f"refused to load: it names the global {refused}," \
            in message, message
        time.sleep(0.1)
        assert not marker.exists(), refused


def test_tokenizer_naming_a_registered_encoding_is_refused(tok, tmp_path):
    """tiktoken pickles its registered encodings by name; unpickling one would fetch it over the network."""
    from jaxchat.common import UserError

    (tmp_path / "tokenizer.pkl").write_bytes(_pickled_encoding(tok, "gpt2"))
    with pytest.raises(UserError, match=r"tokenizer\.pkl: expected a dict .* got str"):
        Tokenizer.from_directory(str(tmp_path))

def test_missing_or_corrupt_tokenizer_is_a_user_error(tmp_path, monkeypatch):
    """A user error (one line from `run_cli`) naming the path and the command; still the builtin types."""
    from jaxchat.common import UserError

    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    path = tmp_path / "tokenizer" / "tokenizer.pkl"
    for load in (get_tokenizer, get_token_bytes):
        with pytest.raises(FileNotFoundError, match="python -m train.tokenizer") as e:
            load()
        assert isinstance(e.value, UserError) and str(tmp_path / "tokenizer") in str(e.value)
    path.parent.mkdir()
    for payload in (pickle.dumps({"pat_str": "x"})[:-3], b"not a pickle at all", pickle.dumps(["a list"])):
        path.write_bytes(payload)
        with pytest.raises(UserError, match=rf"{path}: .*python -m train.tokenizer"):
            get_tokenizer()


# ---------------------------------------------------------------------------------------------- scripts

def test_train_script_on_input_files(tmp_path, monkeypatch, capsys):
    from train import tokenizer as train_tok

    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("\n".join(_corpus()[:300]), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(UNICODE_SAMPLES * 5), encoding="utf-8")
    stats = train_tok.main(["--input", str(tmp_path / "docs"), str(tmp_path / "b.txt"), "--vocab-size", "400",
                            "--doc-cap", "2000"])
    out = capsys.readouterr().out
    assert "round trip OK" in out and "Training time" in out
    assert json.loads(out.strip().splitlines()[-1])["event"] == "tokenizer_train"
    assert stats["vocab_size"] == 400 and stats["token_bytes_min"] == 1
    tdir = tmp_path / "base" / "tokenizer"
    assert (tdir / "tokenizer.pkl").exists() and (tdir / "token_bytes.npy").exists()
    assert json.loads((tdir / "train_stats.json").read_text())["vocab_size"] == 400
    assert get_tokenizer().get_vocab_size() == 400 and get_token_bytes().shape == (400,)

    with pytest.raises(FileNotFoundError, match="--input"):
        train_tok.main(["--input", str(tmp_path / "nope.txt")])


def test_train_script_reads_a_parquet_files_text_column_or_refuses(tmp_path, monkeypatch):
    """--input x.parquet: the documents of its 'text' column, one per row (not the file's bytes as one document);
    a parquet file without that column is refused in one line naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from jaxchat.common import UserError
    from train import tokenizer as train_tok

    docs = [f"document {i}: " + UNICODE_SAMPLES[i % len(UNICODE_SAMPLES)] for i in range(50)]
    pq.write_table(pa.table({"id": list(range(50)), "text": docs}), str(tmp_path / "x.parquet"), row_group_size=16)
    assert list(train_tok.file_documents([str(tmp_path / "x.parquet")], doc_cap=10_000)) == docs
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    stats = train_tok.main(["--input", str(tmp_path / "x.parquet"), "--vocab-size", "300"])
    assert stats["train_docs"] == 50 and stats["train_chars"] == sum(map(len, docs))
    pq.write_table(pa.table({"body": docs}), str(tmp_path / "y.parquet"))
    with pytest.raises(UserError, match=r"--input .*y.parquet: this parquet file has no 'text' column \(columns: "
                                        r"\['body'\]\)") as e:
        train_tok.main(["--input", str(tmp_path / "y.parquet"), "--vocab-size", "300"])
    assert "\n" not in str(e.value)


def test_train_script_on_shards_caps_chars(tmp_path, monkeypatch):
    """Shard path: docs cropped to --doc-cap, stop after the doc that passes --max-chars (nanochat semantics)."""
    from train import tokenizer as train_tok

    seen = []
    docs = [(s + " ") * 40 for s in UNICODE_SAMPLES] * 10

    def parquets_iter_batched(split, start=0, step=1):
        assert split == "train"
        for i in range(0, len(docs), 7):
            yield docs[i:i + 7]

    real_train = Tokenizer.train_from_iterator  # bound classmethod, captured before the patch below

    def spy(it, vocab_size):
        seen.extend(it)
        return real_train(seen, vocab_size)

    fake = types.ModuleType("jaxchat.dataset")
    fake.parquets_iter_batched = parquets_iter_batched
    monkeypatch.setitem(sys.modules, "jaxchat.dataset", fake)
    monkeypatch.setattr(train_tok.Tokenizer, "train_from_iterator", staticmethod(spy))
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    stats = train_tok.main(["--vocab-size", "300", "--doc-cap", "500", "--max-chars", "5000"])
    assert all(len(d) <= 500 for d in seen)
    assert sum(map(len, seen[:-1])) <= 5000 < sum(map(len, seen))
    assert stats["train_docs"] == len(seen) and stats["source"] == "shards"


def test_eval_script(tok, tmp_path, monkeypatch, capsys):
    from evals import tokenizer as eval_tok

    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    summary = eval_tok.main(["--no-shards"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    ratios = summary["ratio"]["ours"]
    assert set(ratios) == {"news", "korean", "code", "math", "science"}
    assert all(r >= 1.0 for r in ratios.values())  # byte-level BPE never expands past 1 token per byte
    assert ratios["news"] > ratios["korean"]  # English-heavy training text compresses English best
