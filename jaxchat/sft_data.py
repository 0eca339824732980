"""SFT data: chat conversations packed into fixed-length rows with loss masks.

The packing rule is nanochat's (`scripts/chat_sft.py`, `sft_data_generator_bos_bestfit`):
- every conversation is rendered with `Tokenizer.render_conversation` -> (ids, mask), mask 1 exactly on the tokens
  the assistant must produce (its text, its python calls, <|assistant_end|>), 0 on BOS, user turns,
  <|assistant_start|> and tool outputs;
- a row holds max_seq_len + 1 tokens (the +1 is the last target) and starts with a conversation's BOS;
- rows are filled best-fit from a buffer of 100 rendered conversations: repeatedly take the LONGEST conversation that
  still fits entirely in the space left; when none fits, the rest of the row is padded with BOS tokens (mask 0), so
  no conversation is ever split across rows;
- inputs = row[:-1], targets = row[1:] with -1 wherever mask[1:] == 0 (prompts, tool outputs, padding).

A conversation longer than a whole row could never fit; nanochat crops it at render time (render_conversation's
max_tokens) and so do we: it is cut to one full row, and `SFTPacker.cropped` counts how many were (the training
script prints the count), so nothing is cut silently.

Each rank (in jaxchat: each device of the data axis, numbered across processes) reads the dataset at
rank, rank + world_size, ... exactly as nanochat's ranks do; `SFTLoader` stacks the rows of the local ranks into one
host batch. An epoch ends when the conversations consumed (not merely buffered) reach the dataset size; that, or
reaching `num_iterations`, sets `last_step`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BUFFER_SIZE = 100  # rendered conversations the best-fit search chooses from (nanochat: 100)


def best_fit_index(lengths: Sequence[int], remaining: int) -> int:
    """Index of the longest length <= remaining (the first of equals), or -1 when none fits."""
    best, best_len = -1, 0
    for i, n in enumerate(lengths):
        if best_len < n <= remaining:
            best, best_len = i, n
    return best


def rows_to_batch(rows: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 (B, T) from packed rows and masks (B, T + 1); targets -1 where mask[:, 1:] == 0."""
    rows = np.asarray(rows, np.int32)
    inputs = rows[:, :-1]
    targets = np.where(np.asarray(masks)[:, 1:] != 0, rows[:, 1:], -1).astype(np.int32)
    return np.ascontiguousarray(inputs), targets


