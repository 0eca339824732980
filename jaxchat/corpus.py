"""Build a pretraining corpus without the open internet: English prose from Debian packages or local files.

`python -m jaxchat.dataset --corpus local` calls `build_local_corpus`. It fetches documentation packages
with `apt-get download` (no root, no install) and unpacks them with `dpkg-deb -x` into
`$JAXCHAT_BASE_DIR/corpus_cache/`, so a second build is offline. Sources (about 33 MB of text after
cleaning and deduplication; see /work/shared/ENVIRONMENT.md):

    linux-doc-6.1     Linux kernel documentation (reStructuredText), English only   GPL-2.0
    python3.11-doc    Python 3.11 documentation sources (reStructuredText)          PSF-2.0
    jargon-text       The Jargon File 4.4.7                                          public domain
    fortunes          fortune-mod cookies (the package without offensive ones)       BSD

Processing: files are split into paragraphs on blank lines; paragraphs that are mostly not letters (tables,
ASCII art, hex dumps) are dropped; paragraphs of 80+ characters seen before are dropped (licence headers and
boilerplate repeat across files); consecutive paragraphs are grouped into documents of at most
`max_doc_chars` characters (long files would otherwise be one document far longer than a training row,
and the best-fit packer crops and discards what does not fit); exact duplicate documents are dropped; the
documents are shuffled with a fixed seed and cut at `max_mb`. Each source and its licence go into the shard
metadata.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import random
import re
import shlex
import shutil
import subprocess
from typing import Iterable, Iterator

from jaxchat.common import get_base_dir

# (name, package alternatives, glob patterns inside the unpacked tree, licence, kind)
SOURCES = [
    ("linux-doc", ["linux-doc-6.1", "linux-doc"], ["usr/share/doc/linux-doc*/Documentation/**/*.rst*"],
     "GPL-2.0", "paragraphs"),
    ("python-doc", ["python3.11-doc", "python3-doc"], ["usr/share/doc/python3*/html/_sources/**/*.rst.txt"],
     "PSF-2.0", "paragraphs"),
    ("jargon-file", ["jargon-text"], ["usr/share/doc/jargon-text/jargon.txt*"], "public domain", "paragraphs"),
    ("fortunes", ["fortunes"], ["usr/share/games/fortunes/*"], "BSD-4-Clause-UC", "fortunes"),
]

_PARA_SPLIT = re.compile(r"\n[ \t]*\n")


def _read_text(path: str) -> str:
    """File contents as str (gzip by magic bytes), invalid UTF-8 replaced."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _is_prose(par: str) -> bool:
    """At least half the non-space characters are letters (drops tables, rules, ASCII art, dumps)."""
    chars = [c for c in par if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) >= 0.5 * len(chars)


def paragraphs_to_docs(paragraphs: Iterable[str], max_doc_chars: int, seen: set[bytes] | None = None) -> list[str]:
    """Group consecutive paragraphs into documents of at most `max_doc_chars` characters (a single longer
    paragraph becomes its own document). With `seen`, paragraphs of 80+ chars already seen are dropped."""
    docs, cur, cur_len = [], [], 0
    for par in paragraphs:
        par = par.strip("\n")
        if not par.strip() or not _is_prose(par):
            continue
        if seen is not None and len(par) >= 80:
            h = hashlib.blake2b(" ".join(par.split()).encode(), digest_size=12).digest()
            if h in seen:
                continue
            seen.add(h)
        if cur and cur_len + len(par) + 2 > max_doc_chars:
            docs.append("\n\n".join(cur))
            cur, cur_len = [], 0
        cur.append(par)
        cur_len += len(par) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _dedupe_shuffle_cap(docs: list[str], max_mb: float | None, seed: int) -> list[str]:
    """Drop exact duplicates (first kept), shuffle with `seed`, keep documents until `max_mb` MB of UTF-8."""
    seen, unique = set(), []
    for d in docs:
        h = hashlib.blake2b(d.encode(), digest_size=16).digest()
        if h not in seen:
            seen.add(h)
            unique.append(d)
    random.Random(seed).shuffle(unique)
    if max_mb is None:
        return unique
    out, size, cap = [], 0, int(max_mb * 1e6)
    for d in unique:
        if size >= cap:
            break
        out.append(d)
        size += len(d.encode())
    return out


# -----------------------------------------------------------------------------------------------------------
# Debian packages

