"""Pretraining data loader: BOS-aligned best-fit packing of tokenized documents into (B, T) batches.

Same packing rule as nanochat's `tokenizing_distributed_data_loader_with_state_bos_bestfit`
(`nanochat/dataloader.py`):
  - documents are tokenized with BOS prepended and kept in a buffer of at least `buffer_size` documents
    (refilled `tokenizer_batch_size` documents at a time, in reading order);
  - each row of T+1 tokens is filled by repeatedly taking the LARGEST buffered document that fits whole
    in the space left (the earliest one on ties);
  - when none fits, the SHORTEST buffered document (earliest on ties) is cropped to fill the row exactly
    and the rest of it is discarded;
  - so every row starts with BOS, there is no padding, and a document never spans two rows.
`inputs = rows[:, :-1]`, `targets = rows[:, 1:]`.

Memory is bounded by the batch, not by document size. Packing takes at most T+1 tokens of any document (a row holds
T+1, BOS first), so:
  - a document is cut before tokenization to at most C = 2 (T+2) L characters (`max_doc_chars`; L is the longest
    token in bytes), at a word boundary (a space after a non-space, before a letter) at or past C/2 when there is
    one, which is a boundary of the tokenizer's pre-tokenization split, so the tokens before it are exactly those
    of the whole document. Packing keeps at most T text tokens of a document, which lie within its first T L
    characters (a token is at most L bytes, a character at least one) and so before the cut: nothing packing would
    keep is lost. A cut document still has more than T+1 tokens (at least C/(2L) = T+2), so, like the whole one, it
    never fits a row whole; what can differ is only which of two over-long documents is cropped first (the shorter
    one is), as the cut one enters the buffer with the length of its first C characters. (A document with no such
    boundary in its window, e.g. a single run of 10^5 letters, is cut at C, where its last word may split into
    other tokens.) At T = 2048 and L = 32, C is 131 k characters;
  - the buffer keeps each document's first T+1 tokens and its length (the best-fit key), not all its tokens;
  - a row group's tokenized documents are cached (a few row groups), so a split of few documents, re-read many
    times to fill the buffer, holds one copy of them, not one per read.

Pipeline (grain, threads only; worker processes crash in grain 0.2.18):
    MapDataset.source(this process's row groups)  -> .repeat() (train, and val unless infinite=False)
      .map_with_index(read + tokenize one row group)  -> .to_iter_dataset(ReadOptions(threads, prefetch))
      -> BestFitPackIterDataset (this module) -> (inputs, targets) int32 numpy (B, T)

Process sharding: the split's row groups (all shards, in order) are dealt round-robin, process p reading
numbers p, p+P, p+2P, ... so processes see disjoint data.

Exact resume (nanochat's is approximate: it skips to the next row group and drops its buffer): the state
records the grain read position plus, for every buffered and not-yet-buffered document of the row groups in
flight, its (row-group stream index, document index). Restoring re-reads and re-tokenizes those few row
groups through the MapDataset's random access, so the batches after a restore are identical to the ones an
uninterrupted run would have produced. The state is a small JSON-able dict.
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import grain
import numpy as np

from jaxchat.common import BadInputError
from jaxchat.dataset import REBUILD_HINT, list_row_groups, open_parquet, read_row_group_texts


def _name_shards(paths) -> str:
    """The distinct shard paths, in order, the first few by name and the rest as a count."""
    paths = list(dict.fromkeys(paths))
    shown = ", ".join(paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _no_documents_error(split: str, paths, why: str) -> BadInputError:
    return BadInputError(f"no documents to read in the {split} split ({why}): {_name_shards(paths)}; {REBUILD_HINT}")


def max_doc_chars(tokenizer, seq_len: int) -> int | None:
    """C = 2 (T + 2) L: the characters of a document tokenized (see the module docstring), L the longest token of
    `tokenizer` in bytes (its `token_bytes()`); None (no cut) for a tokenizer that does not say."""
    if not hasattr(tokenizer, "token_bytes"):
        return None
    return 2 * (seq_len + 2) * max(1, int(np.max(tokenizer.token_bytes())))


def cut_document(text: str, limit: int | None) -> str:
    """`text` cut to at most `limit` characters: at the last word boundary (a space after a non-space and before a
    letter, the start of a pre-tokenization piece) at or past limit // 2, else at `limit`."""
    if limit is None or len(text) <= limit:
        return text
    lo = limit // 2
    i = text.rfind(" ", lo, limit)
    while i > 0:
        if not text[i - 1].isspace() and text[i + 1].isalpha():
            return text[:i]
        i = text.rfind(" ", lo, i)
    return text[:limit]