class SFTPacker:
    """One rank's endless stream of packed SFT rows (nanochat `sft_data_generator_bos_bestfit`).

    Args:
        dataset: indexable, sized collection of conversations (a Task / TaskMixture: `len`, `ds[i]`).
        tokenizer: a `jaxchat.tokenizer.Tokenizer` (render_conversation, get_bos_token_id).
        batch_size: rows per batch (nanochat's device_batch_size).
        max_seq_len: tokens per row of inputs; rows hold max_seq_len + 1 tokens.
        rank, world_size: this rank reads conversations rank, rank + world_size, ...
        buffer_size: rendered conversations kept for the best-fit search.
        num_iterations: > 0 ends the epoch after that many batches (train split); -1 runs one full epoch.
        track_epoch: False for validation streams (they wrap around forever and never set last_step).
    Attributes (updated by every `next_rows`):
        it: batches produced; epoch: 1-based epoch of the fetch cursor; consumed: conversations packed, counting
        world_size per conversation as nanochat; last_step: the training run should stop after this batch;
        approx_progress: 0 -> 1 over the run; cropped: distinct conversations cut to fit one row; padded_tokens, tokens:
        padding and total tokens emitted (the packing efficiency is 1 - padded_tokens / tokens).
    Raises:
        ValueError: empty dataset, or a non-positive size.
    """

    def __init__(self, dataset, tokenizer, batch_size: int, max_seq_len: int, rank: int = 0, world_size: int = 1,
                 buffer_size: int = BUFFER_SIZE, num_iterations: int = -1, track_epoch: bool = True):
        if len(dataset) == 0:
            raise ValueError("SFT dataset is empty: check --mixture and that its data files are present")
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len), ("world_size", world_size),
                            ("buffer_size", buffer_size)):
            if value < 1:
                raise ValueError(f"SFTPacker: {name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"SFTPacker: rank {rank} not in [0, {world_size})")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.row_capacity = max_seq_len + 1
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.num_iterations, self.track_epoch = buffer_size, num_iterations, track_epoch
        self.bos = tokenizer.get_bos_token_id()
        self.buffer: list[tuple[list[int], list[int]]] = []
        self.cursor = rank
        self.consumed = rank
        self.epoch = 1
        self.it = 0
        self.last_step = False
        self.approx_progress = 0.0
        self._cropped: set[int] = set()
        self.padded_tokens = 0
        self.tokens = 0

    @property
    def cropped(self) -> int:
        """Distinct conversations (dataset indices) that were cut to fit one row."""
        return len(self._cropped)

    def _render(self, index: int) -> tuple[list[int], list[int]]:
        # Render without a limit, then cut to one row ourselves so that cropping is counted.
        ids, mask = self.tokenizer.render_conversation(self.dataset[index], max_tokens=1 << 62)
        if len(ids) > self.row_capacity:
            self._cropped.add(index)
            ids, mask = ids[: self.row_capacity], mask[: self.row_capacity]
        return ids, mask

    def _refill(self) -> None:
        n = len(self.dataset)
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._render(self.cursor))
            self.cursor += self.world_size
            if self.cursor >= n:
                self.cursor %= n
                self.epoch += 1

    def _pack_row(self) -> tuple[list[int], list[int]]:
        row: list[int] = []
        mask: list[int] = []
        while len(row) < self.row_capacity:
            self._refill()
            remaining = self.row_capacity - len(row)
            i = best_fit_index([len(ids) for ids, _ in self.buffer], remaining)
            if i < 0:  # nothing fits: pad rather than split a conversation
                row.extend([self.bos] * remaining)
                mask.extend([0] * remaining)
                self.padded_tokens += remaining
                break
            ids, m = self.buffer.pop(i)
            row.extend(ids)
            mask.extend(m)
            self.consumed += self.world_size
        self.tokens += self.row_capacity
        return row, mask

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch as packed rows: ids int32 (batch_size, max_seq_len + 1), mask int8 (same shape)."""
        packed = [self._pack_row() for _ in range(self.batch_size)]
        rows = np.array([r for r, _ in packed], np.int32)
        masks = np.array([m for _, m in packed], np.int8)
        self.it += 1
        if self.track_epoch:
            if 0 < self.num_iterations <= self.it:
                self.last_step = True
            if self.num_iterations > 0:
                self.approx_progress = self.it / self.num_iterations
            else:
                self.approx_progress = self.consumed / len(self.dataset)
            if self.consumed >= len(self.dataset):
                self.last_step = True
        return rows, masks

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) int32 (batch_size, max_seq_len); targets -1 where nothing is trained."""
        return rows_to_batch(*self.next_rows())

    def state_dict(self) -> dict:
        """Counters for logging and checkpoint metadata (the buffer itself is not saved)."""
        return {"rank": self.rank, "cursor": self.cursor, "consumed": self.consumed, "epoch": self.epoch,
                "it": self.it, "cropped": self.cropped, "padded_tokens": self.padded_tokens, "tokens": self.tokens}


class SFTLoader:
    """The host's share of a global SFT batch: one `SFTPacker` per local data-parallel rank, rows stacked.

    Args:
        dataset, tokenizer, device_batch_size, max_seq_len, buffer_size, num_iterations, track_epoch: as SFTPacker.
        ranks: the global data-parallel ranks this host feeds (e.g. the indices of its devices on the data axis).
        world_size: number of data-parallel ranks in total.
    `__next__` returns (inputs, targets) int32 (len(ranks) * device_batch_size, max_seq_len), rank-major. The run
    ends (`last_step`) as soon as any local rank's epoch ends; across processes the caller must still agree
    (nanochat all-reduces with MAX).
    """

    def __init__(self, dataset, tokenizer, device_batch_size: int, max_seq_len: int, ranks: Sequence[int],
                 world_size: int, buffer_size: int = BUFFER_SIZE, num_iterations: int = -1, track_epoch: bool = True):
        if not ranks:
            raise ValueError("SFTLoader needs at least one rank")
        self.packers = [SFTPacker(dataset, tokenizer, device_batch_size, max_seq_len, r, world_size, buffer_size,
                                  num_iterations, track_epoch) for r in ranks]

    @property
    def last_step(self) -> bool:
        return any(p.last_step for p in self.packers)

    @property
    def approx_progress(self) -> float:
        return self.packers[0].approx_progress

    @property
    def epoch(self) -> int:
        return self.packers[0].epoch

    @property
    def cropped(self) -> int:
        return sum(p.cropped for p in self.packers)

    @property
    def padding_fraction(self) -> float:
        tokens = sum(p.tokens for p in self.packers)
        return sum(p.padded_tokens for p in self.packers) / max(tokens, 1)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [next(p) for p in self.packers]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

    def state_dict(self) -> dict:
        return {"ranks": [p.state_dict() for p in self.packers]}