def _run(cmd: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_deb(packages: list[str], cache_dir: str, members: list[str] | None = None) -> tuple[str, str]:
    """Download and unpack the first available package of `packages`; returns (unpacked dir, package file).

    Uses `apt-get download` (needs no root) and `dpkg-deb --fsys-tarfile | tar -x` (installs nothing),
    extracting only the paths matching the tar wildcards `members` (all when None: linux-doc's HTML alone
    is 180 MB); the .deb is deleted after unpacking. Reuses an earlier unpack. If apt's package lists are
    missing it runs `apt-get update` when root.

    Raises:
        RuntimeError: no apt-get / dpkg-deb on this machine, or none of the packages can be downloaded
            (the message says what to run).
    """
    for name in packages:
        done = os.path.join(cache_dir, name, ".unpacked")
        if os.path.exists(done):
            return os.path.dirname(done), open(done).read().strip()
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError("--corpus local needs a Debian/Ubuntu machine (apt-get and dpkg-deb); elsewhere use "
                           "`python -m jaxchat.dataset --from-text PATH...` or `-n N` to download ClimbMix")
    debs = os.path.join(cache_dir, "debs")
    os.makedirs(debs, exist_ok=True)
    os.chmod(debs, 0o777)  # lets apt's unprivileged _apt user write there when we are root (else a warning)
    errors = []
    updated = False
    for name in packages:
        for _ in range(2):
            r = _run(["apt-get", "download", name], cwd=debs)
            if r.returncode == 0:
                break
            errors.append(f"{name}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            if updated:
                break
            if os.geteuid() != 0:
                break
            updated = True
            _run(["apt-get", "update", "-qq"])
        if r.returncode != 0:
            continue
        files = sorted(glob.glob(os.path.join(debs, f"{name}_*.deb")), key=os.path.getmtime)
        if not files:
            errors.append(f"{name}: apt-get download left no .deb")
            continue
        out = os.path.join(cache_dir, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        tar = f"tar -x -C {shlex.quote(out)}"
        if members:
            tar += " --wildcards " + " ".join(shlex.quote("./" + m) for m in members)
        r = subprocess.run(f"set -o pipefail; dpkg-deb --fsys-tarfile {shlex.quote(files[-1])} | {tar}",
                           shell=True, executable="/bin/bash", capture_output=True, text=True)
        if r.returncode != 0:
            errors.append(f"{name}: unpacking failed: {r.stderr.strip()}")
            continue
        deb = os.path.basename(files[-1])
        os.remove(files[-1])
        with open(os.path.join(out, ".unpacked"), "w") as f:
            f.write(deb)
        return out, deb
    hint = ("run `sudo apt-get update` first, then retry" if os.geteuid() != 0
            else "check that the Debian package mirrors are reachable")
    raise RuntimeError(f"could not download any of {packages} ({'; '.join(errors)}): {hint}")


def _source_docs(root: str, patterns: list[str], kind: str, max_doc_chars: int, seen: set[bytes]) -> list[str]:
    """Documents of one unpacked package (files in sorted order so the build is reproducible)."""
    files = sorted({f for pat in patterns for f in glob.glob(os.path.join(root, pat), recursive=True)})
    docs, read = [], set()
    for path in files:
        if not os.path.isfile(path) or "/translations/" in path or path.endswith((".dat", ".u8")):
            continue
        if os.path.realpath(path) in read:  # packages symlink directories (python3.11-doc/html -> ...)
            continue
        read.add(os.path.realpath(path))
        text = _read_text(path)
        if kind == "fortunes":  # one cookie per document, cookies separated by lines holding only '%'
            docs.extend(d for d in (c.strip("\n") for c in re.split(r"\n%\n", text)) if d.strip())
        else:
            docs.extend(paragraphs_to_docs(_PARA_SPLIT.split(text), max_doc_chars, seen))
    return docs


def build_local_corpus(max_mb: float | None = None, seed: int = 42, max_doc_chars: int = 6000,
                       cache_dir: str | None = None) -> tuple[list[str], list[dict]]:
    """Assemble the offline English corpus described in the module docstring.

    Returns (documents, sources): shuffled, deduplicated documents (list of str, at most `max_mb` MB of
    UTF-8 when given) and one dict per source {name, package, licence, documents, chars} for the shard
    metadata. `cache_dir` defaults to `$JAXCHAT_BASE_DIR/corpus_cache`.

    Raises:
        RuntimeError: no source could be fetched (no apt, stale package lists, no mirror).
    """
    cache_dir = cache_dir or os.path.join(get_base_dir(), "corpus_cache")
    os.makedirs(cache_dir, exist_ok=True)
    seen: set[bytes] = set()
    all_docs, sources, failures = [], [], []
    for name, packages, patterns, licence, kind in SOURCES:
        try:
            # extract the directories holding the matched files: the glob up to its '**' or last '/'
            members = [pat.split("**")[0].rstrip("/") + "/*" if "**" in pat else pat for pat in patterns]
            root, deb = fetch_deb(packages, cache_dir, members)
        except RuntimeError as e:
            failures.append(str(e))
            continue
        docs = _source_docs(root, patterns, kind, max_doc_chars, seen)
        all_docs.extend(docs)
        sources.append({"name": name, "package": deb, "licence": licence, "documents": len(docs),
                        "chars": sum(len(d) for d in docs)})
    if not all_docs:
        raise RuntimeError("no corpus source could be fetched:\n" + "\n".join(failures))
    for f in failures:
        print(f"warning: skipped a source: {f}")
    return _dedupe_shuffle_cap(all_docs, max_mb, seed), sources


# -----------------------------------------------------------------------------------------------------------
# Local text files

def _walk(paths: Iterable[str]) -> Iterator[str]:
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in sorted(filenames):
                    if not f.startswith("."):
                        yield os.path.join(dirpath, f)
        elif os.path.isfile(p):
            yield p
        else:
            raise FileNotFoundError(f"--from-text: no such file or directory: {p}")


def docs_from_text_paths(paths: Iterable[str], doc_per_file: bool = False, max_mb: float | None = None,
                         seed: int = 42) -> tuple[list[str], list[dict]]:
    """Documents from text files (directories are walked recursively; `.gz` files are decompressed).

    Each blank-line-separated block of a file is one document, or each whole file with `doc_per_file`.
    Invalid UTF-8 is replaced, empty documents and exact duplicates dropped, the rest shuffled with `seed`
    and cut at `max_mb`. Returns (documents, sources) as `build_local_corpus`.

    Raises:
        FileNotFoundError: a path does not exist. ValueError: the files hold no text.
    """
    paths = list(paths)
    docs, sources = [], []
    for path in _walk(paths):
        text = _read_text(path)
        parts = [text.strip()] if doc_per_file else [b.strip() for b in _PARA_SPLIT.split(text)]
        parts = [p for p in parts if p]
        docs.extend(parts)
        sources.append({"name": path, "licence": "unknown", "documents": len(parts)})
    if not docs:
        raise ValueError(f"--from-text: no text found in {list(paths)}")
    return _dedupe_shuffle_cap(docs, max_mb, seed), sources
