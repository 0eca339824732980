"""Tests for jaxchat/dataloader.py: BOS-aligned best-fit packing, exact resume, process sharding.

A fake tokenizer makes documents identifiable: the text "doc K N" encodes to [BOS] + [ID(K, 0..N-1)], so
every token says which document it came from and its position in it.
"""

import json
import random
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxchat.common import UserError
from jaxchat.dataloader import make_pretrain_loader
from jaxchat.dataset import parquets_iter_batched, write_shards

BOS = 1
BASE = 1_000_000


def tok_id(k, j):
    return BASE + k * 1000 + j


class FakeTokenizer:
    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=1):
        out = []
        for t in texts:
            _, k, n = t.split()
            out.append(([prepend] if prepend is not None else []) + [tok_id(int(k), j) for j in range(int(n))])
        return out


def make_corpus(data_dir, n_docs=300, max_len=60, seed=0, row_group_docs=16):
    """Documents of 1..max_len tokens (+BOS), written as several train shards and one val shard."""
    rng = random.Random(seed)
    lengths = {k: rng.randint(1, max_len) for k in range(n_docs)}
    docs = [f"doc {k} {n}" for k, n in lengths.items()]
    write_shards(docs, str(data_dir), shard_chars=1500, row_group_docs=row_group_docs, val_chars=1000)
    return lengths


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    data_dir = tmp_path / "base_data"
    return data_dir, make_corpus(data_dir)


