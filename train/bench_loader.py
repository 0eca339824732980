"""Packing throughput of the pretraining loader: prints one JSON line.

    python -m train.bench_loader [--batch-size 32 --seq-len 2048 --batches 40]

Measures tokens/s of the full pipeline (parquet read + tokenize + best-fit pack, jaxchat/dataloader.py) and
of packing alone (the same documents with their token ids looked up from a cache), plus the fraction of
tokens discarded by crops (nanochat reports ~35% at T=2048 on its web text). Uses the tokenizer in
$JAXCHAT_BASE_DIR/tokenizer, or trains a throwaway one on the first train shard when there is none.
Shards must exist (`python -m jaxchat.dataset --corpus local`).
"""

from __future__ import annotations

import argparse
import json
import time

from jaxchat.dataloader import make_pretrain_loader
from jaxchat.dataset import parquets_iter_batched


def get_or_train_tokenizer(vocab_size: int, data_dir: str | None):
    """The saved tokenizer, else one trained with rustbpe on the first train shard (not saved)."""
    from jaxchat.tokenizer import Tokenizer, get_tokenizer

    try:
        return get_tokenizer(), "saved"
    except FileNotFoundError:
        texts = [d for g in parquets_iter_batched("train", data_dir=data_dir) for d in g][:20000]
        return Tokenizer.train_from_iterator(texts, vocab_size), f"trained on the fly (vocab {vocab_size})"


class CachedTokenizer:
    """Looks token ids up instead of encoding, so the benchmark can time packing alone."""

    def __init__(self, tokenizer, cache):
        self.tokenizer, self.cache = tokenizer, cache

    def get_bos_token_id(self):
        return self.tokenizer.get_bos_token_id()

    def encode(self, texts, prepend=None, num_threads=1):
        return [self.cache[t] for t in texts]


def run(tokenizer, args, n_batches):
    it = make_pretrain_loader(tokenizer, args.batch_size, args.seq_len, "train", 0, 1,
                              buffer_size=args.buffer_size, tokenizer_threads=args.tokenizer_threads,
                              read_threads=args.read_threads, data_dir=args.data_dir)
    next(it)  # warm-up: fills the document buffer
    cropped0 = it.cropped_tokens
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    tokens = n_batches * args.batch_size * args.seq_len
    # each row packs T+1 tokens; cropped / (cropped + packed) is the share of tokenized text thrown away
    packed = n_batches * args.batch_size * (args.seq_len + 1)
    return tokens / dt, (it.cropped_tokens - cropped0) / (it.cropped_tokens - cropped0 + packed)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--buffer-size", type=int, default=1000)
    p.add_argument("--tokenizer-threads", type=int, default=4)
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=32768, help="for a tokenizer trained on the fly")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    t0 = time.perf_counter()
    tokenizer, how = get_or_train_tokenizer(args.vocab_size, args.data_dir)
    t_tok = time.perf_counter() - t0
    full_tps, crop = run(tokenizer, args, args.batches)

    # packing alone: pre-tokenize every train document once, then run the same loader on cached ids
    texts = [d for g in parquets_iter_batched("train", data_dir=args.data_dir) for d in g]
    bos = tokenizer.get_bos_token_id()
    t0 = time.perf_counter()
    ids = tokenizer.encode(texts, prepend=bos, num_threads=args.tokenizer_threads)
    encode_tps = sum(map(len, ids)) / (time.perf_counter() - t0)
    pack_tps, _ = run(CachedTokenizer(tokenizer, dict(zip(texts, ids))), args, args.batches)

    print(json.dumps({"bench": "loader", "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "batches": args.batches, "buffer_size": args.buffer_size, "tokenizer": how,
                      "tokenizer_seconds": round(t_tok, 1), "tokens_per_sec": round(full_tps),
                      "pack_only_tokens_per_sec": round(pack_tps), "encode_tokens_per_sec": round(encode_tps),
                      "cropped_fraction": round(crop, 3)}))


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
