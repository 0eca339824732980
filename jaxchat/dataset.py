"""Pretraining shards: parquet files of documents, their listing, reading and download.

The format is nanochat's (`nanochat/dataset.py`): a directory of `shard_NNNNN.parquet` files, each with a
`text` column of documents stored in row groups. Sorted by name, the LAST shard is the validation split and
all others are train. Readers work one row group at a time, which is also the unit the data loader shards
across processes (`start`/`step`).

Our shards live in `$JAXCHAT_BASE_DIR/base_data/` (nanochat uses `base_data_climbmix/`). Three ways to fill it:

    python -m jaxchat.dataset -n 170              # ClimbMix-400B shards from Hugging Face, as nanochat
    python -m jaxchat.dataset --corpus local      # ~33 MB English prose from Debian packages (offline-ish)
    python -m jaxchat.dataset --from-text a.txt docs/ ...   # your own text files

The download source can be overridden with `--base-url` or `$JAXCHAT_DATA_URL` (tests serve shards from a
local HTTP server this way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat.common import BadInputError, MissingInputError, get_base_dir, run_cli

# ClimbMix-400B, repackaged and shuffled by Karpathy (facts from nanochat/dataset.py).
BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # shard_06542.parquet is the last one, and nanochat pins it as the validation shard
DATA_DIR_NAME = "base_data"
URL_ENV = "JAXCHAT_DATA_URL"

CREATE_HINT = ("create shards with `python -m jaxchat.dataset --corpus local` (offline English corpus), "
               "`python -m jaxchat.dataset -n N` (download N ClimbMix shards) or "
               "`python -m jaxchat.dataset --from-text PATH...`")
REBUILD_HINT = ("rebuild the shards with `python -m jaxchat.dataset --corpus local --force` (or `--from-text PATH... "
                "--force`), or for ClimbMix delete the file and rerun `python -m jaxchat.dataset -n N`, which "
                "downloads the shards that are missing")


def index_to_filename(index: int) -> str:
    """`shard_00042.parquet` for index 42 (nanochat's file naming)."""
    return f"shard_{index:05d}.parquet"


def get_data_dir() -> str:
    """`$JAXCHAT_BASE_DIR/base_data`, where shards are read from and written to (not created here)."""
    return os.path.join(get_base_dir(), DATA_DIR_NAME)


# -----------------------------------------------------------------------------------------------------------
# Listing and reading

def list_parquet_files(data_dir: str | None = None) -> list[str]:
    """Full paths of all `*.parquet` files in `data_dir` (default `get_data_dir()`), sorted by name.

    Partial downloads (`*.tmp`) are ignored.

    Raises:
        FileNotFoundError: the directory is missing or holds no parquet file; the message says which
            command creates shards.
    """
    data_dir = get_data_dir() if data_dir is None else data_dir
    names = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet")) if os.path.isdir(data_dir) else []
    if not names:
        raise MissingInputError(f"no pretraining shards (*.parquet) in {data_dir}: {CREATE_HINT}")
    return [os.path.join(data_dir, f) for f in names]


def split_parquet_files(split: str, data_dir: str | None = None) -> list[str]:
    """The shards of `split`: 'train' is every shard but the last, 'val' is the last one.

    Raises:
        ValueError: unknown split, or only one shard exists (then there is no train split).
        FileNotFoundError: no shards at all.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = list_parquet_files(data_dir)
    if len(paths) < 2:
        raise BadInputError(f"need at least 2 shards in {os.path.dirname(paths[0])} (the last one is val), "
                         f"found {len(paths)}: {CREATE_HINT}")
    return paths[:-1] if split == "train" else paths[-1:]


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # pyarrow's messages span lines; a user error is one


def open_parquet(path: str) -> pq.ParquetFile:
    """Open a shard and check it has a `text` column.

    Raises:
        BadInputError (a ValueError): the file is not readable parquet or has no `text` column (the message names
            the file and how to rebuild it).
    """
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BadInputError(f"{path}: not a readable parquet file, the shard is corrupt ({_one_line(e)}); "
                            f"{REBUILD_HINT}") from e
    if "text" not in pf.schema_arrow.names:
        raise BadInputError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names}); pretraining shards "
                            f"need a string column named 'text': {REBUILD_HINT}")
    return pf


def _column_to_texts(column: pa.ChunkedArray) -> list[str]:
    """Strings of a text column, bytes decoded as UTF-8 with U+FFFD for invalid sequences, empties dropped."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        values = [b.decode("utf-8", errors="replace") if b is not None else None for b in column.to_pylist()]
    else:
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:  # a writer that skipped validation; read the raw bytes instead
            values = [b.decode("utf-8", errors="replace") if b is not None else None
                      for b in column.cast(pa.large_binary()).to_pylist()]
    return [v for v in values if v]


def read_row_group_texts(pf: pq.ParquetFile | str, rg_idx: int, path: str | None = None) -> list[str]:
    """The non-empty documents of row group `rg_idx` of a shard (list of str, in file order).

    `pf` is an open file or a path; `path` names the file in error messages when `pf` is open.

    Raises:
        BadInputError (a ValueError): the file is corrupt or has no `text` column (the message names the file and
            how to rebuild it).
    """
    if isinstance(pf, str):
        path, pf = pf, open_parquet(pf)
    try:
        table = pf.read_row_group(rg_idx, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise BadInputError(f"{path or 'parquet file'}: row group {rg_idx} is corrupt ({_one_line(e)}); "
                            f"{REBUILD_HINT}") from e
    return _column_to_texts(table.column("text"))


def list_row_groups(split: str, data_dir: str | None = None, with_rows: bool = False) -> list[tuple]:
    """Every (shard path, row group index) of `split`, in reading order (files by name, then row groups).

    With `with_rows`, (shard path, row group index, number of rows) from the files' metadata (no data read).
    """
    out = []
    for path in split_parquet_files(split, data_dir):
        meta = open_parquet(path).metadata
        out.extend((path, i, meta.row_group(i).num_rows) if with_rows else (path, i)
                   for i in range(meta.num_row_groups))
    return out


def parquets_iter_batched(split: str, start: int = 0, step: int = 1,
                          data_dir: str | None = None) -> Iterator[list[str]]:
    """Yield the documents of `split` one row group at a time (list of str per row group).

    Row groups are numbered across all shards of the split in reading order, and this yields numbers
    `start, start+step, ...`, so processes with `start=process_index, step=process_count` read disjoint
    shares. (nanochat strides within each file; striding over the concatenation balances better when
    files have few row groups and is otherwise the same.) Empty documents are skipped.

    Raises:
        FileNotFoundError: no shards; ValueError: bad split, step < 1, or a corrupt / text-less shard.
    """
    if step < 1 or start < 0:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start} step={step}")
    groups = list_row_groups(split, data_dir)
    files: dict[str, pq.ParquetFile] = {}
    for path, rg in groups[start::step]:
        if path not in files:
            files.clear()  # one open file at a time
            files[path] = open_parquet(path)
        yield read_row_group_texts(files[path], rg, path)


# -----------------------------------------------------------------------------------------------------------
# Writing

def write_shards(docs: Sequence[str], data_dir: str, shard_chars: int = 3_000_000, row_group_docs: int = 128,
                 val_chars: int | None = None, metadata: dict | None = None) -> list[str]:
    """Write documents as shards `shard_00000.parquet ...`, the last (highest number) being validation.

    The validation shard takes the FIRST `val_chars` characters of documents (default: one shard's worth
    but at most 10% of the corpus), so it is a full shard rather than a leftover; the remaining documents
    fill train shards of about `shard_chars` characters each. Each shard stores row groups of
    `row_group_docs` documents (a row group is the unit processes split between them, so the val shard
    should have at least as many row groups as processes). `metadata` (JSON-able) is stored in every
    shard's schema metadata under the key `jaxchat`.

    Returns the written paths. Raises ValueError when there are fewer than 2 documents.
    """
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise ValueError(f"need at least 2 non-empty documents to write train and val shards, got {len(docs)}")
    total = sum(len(d) for d in docs)
    val_chars = min(shard_chars, max(1, total // 10)) if val_chars is None else val_chars
    n_val, acc = 0, 0
    while n_val < len(docs) - 1 and (n_val == 0 or acc < val_chars):
        acc += len(docs[n_val])
        n_val += 1
    val_docs, train_docs = docs[:n_val], docs[n_val:]

    shards, cur, cur_chars = [], [], 0
    for d in train_docs:
        cur.append(d)
        cur_chars += len(d)
        if cur_chars >= shard_chars:
            shards.append(cur)
            cur, cur_chars = [], 0
    if cur:
        shards.append(cur)
    shards.append(val_docs)

    os.makedirs(data_dir, exist_ok=True)
    schema = pa.schema([("text", pa.string())],
                       metadata={"jaxchat": json.dumps(metadata or {})})
    paths = []
    for i, shard in enumerate(shards):
        path = os.path.join(data_dir, index_to_filename(i))
        tmp = path + ".tmp"
        table = pa.table({"text": pa.array(shard, type=pa.string())}, schema=schema)
        pq.write_table(table, tmp, row_group_size=row_group_docs, compression="zstd")
        os.replace(tmp, path)
        paths.append(path)
    return paths


# -----------------------------------------------------------------------------------------------------------
# Download (ClimbMix, as nanochat)

def _looks_like_parquet(path: str) -> bool:
    """Parquet files start and end with the magic bytes PAR1; a truncated download does not end with them."""
    size = os.path.getsize(path)
    if size < 8:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(size - 4)
        return head == b"PAR1" and f.read(4) == b"PAR1"


def download_shard(index: int, data_dir: str, base_url: str | None = None, max_attempts: int = 5,
                   backoff: float = 2.0, timeout: float = 30.0, log=print) -> bool:
    """Download `shard_{index:05d}.parquet` from `base_url` into `data_dir`; True on success.

    Skips a file that already exists (so reruns resume). Streams into `<name>.<pid>.tmp` and renames it
    into place only when complete and ending in the parquet magic, so a crash never leaves a truncated
    shard. Retries `max_attempts` times, sleeping `backoff ** attempt` seconds between tries (nanochat:
    5 tries, 2**attempt s). `base_url` defaults to `$JAXCHAT_DATA_URL`, else ClimbMix on Hugging Face.
    """
    import requests

    base_url = (base_url or os.environ.get(URL_ENV) or BASE_URL).rstrip("/")
    filename = index_to_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        return True
    url = f"{base_url}/{filename}"
    tmp = f"{path}.{os.getpid()}.tmp"
    for attempt in range(1, max_attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                expected = int(r.headers.get("Content-Length", -1))
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            got = os.path.getsize(tmp)
            if expected >= 0 and got != expected:
                raise IOError(f"short read: {got} of {expected} bytes")
            if not _looks_like_parquet(tmp):
                raise IOError("downloaded file is not parquet (no PAR1 magic)")
            os.replace(tmp, path)
            return True
        except (requests.RequestException, IOError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            log(f"attempt {attempt}/{max_attempts} failed for {filename}: {e}")
            if attempt < max_attempts:
                time.sleep(backoff ** attempt)
    log(f"giving up on {filename} after {max_attempts} attempts")
    return False


def download_shards(num_train: int, data_dir: str | None = None, num_workers: int = 4,
                    base_url: str | None = None, max_attempts: int = 5, backoff: float = 2.0) -> int:
    """Download the first `num_train` train shards (-1: all) plus the validation shard `MAX_SHARD`.

    Parallel over `num_workers` threads (I/O bound), with a tqdm bar. Returns how many shards are now
    present out of those asked for.
    """
    from tqdm import tqdm

    data_dir = get_data_dir() if data_dir is None else data_dir
    os.makedirs(data_dir, exist_ok=True)
    n = MAX_SHARD if num_train < 0 else min(num_train, MAX_SHARD)
    indices = list(range(n)) + [MAX_SHARD]
    ok = 0
    with tqdm(total=len(indices), desc="shards", unit="shard") as bar, \
            ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        futures = [pool.submit(download_shard, i, data_dir, base_url, max_attempts, backoff, log=tqdm.write)
                   for i in indices]
        for fut in futures:
            ok += bool(fut.result())
            bar.update(1)
    return ok


# -----------------------------------------------------------------------------------------------------------
# Command line

def _prepare_output_dir(data_dir: str, force: bool) -> None:
    """Refuse to mix a new corpus with existing shards unless --force (which deletes the old shards)."""
    if os.path.isdir(data_dir):
        old = [f for f in os.listdir(data_dir) if f.endswith(".parquet")]
        if old and not force:
            raise BadInputError(f"{data_dir} already holds {len(old)} shards; pass --force to replace them "
                             f"or --data-dir to write elsewhere")
        for f in old:
            os.remove(os.path.join(data_dir, f))


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Create pretraining shards: download ClimbMix (-n), build an offline "
                                            "corpus (--corpus local) or pack your own text (--from-text).")
    p.add_argument("-n", "--num-files", type=int, default=None,
                   help="download this many ClimbMix train shards (-1 = all 6542) plus the val shard")
    p.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads (default 4)")
    p.add_argument("--base-url", default=None, help=f"download source (default ${URL_ENV} or Hugging Face)")
    p.add_argument("--corpus", choices=["local"], default=None,
                   help="build an English corpus from Debian doc packages (see jaxchat/corpus.py)")
    p.add_argument("--from-text", nargs="+", metavar="PATH", default=None,
                   help="text files or directories; documents are separated by blank lines")
    p.add_argument("--doc-per-file", action="store_true", help="with --from-text: one document per file")
    p.add_argument("--max-mb", type=float, default=None, help="cap the corpus at this many MB of text")
    p.add_argument("--shard-mb", type=float, default=3.0, help="characters per shard, in millions (default 3)")
    p.add_argument("--row-group-docs", type=int, default=128, help="documents per row group (default 128)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed for built corpora")
    p.add_argument("--data-dir", default=None, help="output directory (default $JAXCHAT_BASE_DIR/base_data)")
    p.add_argument("--force", action="store_true", help="replace existing shards when building a corpus")
    args = p.parse_args(list(argv) if argv is not None else None)

    modes = sum(x is not None for x in (args.num_files, args.corpus, args.from_text))
    if modes != 1:
        p.error("give exactly one of -n/--num-files, --corpus local, --from-text PATH...")
    data_dir = args.data_dir or get_data_dir()

    if args.num_files is not None:
        print(f"downloading to {data_dir}")
        want = (MAX_SHARD if args.num_files < 0 else min(args.num_files, MAX_SHARD)) + 1
        ok = download_shards(args.num_files, data_dir, args.num_workers, args.base_url)
        print(f"done: {ok}/{want} shards in {data_dir}")
        if ok < want:
            sys.exit(1)
        return

    from jaxchat import corpus

    _prepare_output_dir(data_dir, args.force)
    t0 = time.time()
    try:  # the corpus builders' errors name the flag or path and what to do: one line for the user
        if args.corpus == "local":
            docs, sources = corpus.build_local_corpus(max_mb=args.max_mb, seed=args.seed)
        else:
            docs, sources = corpus.docs_from_text_paths(args.from_text, doc_per_file=args.doc_per_file,
                                                        max_mb=args.max_mb, seed=args.seed)
        paths = write_shards(docs, data_dir, shard_chars=int(args.shard_mb * 1e6),
                             row_group_docs=args.row_group_docs, metadata={"sources": sources, "seed": args.seed})
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from e
    except (ValueError, RuntimeError) as e:
        raise BadInputError(str(e)) from e
    chars = sum(len(d) for d in docs)
    print(json.dumps({"data_dir": data_dir, "shards": len(paths), "train_shards": len(paths) - 1,
                      "documents": len(docs), "chars": chars,
                      "mb_utf8": round(sum(len(d.encode()) for d in docs) / 1e6, 2),
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_cli(main)