def _read_and_tokenize(tokenizer, bos: int, tokenizer_threads: int, row_len: int, doc_chars: int | None,
                       cached_groups: int):
    """A map_with_index function: (stream index, (path, rg)) -> (stream index, [(int32 first row_len tokens,
    token count)] per document); the last `cached_groups` row groups' results are reused, not re-read."""
    @functools.lru_cache(maxsize=cached_groups)
    def tokenize(group: tuple[str, int]):
        path, rg = group
        texts = [cut_document(t, doc_chars) for t in read_row_group_texts(open_parquet(path), rg, path)]
        ids = tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads) if texts else []
        return [(np.asarray(t[:row_len], dtype=np.int32), len(t)) for t in ids]

    return lambda index, group: (index, tokenize(tuple(group)))


class BestFitPackIterDataset(grain.IterDataset):
    """Packs tokenized row groups into (inputs, targets) batches with nanochat's BOS-aligned best-fit rule.

    `groups` is the tokenized MapDataset (elements `(stream_index, [(int32 first T+1 tokens, token count) per
    document])`), needed for
    random access on restore; `parent` is its iter dataset. `infinite=False` ends the iteration when the
    documents run out (the last partial batch is dropped).
    """

    def __init__(self, groups: grain.MapDataset, parent: grain.IterDataset, batch_size: int, seq_len: int,
                 buffer_size: int, tokenizer_batch_size: int, num_groups: int, split: str = "train",
                 paths: tuple[str, ...] = ()):
        super().__init__(parent)
        self._groups = groups
        self._batch_size, self._seq_len = batch_size, seq_len
        self._buffer_size, self._tokenizer_batch_size = buffer_size, tokenizer_batch_size
        self._num_groups = num_groups
        self._split, self._paths = split, paths  # for the error when a whole pass holds no document

    def __iter__(self) -> "BestFitPackIterator":
        return BestFitPackIterator(self)

    def __str__(self) -> str:
        return f"BestFitPackIterDataset(B={self._batch_size}, T={self._seq_len}, buffer={self._buffer_size})"


