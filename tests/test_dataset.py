"""Tests for jaxchat/dataset.py and jaxchat/corpus.py: shard format, reading, errors, download, text import."""

import http.server
import io
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxchat import corpus, dataset
from jaxchat.common import UserError
from jaxchat.dataset import (list_parquet_files, parquets_iter_batched, read_row_group_texts, split_parquet_files,
                             write_shards)


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv(dataset.URL_ENV, raising=False)
    return tmp_path


def test_no_shards_names_the_command(base):
    with pytest.raises(FileNotFoundError, match=r"python -m jaxchat.dataset --corpus local"):
        list_parquet_files()
    os.makedirs(base / "base_data")
    with pytest.raises(FileNotFoundError, match=r"-n N"):
        list(parquets_iter_batched("train"))


def test_write_and_read_shards_split_and_striding(base):
    docs = [f"document number {i} " * (1 + i % 7) for i in range(500)]
    paths = write_shards(docs, dataset.get_data_dir(), shard_chars=5000, row_group_docs=8, val_chars=3000,
                         metadata={"sources": [{"name": "x", "licence": "MIT"}]})
    assert [os.path.basename(p) for p in paths] == [dataset.index_to_filename(i) for i in range(len(paths))]
    assert len(paths) >= 4 and list_parquet_files() == paths
    assert split_parquet_files("val") == paths[-1:] and split_parquet_files("train") == paths[:-1]
    meta = json.loads(pq.ParquetFile(paths[0]).schema_arrow.metadata[b"jaxchat"])
    assert meta["sources"][0]["licence"] == "MIT"

    train = [d for g in parquets_iter_batched("train") for d in g]
    val = [d for g in parquets_iter_batched("val") for d in g]
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert sum(map(len, val)) >= 3000  # val is a full shard, not a leftover
    assert all(len(g) <= 8 for g in parquets_iter_batched("train"))  # one yield per row group

    shares = [[d for g in parquets_iter_batched("train", start=p, step=3) for d in g] for p in range(3)]
    assert sorted(shares[0] + shares[1] + shares[2]) == sorted(train)
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])
    with pytest.raises(ValueError, match="split"):
        list(parquets_iter_batched("test"))


def test_empty_docs_skipped_and_invalid_utf8_replaced(tmp_path):
    path = str(tmp_path / "bin.parquet")
    pq.write_table(pa.table({"text": pa.array([b"good", b"", None, b"bad \xff\xfe end"], type=pa.binary())}), path)
    assert read_row_group_texts(path, 0) == ["good", "bad \ufffd\ufffd end"]
    # a string column holding invalid UTF-8 (a writer that skipped validation)
    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00\x04\x00"
                                                                    b"\x00\x00"), pa.py_buffer(b"ok\xc3(")])
    path2 = str(tmp_path / "str.parquet")
    pq.write_table(pa.table({"text": bad}), path2)
    assert read_row_group_texts(path2, 0) == ["ok", "\ufffd("]


def test_corrupt_and_schemaless_shards_name_the_file(base):
    d = base / "base_data"
    os.makedirs(d)
    (d / "shard_00000.parquet").write_bytes(b"this is not parquet at all")
    pq.write_table(pa.table({"content": ["a", "b"]}), str(d / "shard_00001.parquet"))
    pq.write_table(pa.table({"text": ["x", "y"]}), str(d / "shard_00002.parquet"))
    with pytest.raises(ValueError, match="shard_00000.parquet.*not a readable parquet"):
        list(parquets_iter_batched("train"))
    os.remove(d / "shard_00000.parquet")
    with pytest.raises(ValueError, match="shard_00001.parquet.*no 'text' column"):
        list(parquets_iter_batched("train"))


# -------------------------------------------------------------------------------------------------------------
# Download against a local HTTP server

def tiny_parquet_bytes():
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["hello world", "second doc"]}), buf)
    return buf.getvalue()


