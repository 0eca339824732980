"""Train the BPE tokenizer and save it to $JAXCHAT_BASE_DIR/tokenizer (nanochat scripts/tok_train.py).

    python -m train.tokenizer                          # pretraining shards (train split), 2B chars, vocab 32768
    python -m train.tokenizer --vocab-size 4096 --max-chars 50_000_000
    python -m train.tokenizer --input docs/ notes.txt  # plain text files (or folders of them), no shards needed
    python -m train.tokenizer --input shards/x.parquet # parquet files: their `text` column, a document per row

Every document is cut to --doc-cap characters and training stops once more than --max-chars characters were
read. Writes tokenizer.pkl, token_bytes.npy and train_stats.json, prints a round-trip check and one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from typing import Iterator

import numpy as np

from jaxchat.tokenizer import SPECIAL_TOKENS, Tokenizer

SANITY_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""


def shard_documents() -> Iterator[str]:
    """Documents of the pretraining shards' train split (raises FileNotFoundError naming the download command)."""
    from jaxchat.dataset import parquets_iter_batched  # lazy: only this source needs the shards

    for batch in parquets_iter_batched(split="train"):
        yield from batch


def _input_files(paths: list[str]) -> list[str]:
    from jaxchat.common import MissingInputError  # lazy: importing common imports jax

    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files.extend(os.path.join(root, n) for n in sorted(names))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise MissingInputError(f"--input {p}: no such file or directory")
    if not files:
        raise MissingInputError(f"--input {paths}: no files found")
    return files


def file_documents(paths: list[str], doc_cap: int) -> Iterator[str]:
    """Text files (.gz decompressed, bad UTF-8 replaced) cut at line boundaries into ~doc_cap-char documents;
    parquet files (.parquet) give their `text` column, one document per row.

    Chunking rather than one document per file keeps --doc-cap from throwing away all but the head of a file.
    Raises BadInputError (one line, naming the file) for a parquet file without a `text` column or a corrupt one.
    """
    for path in _input_files(paths):
        if path.endswith(".parquet"):  # binary: read as text it would be one document of raw bytes
            import pyarrow.parquet as pq

            from jaxchat.common import BadInputError
            from jaxchat.dataset import open_parquet, read_row_group_texts

            try:
                names = pq.read_schema(path).names
            except Exception:  # not readable parquet: open_parquet says so, naming the file
                names = None
            if names is not None and "text" not in names:
                raise BadInputError(f"--input {path}: this parquet file has no 'text' column (columns: {names}); "
                                    f"train.tokenizer reads a parquet file's documents from its 'text' column")
            pf = open_parquet(path)
            for rg in range(pf.num_row_groups):
                yield from read_row_group_texts(pf, rg, path)
            continue
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            buf, n = [], 0
            for line in f:
                buf.append(line)
                n += len(line)
                if n >= doc_cap:
                    yield "".join(buf)
                    buf, n = [], 0
            if buf:
                yield "".join(buf)


def capped(docs: Iterator[str], max_chars: int, doc_cap: int, counter: dict) -> Iterator[str]:
    """Crop each document to doc_cap chars; stop after the document that takes the total past max_chars."""
    for doc in docs:
        doc = doc[:doc_cap]
        counter["chars"] += len(doc)
        counter["docs"] += 1
        yield doc
        if counter["chars"] > max_chars:
            return


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train a GPT-4-style BPE tokenizer (rustbpe) for jaxchat")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size including the 9 special tokens")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop every document to this many characters")
    parser.add_argument("--input", nargs="+", default=None, metavar="PATH",
                        help="train on these text or parquet files/folders instead of the pretraining shards")
    args = parser.parse_args(argv)
    if args.doc_cap <= 0 or args.max_chars <= 0:
        parser.error("--doc-cap and --max-chars must be positive")
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (the 256 bytes and the "
                     f"{len(SPECIAL_TOKENS)} special tokens)")

    from jaxchat.common import get_base_dir

    print(f"vocab_size: {args.vocab_size:,}  max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  "
          f"source: {'files ' + ' '.join(args.input) if args.input else 'shards (train split)'}", flush=True)
    docs = file_documents(args.input, args.doc_cap) if args.input else shard_documents()
    counter = {"chars": 0, "docs": 0}

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(capped(docs, args.max_chars, args.doc_cap, counter), args.vocab_size)
    train_time = time.time() - t0
    print(f"Training time: {train_time:.2f}s on {counter['docs']:,} documents, {counter['chars']:,} chars "
          f"({counter['chars'] / max(train_time, 1e-9) / 1e6:.2f} M chars/s)", flush=True)

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(tokenizer_dir)
    print(f"Saved tokenizer to {tokenizer_dir}")

    ids = tokenizer.encode(SANITY_TEXT)
    if tokenizer.decode(ids) != SANITY_TEXT:
        raise RuntimeError("sanity check failed: decode(encode(text)) != text")
    print(f"Sanity check: round trip OK ({len(SANITY_TEXT.encode('utf-8'))} bytes -> {len(ids)} tokens)")

    token_bytes = tokenizer.token_bytes()
    nonzero = token_bytes[token_bytes > 0].astype(np.float64)
    stats = {
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": args.vocab_size,
        "num_special_tokens": len(tokenizer.get_special_tokens()),
        "train_time_s": round(train_time, 3),
        "train_chars": counter["chars"],
        "train_docs": counter["docs"],
        "max_chars": args.max_chars,
        "doc_cap": args.doc_cap,
        "source": "files" if args.input else "shards",
        "token_bytes_min": int(nonzero.min()),
        "token_bytes_max": int(nonzero.max()),
        "token_bytes_mean": round(float(nonzero.mean()), 4),
        "token_bytes_std": round(float(nonzero.std(ddof=1)), 4),
    }
    with open(os.path.join(tokenizer_dir, "train_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print(f"Saved token_bytes to {os.path.join(tokenizer_dir, 'token_bytes.npy')}")
    print(json.dumps({"event": "tokenizer_train", **stats}), flush=True)
    from jaxchat.report import get_report

    get_report().log(section="Tokenizer training", data=[stats])
    return stats


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