class BestFitPackIterator(grain.DatasetIterator):
    """Iterator of `BestFitPackIterDataset`; `next()` -> (inputs, targets), each int32 numpy (B, T).

    `get_state()` -> JSON-able dict; `set_state(state)` makes the following batches identical to those the
    iterator that produced `state` would have yielded next.
    """

    def __init__(self, ds: BestFitPackIterDataset):
        super().__init__(ds._parent.__iter__())
        self._ds = ds
        self._reset_buffer()
        self.epoch = 1  # epoch of the most recently read row group, counting from 1 as nanochat
        self.batches = 0
        self.cropped_tokens = 0  # tokens thrown away by crops since construction (statistics only)

    def _reset_buffer(self):
        # Buffer: documents by insertion sequence number; `_keys` is sorted by (length, -seq) so that a
        # bisect finds the longest document that fits, earliest first on ties, in O(log n).
        self._docs: dict[int, tuple[tuple, int, int]] = {}  # seq -> ((tokens, length), stream index, doc index)
        self._keys: list[tuple[int, int]] = []
        self._next_seq = 0
        self._pending: list[tuple[tuple, int, int]] = []  # read but not yet buffered, in order
        self._exhausted = False
        self._empty_run = 0  # row groups read in a row that held no document

    def _add(self, doc: tuple[np.ndarray, int], stream_idx: int, doc_idx: int):
        seq = self._next_seq
        self._next_seq += 1
        self._docs[seq] = (doc, stream_idx, doc_idx)
        bisect.insort(self._keys, (doc[1], -seq))

    def _refill(self) -> bool:
        """Move up to `tokenizer_batch_size` documents into the buffer (nanochat's refill granularity).

        Raises BadInputError when a whole pass over the row groups brought no document (every text empty):
        the repeating stream would otherwise be read forever."""
        while not self._pending:
            try:
                stream_idx, docs = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return False
            self.epoch = stream_idx // self._ds._num_groups + 1
            self._pending = [(t, stream_idx, i) for i, t in enumerate(docs)]
            self._empty_run = 0 if docs else self._empty_run + 1
            if self._empty_run >= self._ds._num_groups:
                raise _no_documents_error(self._ds._split, self._ds._paths, "every document is an empty string")
        take = self._pending[:self._ds._tokenizer_batch_size]
        del self._pending[:self._ds._tokenizer_batch_size]
        for t, s, i in take:
            self._add(t, s, i)
        return True

    def _pop(self, remaining: int) -> np.ndarray | None:
        """Best-fit choice for `remaining` free slots (whole doc, or the shortest doc cropped), or None."""
        while len(self._docs) < self._ds._buffer_size and not self._exhausted:
            self._refill()
        if not self._keys:
            return None
        i = bisect.bisect_right(self._keys, (remaining, math.inf)) - 1
        if i < 0:  # nothing fits whole: crop the shortest (earliest among equals = last of its length run)
            i = bisect.bisect_right(self._keys, (self._keys[0][0], math.inf)) - 1
        _, neg_seq = self._keys.pop(i)
        tokens, length = self._docs.pop(-neg_seq)[0]
        self.cropped_tokens += max(0, length - remaining)
        return tokens[:remaining]

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        B, T = self._ds._batch_size, self._ds._seq_len
        rows = np.empty((B, T + 1), dtype=np.int32)
        for r in range(B):
            pos = 0
            while pos < T + 1:
                doc = self._pop(T + 1 - pos)
                if doc is None:
                    raise StopIteration  # finite split ran out of documents; partial batch dropped
                rows[r, pos:pos + len(doc)] = doc
                pos += len(doc)
        self.batches += 1
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    # --- state ---------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-able dict: grain read position, buffered / pending document references, counters."""
        buffer: list[list] = []  # runs [stream index, [doc indices]] in buffer insertion order
        for _, s, i in self._docs.values():  # dict order is insertion (= seq) order
            if buffer and buffer[-1][0] == s:
                buffer[-1][1].append(i)
            else:
                buffer.append([s, [i]])
        pending = [self._pending[0][1], self._pending[0][2]] if self._pending else None
        return {"parent": self._parent.get_state(), "buffer": buffer, "pending": pending,
                "exhausted": self._exhausted, "epoch": self.epoch, "batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a `get_state()` dict (re-reads the few row groups whose documents were in flight)."""
        self._parent.set_state(state["parent"])
        self._reset_buffer()
        cache: dict[int, list[tuple]] = {}

        def docs_of(stream_idx: int) -> list[tuple]:
            if stream_idx not in cache:
                cache[stream_idx] = self._ds._groups[stream_idx][1]
            return cache[stream_idx]

        for s, idxs in state["buffer"]:
            for i in idxs:
                self._add(docs_of(s)[i], s, i)
        if state["pending"] is not None:
            s, start = state["pending"]
            self._pending = [(t, s, i) for i, t in enumerate(docs_of(s)) if i >= start]
        self._exhausted = state["exhausted"]
        self.epoch, self.batches = state["epoch"], state["batches"]


def make_pretrain_loader(tokenizer, batch_size: int, seq_len: int, split: str, process_index: int | None = None,
                         process_count: int | None = None, state: dict | None = None, buffer_size: int = 1000,
                         tokenizer_batch_size: int = 128, tokenizer_threads: int = 4, read_threads: int = 2,
                         prefetch_row_groups: int = 4, infinite: bool = True,
                         data_dir: str | None = None, doc_chars: int | None = -1) -> BestFitPackIterator:
    """Pretraining batches for this process: an iterator of (inputs, targets), int32 numpy of shape (B, T).

    Args:
        tokenizer: has `encode(list[str], prepend=int, num_threads=int) -> list[list[int]]` and
            `get_bos_token_id()` (jaxchat.tokenizer.Tokenizer).
        batch_size, seq_len: B rows per batch (this process's share of the global batch) and T tokens per
            row; each row is packed from T+1 tokens.
        split: 'train' (all shards but the last) or 'val' (the last shard).
        process_index, process_count: which share of the row groups to read; default `jax.process_index()`
            and `jax.process_count()`.
        state: a dict from `get_state()` of an earlier loader with the same arguments, to resume exactly.
        buffer_size: documents kept for best fit (nanochat: 1000); tokenizer_batch_size: documents added per
            refill (nanochat: 128).
        tokenizer_threads: `num_threads` passed to `encode`; read_threads / prefetch_row_groups: grain threads
            reading + tokenizing row groups ahead, and how many row groups they may run ahead.
        infinite: cycle over the split forever (nanochat does, for train and val); False stops after one
            pass and drops the last partial batch.
        data_dir: shard directory (default `$JAXCHAT_BASE_DIR/base_data`).
        doc_chars: cut documents to this many characters before tokenization; -1 (default): `max_doc_chars`,
            which loses nothing packing keeps (module docstring); None: no cut.

    Returns a `BestFitPackIterator` with `__next__`, `get_state()`, `set_state()`, and `.epoch` (epoch of
    the latest row group read, from 1), `.batches` (batches yielded), `.cropped_tokens` (tokens discarded
    by crops since construction; not part of the state).

    Raises:
        MissingInputError (a FileNotFoundError): no shards (names the command that creates them).
        ValueError: bad split or sizes. BadInputError (a ValueError, a UserError; names the shards and the
            command that rebuilds them): a corrupt shard (also later, from `next`, for a corrupt row group),
            fewer row groups in the split than processes, or no document in this process's share of the split
            (0 rows: at once; only empty strings: from `next`, after one pass over the row groups).
    """
    if batch_size < 1 or seq_len < 1 or buffer_size < 1 or tokenizer_batch_size < 1:
        raise ValueError(f"batch_size, seq_len, buffer_size, tokenizer_batch_size must be >= 1, got "
                         f"{batch_size}, {seq_len}, {buffer_size}, {tokenizer_batch_size}")
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    all_groups = list_row_groups(split, data_dir, with_rows=True)
    mine = all_groups[process_index::process_count]
    if not mine:
        raise BadInputError(f"the {split} split has {len(all_groups)} row groups, fewer than the {process_count} "
                            f"processes: rebuild the shards with smaller row groups (`python -m jaxchat.dataset "
                            f"... --row-group-docs N --force`) or more data")
    if not any(rows for _, _, rows in mine):  # the metadata says so: fail before reading anything
        raise _no_documents_error(split, [p for p, _, _ in mine], "0 rows")
    groups = [(path, rg) for path, rg, _ in mine]

    ds = grain.MapDataset.source(groups)
    if infinite:
        ds = ds.repeat()
    if doc_chars == -1:
        doc_chars = max_doc_chars(tokenizer, seq_len)
    ds = ds.map_with_index(_read_and_tokenize(tokenizer, tokenizer.get_bos_token_id(), tokenizer_threads,
                                              seq_len + 1, doc_chars, prefetch_row_groups + read_threads + 2))
    read = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_row_groups))
    it = BestFitPackIterDataset(ds, read, batch_size, seq_len, buffer_size, tokenizer_batch_size,
                                len(groups), split, tuple(p for p, _ in groups)).__iter__()
    if state is not None:
        it.set_state(state)
    return it