@pytest.fixture
def server():
    """Serves the same tiny parquet at any /shard_*.parquet; `fail` maps filename -> failures still to inject."""
    payload = tiny_parquet_bytes()
    state = {"requests": [], "fail": {}, "truncate": set()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            state["requests"].append(name)
            if state["fail"].get(name, 0) > 0:
                state["fail"][name] -= 1
                self.send_error(503)
                return
            body = payload[: len(payload) // 2] if name in state["truncate"] else payload
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/data"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_download_retries_then_succeeds(base, server):
    out = str(base / "dl")
    os.makedirs(out)
    server["fail"]["shard_00003.parquet"] = 2
    assert dataset.download_shard(3, out, server["url"], max_attempts=3, backoff=0.01, log=lambda *_: None)
    assert server["requests"].count("shard_00003.parquet") == 3
    assert pq.read_table(os.path.join(out, "shard_00003.parquet")).column("text").to_pylist()[0] == "hello world"
    assert os.listdir(out) == ["shard_00003.parquet"]  # no temp file left behind


def test_download_gives_up_and_leaves_no_partial_file(base, server):
    out = str(base / "dl")
    os.makedirs(out)
    server["truncate"].add("shard_00001.parquet")  # served half a file: never renamed into place
    server["fail"]["shard_00002.parquet"] = 99
    for i in (1, 2):
        assert not dataset.download_shard(i, out, server["url"], max_attempts=2, backoff=0.01, log=lambda *_: None)
    assert os.listdir(out) == []


def test_download_cli_resumes_and_fetches_val_shard(base, server, monkeypatch):
    data_dir = base / "base_data"
    os.makedirs(data_dir)
    (data_dir / "shard_00000.parquet").write_bytes(tiny_parquet_bytes())  # already there from an earlier run
    monkeypatch.setenv(dataset.URL_ENV, server["url"])
    dataset.main(["-n", "3", "-w", "2"])
    assert sorted(server["requests"]) == ["shard_00001.parquet", "shard_00002.parquet", "shard_06542.parquet"]
    assert [os.path.basename(p) for p in list_parquet_files()][-1] == "shard_06542.parquet"  # val is last
    assert [len(g) for g in parquets_iter_batched("val")] == [2]
    server["requests"].clear()
    dataset.main(["-n", "3"])  # everything present: nothing downloaded
    assert server["requests"] == []


# -------------------------------------------------------------------------------------------------------------
# Building corpora

def test_from_text_round_trip(base):
    src = base / "texts"
    os.makedirs(src / "sub")
    paras = [f"Paragraph {i} says something about topic {i % 5}.\nIt has a second line." for i in range(60)]
    (src / "a.txt").write_text("\n\n".join(paras[:30]) + "\n")
    (src / "sub" / "b.md").write_text("\n\n  \n".join(paras[30:]) + "\n\n\n" + paras[0] + "\n")  # one duplicate
    dataset.main(["--from-text", str(src), "--shard-mb", "0.0005", "--row-group-docs", "4"])
    files = list_parquet_files()
    assert len(files) >= 3
    got = [d for s in ("train", "val") for g in parquets_iter_batched(s) for d in g]
    assert sorted(got) == sorted(paras)  # every paragraph exactly once, text unchanged
    meta = json.loads(pq.ParquetFile(files[0]).schema_arrow.metadata[b"jaxchat"])
    assert {os.path.basename(s["name"]) for s in meta["sources"]} == {"a.txt", "b.md"}

    with pytest.raises(UserError, match="already holds.*--force"):  # refuses to mix with the existing shards
        dataset.main(["--from-text", str(src)])
    dataset.main(["--from-text", str(src), "--doc-per-file", "--force"])
    got = [d for s in ("train", "val") for g in parquets_iter_batched(s) for d in g]
    assert len(got) == 2 and any(d.startswith("Paragraph 0 ") and "Paragraph 29" in d for d in got)
    with pytest.raises(FileNotFoundError, match="no-such"):
        dataset.main(["--from-text", str(src / "no-such"), "--force"])


def test_paragraph_grouping_dedupe_and_prose_filter():
    long = "This paragraph is long enough to be deduplicated across files, being over eighty chars."
    seen = set()
    pars = ["Short one.", long, "| 0x1f | 0x2e | 0x3d | 0x4c |", "Another short paragraph here.", long]
    docs = corpus.paragraphs_to_docs(pars, max_doc_chars=60, seen=seen)
    assert docs == ["Short one.", long, "Another short paragraph here."]
    assert corpus.paragraphs_to_docs([long], 6000, seen) == []  # seen in an earlier file


def test_local_corpus_without_apt_gives_clear_error(base, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get.*--from-text"):
        corpus.build_local_corpus(max_mb=1)