def loader(data_dir, B=4, T=64, split="train", **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("buffer_size", 40)  # smaller than an epoch, so a document is buffered at most once per epoch
    return make_pretrain_loader(FakeTokenizer(), B, T, split, data_dir=str(data_dir), **kw)


def segments(row):
    """Split a packed row at BOS tokens -> list of token lists, each starting after its BOS."""
    starts = np.flatnonzero(row == BOS)
    assert starts[0] == 0, "row must start with BOS"
    ends = list(starts[1:]) + [len(row)]
    return [row[s + 1:e] for s, e in zip(starts, ends)]


def check_batch(x, y, lengths, T, seen=None):
    """Every row starts with BOS, no padding, each segment is one document in order; return doc ids."""
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape and x.shape[1] == T
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    ids = []
    for xr, yr in zip(x, y):
        row = np.concatenate([xr, yr[-1:]])  # the T+1 packed tokens
        segs = segments(row)
        for n_seg, seg in enumerate(segs):
            if len(seg) == 0:  # a document of only BOS is never produced: docs have >= 1 token
                assert n_seg == len(segs) - 1  # ...except a crop that kept only the BOS
                continue
            k = (int(seg[0]) - BASE) // 1000
            assert k in lengths, f"token {seg[0]} is not a document token (padding?)"
            np.testing.assert_array_equal(seg, [tok_id(k, j) for j in range(len(seg))])  # one doc, in order
            if n_seg < len(segs) - 1:
                assert len(seg) == lengths[k], "only the last document of a row may be cropped"
            else:
                assert len(seg) <= lengths[k]
            if seen is not None:
                assert k not in seen, f"document {k} packed twice in one epoch"
                seen.add(k)
            ids.append(k)
    return ids


def test_rows_bos_aligned_no_padding_one_doc_per_segment(corpus):
    data_dir, lengths = corpus
    it = loader(data_dir, B=4, T=64)
    seen = set()
    for _ in range(8):
        x, y = next(it)
        check_batch(x, y, lengths, 64, seen)
    assert it.epoch == 1 and it.batches == 8


def nanochat_reference(doc_stream, B, T, buffer_size, tokenizer_batch_size, n_batches):
    """nanochat's best-fit rule written naively (linear scans over a list), for comparison."""
    buf, out = [], []
    chunks = iter(doc_stream)
    for _ in range(n_batches):
        rows = np.empty((B, T + 1), np.int32)
        for r in range(B):
            pos = 0
            while pos < T + 1:
                while len(buf) < buffer_size:
                    buf.extend(next(chunks))
                rem = T + 1 - pos
                best, best_len = -1, 0
                for i, d in enumerate(buf):
                    if rem >= len(d) > best_len:
                        best, best_len = i, len(d)
                if best >= 0:
                    d = buf.pop(best)
                else:
                    d = buf.pop(min(range(len(buf)), key=lambda i: len(buf[i])))[:rem]
                rows[r, pos:pos + len(d)] = d
                pos += len(d)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def test_matches_nanochat_best_fit_rule(corpus):
    data_dir, _ = corpus
    tok = FakeTokenizer()
    B, T, buf, tbs = 3, 50, 20, 8

    def stream():
        while True:
            for texts in parquets_iter_batched("train", data_dir=str(data_dir)):
                for i in range(0, len(texts), tbs):
                    yield tok.encode(texts[i:i + tbs], prepend=BOS)

    ref = nanochat_reference(stream(), B, T, buf, tbs, 80)  # 80 batches cross an epoch boundary
    it = loader(data_dir, B=B, T=T, buffer_size=buf, tokenizer_batch_size=tbs)
    for want_x, want_y in ref:
        x, y = next(it)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    assert it.epoch >= 2


@pytest.mark.parametrize("split_at", [0, 3, 17])
def test_resume_gives_identical_batches(corpus, split_at):
    data_dir, _ = corpus
    kw = dict(B=4, T=100, buffer_size=30, tokenizer_batch_size=8)  # ~20 batches per epoch with these sizes
    it = loader(data_dir, **kw)
    for _ in range(split_at):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    want = [next(it) for _ in range(12)]
    resumed = loader(data_dir, state=state, **kw)
    for wx, wy in want:
        x, y = next(resumed)
        np.testing.assert_array_equal(x, wx)
        np.testing.assert_array_equal(y, wy)
    assert resumed.batches == split_at + 12
    if split_at == 17:
        assert resumed.epoch >= 2, "resume should have been tested across an epoch boundary"
    # set_state on a running iterator rewinds it as well
    it.set_state(state)
    np.testing.assert_array_equal(next(it)[0], want[0][0])


def test_two_processes_read_disjoint_row_groups(corpus):
    data_dir, lengths = corpus
    ids = []
    for p in range(2):
        it = loader(data_dir, B=2, T=64, process_index=p, process_count=2, infinite=False, buffer_size=10)
        seen = set()
        for x, y in it:
            check_batch(x, y, lengths, 64, seen)
        ids.append(seen)
        # exactly the documents of this process's row groups (minus those left in the final partial batch)
        share = {int(t.split()[1]) for g in parquets_iter_batched("train", p, 2, str(data_dir)) for t in g}
        assert seen <= share and len(seen) > 0.7 * len(share)
    assert not ids[0] & ids[1]


def test_val_split_finite_and_cycling(corpus):
    data_dir, lengths = corpus
    val_docs = {int(t.split()[1]) for g in parquets_iter_batched("val", data_dir=str(data_dir)) for t in g}
    finite = list(loader(data_dir, B=1, T=32, split="val", infinite=False, buffer_size=4))
    assert finite, "val split yielded no batch"
    got = set()
    for x, y in finite:
        got.update(check_batch(x, y, lengths, 32))
    assert got <= val_docs
    cycling = loader(data_dir, B=1, T=32, split="val", buffer_size=4)
    for _ in range(len(finite) + 5):  # keeps going past the end of the shard
        next(cycling)
    assert cycling.epoch >= 2


def test_errors(tmp_path, monkeypatch, corpus):
    data_dir, _ = corpus
    with pytest.raises(FileNotFoundError, match="python -m jaxchat.dataset"):
        loader(tmp_path / "empty")
    with pytest.raises(ValueError, match="fewer than the 1000 processes"):
        loader(data_dir, process_index=999, process_count=1000)
    with pytest.raises(ValueError, match="split"):
        loader(data_dir, split="test")
    with pytest.raises(ValueError, match="process_index"):
        loader(data_dir, process_index=2, process_count=2)


def test_with_real_tokenizer_segments_decode_to_documents(tmp_path):
    """End to end with jaxchat's Tokenizer: each BOS segment decodes to (a prefix of) one document."""
    tokenizer_mod = pytest.importorskip("jaxchat.tokenizer")
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jam".split()
    docs = [f"Doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for i in range(400)]
    write_shards(docs, str(tmp_path), shard_chars=8000, row_group_docs=32)
    tok = tokenizer_mod.Tokenizer.train_from_iterator(docs, vocab_size=300)
    bos = tok.get_bos_token_id()
    it = make_pretrain_loader(tok, 4, 48, "train", 0, 1, buffer_size=50, data_dir=str(tmp_path))
    for _ in range(5):
        x, y = next(it)
        for xr, yr in zip(x, y):
            row = np.concatenate([xr, yr[-1:]])
            assert row[0] == bos
            starts = list(np.flatnonzero(row == bos)) + [len(row)]
            for s, e in zip(starts[:-1], starts[1:]):
                text = tok.decode(row[s + 1:e].tolist())
                assert any(d.startswith(text) for d in docs), text


# -------------------------------------------------------------------------------------------------------------
# Shards with nothing to read, or broken ones: a one-line UserError naming the shard, never a busy loop

class _Hung(Exception):
    pass


def within(seconds, fn):
    """fn() under a SIGALRM deadline: a loader that busy-loops fails the test instead of hanging the suite."""
    def on_alarm(signum, frame):
        raise _Hung(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def first_batch(data_dir, split, **kw):
    return next(loader(data_dir, B=2, T=16, split=split, **kw))


def test_val_shard_with_zero_rows_is_an_error_naming_it(corpus):
    data_dir, _ = corpus
    val = sorted(data_dir.glob("*.parquet"))[-1]
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), str(val))
    with pytest.raises(UserError, match=rf"val split \(0 rows\): {val}.*python -m jaxchat.dataset"):
        within(10, lambda: first_batch(data_dir, "val"))
    with pytest.raises(UserError, match="0 rows"):
        within(10, lambda: first_batch(data_dir, "val", infinite=False))


def test_train_shards_of_empty_strings_are_an_error_naming_them(tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"text": [""] * 40}), str(tmp_path / f"shard_0000{i}.parquet"), row_group_size=8)
    pq.write_table(pa.table({"text": ["doc 0 5", "doc 1 7"]}), str(tmp_path / "shard_00002.parquet"))
    pattern = r"train split \(every document is an empty string\): .*shard_00000.parquet, .*shard_00001.parquet;"
    with pytest.raises(UserError, match=pattern + ".*python -m jaxchat.dataset"):
        within(10, lambda: first_batch(tmp_path, "train"))
    with pytest.raises(UserError, match="empty string"):  # one pass ends too, but it says why rather than stopping
        within(10, lambda: first_batch(tmp_path, "train", infinite=False))
    # 7 row groups dealt to 2 processes: process 1 reads 1, 3 and 5 (the first of shard 1, with documents),
    # process 0 reads 0, 2, 4 and 6 (all empty): the empty share is the error
    pq.write_table(pa.table({"text": ["doc 2 3"] * 8 + [""] * 8}), str(tmp_path / "shard_00001.parquet"),
                   row_group_size=8)
    x, _ = within(10, lambda: first_batch(tmp_path, "train", process_index=1, process_count=2))
    assert (x == tok_id(2, 0)).any()
    with pytest.raises(UserError, match="empty string"):
        within(10, lambda: first_batch(tmp_path, "train", process_index=0, process_count=2))


def test_corrupt_shard_says_to_delete_or_rebuild(corpus):
    data_dir, _ = corpus
    shard = sorted(data_dir.glob("*.parquet"))[1]
    shard.write_bytes(b"PAR1" + b"\0" * 64)  # a truncated download
    with pytest.raises(UserError, match=rf"{shard}: not a readable parquet file.*--force.*delete the file.*-n N"):
        within(10, lambda: first_batch(data_dir, "train"))
    shard.unlink()  # as the message says
    # intact footer, damaged pages: found when the row group is read (in a reader thread)
    shard = sorted(data_dir.glob("*.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    for i in range(4, len(raw) - footer):
        raw[i] ^= 0x5A
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"{shard}: row group 0 is corrupt.*python -m jaxchat.dataset"):
        within(10, lambda: first_batch(data_dir, "train"))
