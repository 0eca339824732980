"""Model checkpoints: orbax-checkpoint for arrays, JSON for config and metadata, digests of every file written;
nanochat import and export; the one-writer lock of a checkpoint directory.

A checkpoint directory is an orbax `CheckpointManager` root (one numbered sub-directory per step) whose steps hold
the items 'params' (the params pytree) and 'meta' (JSON: 'model_config' plus whatever the writer adds). Training
runs add 'opt_state' and 'loader' items to the same steps (see `save_checkpoint`); `load_model` reads only params
and meta, so the engine, evals and server load training checkpoints directly.

Integrity. orbax writes each step to a temporary directory and renames it when complete, so a run killed while
saving leaves the previous step intact; but orbax 0.12 checksums only the index of its zarr3 shards (tensorstore's
crc32c codec), not the array data, and a bit flip in a data file restores as garbage without an error. So after
orbax has written a step, `write_digests` hashes every file of it (xxh3_64) into `<step>/digests.json`, and every
load (`load_model`, `load_meta`, `restore_checkpoint`: serving, evaluation, conversion, resume) first checks the files
it will read against it (`verify_step`: one read of those files). A damaged or incomplete step is refused in one
line (`DamagedCheckpoint`) naming the step, the file and what is wrong; asked for the newest step, the loaders skip
damaged ones and say which step they used and why (`newest_intact`). A failed save (no space left, permission
denied, read-only filesystem) removes what it wrote and raises `CheckpointWriteError`, one line naming the OS error
and the path. `WriterLock` keeps a second run from writing into a directory another run is writing.

Directory layout under `$JAXCHAT_BASE_DIR` (as nanochat's `checkpoint_manager.py`): `base_checkpoints/<tag>/`,
`chatsft_checkpoints/<tag>/`, `chatrl_checkpoints/<tag>/`, where tag is e.g. `d12`.

nanochat interop: `from_nanochat` / `to_nanochat` map its `state_dict` names and (out, in) layouts to ours (same
layout, no transposes), keeping the padded vocab rows.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import glob
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from jaxchat import multihost
from jaxchat.common import BadInputError, UserError, get_base_dir, print0
from jaxchat.model import GPTConfig, Params, param_shapes

R = TypeVar("R")
DIGEST_FILE = "digests.json"  # in each step directory: every other file's size and xxh3_64 digest
LOCK_FILE = ".writer.lock"  # in each checkpoint directory: the run writing it (WriterLock)


class MissingCheckpoint(UserError, FileNotFoundError):
    """No such checkpoint directory, tag or step; the message lists what exists and the command that makes one."""


class DamagedCheckpoint(BadInputError):
    """A step whose files are missing, truncated or changed since they were written (or whose save never finished);
    the message names the step, the file and what is wrong. A ValueError and a UserError."""


class CheckpointWriteError(UserError):
    """A save failed (no space left, permission denied, read-only filesystem, ...); the partial step was removed."""


SOURCES = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "mid": "chatsft_checkpoints",
           "rl": "chatrl_checkpoints"}


# ----------------------------------------------------------------------------------------------------------------
# Digests: what a save wrote, checked before anything is read back


def _hash_file(path: str) -> str:
    h = xxhash.xxh3_64()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_files(step_dir: str, rels: list[str]) -> dict[str, str]:
    """{relative path: xxh3_64 hex} of files under step_dir, read by a few threads (reads release the GIL, and
    xxh3 hashes at memory speed, so this is as fast as the files can be read)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(lambda r: _hash_file(os.path.join(step_dir, r)), rels)))


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_digests(step_dir: str) -> dict:
    """Hash every file of a written step into `<step_dir>/digests.json` (written atomically); returns the manifest.

    The manifest is {'algorithm': 'xxh3_64', 'files': {relative path: [bytes, hex digest]}, 'digest': the digest
    of the rest}, so a damaged manifest is caught like any damaged file. Raises OSError when it cannot be written.
    """
    rels = sorted(os.path.relpath(os.path.join(root, name), step_dir)
                  for root, _, names in os.walk(step_dir) for name in names)
    rels = [r for r in rels if r != DIGEST_FILE]
    digests = _hash_files(step_dir, rels)
    manifest = {"algorithm": "xxh3_64",
                "files": {r: [os.path.getsize(os.path.join(step_dir, r)), digests[r]] for r in rels}}
    manifest["digest"] = _manifest_digest(manifest)
    tmp = os.path.join(step_dir, DIGEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, DIGEST_FILE))
    return manifest


def _first(problems: list[str]) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more file{'s' if more > 1 else ''})" if more else "")


def verify_step(ckpt_dir: str, step: int, items: tuple[str, ...] | None = None) -> bool:
    """Check the files of `items` ('params', 'meta', 'opt_state', 'loader'; None: all) and the step's own
    metadata files against the step's digests.json.

    Costs one read of those files. Returns True when verified, False for a step without digests.json that does
    not promise one (written before jaxchat recorded digests: loaded unverified, with a warning).
    Raises:
        DamagedCheckpoint: a file is missing, of another size or of other content than was written, the manifest
            itself is damaged, or the step promises a manifest (meta 'digest_file') that is absent (the save did
            not finish). The message names the step, the file and what is wrong, in one line.
    """
    step_dir = os.path.join(os.path.abspath(ckpt_dir), str(int(step)))
    where = f"step {step} of {os.path.abspath(ckpt_dir)} is damaged"
    path = os.path.join(step_dir, DIGEST_FILE)
    if not os.path.exists(path):
        meta = _read_meta_file(ckpt_dir, step)
        if meta.get("digest_file"):
            raise DamagedCheckpoint(f"{where}: {DIGEST_FILE} is missing (its save did not finish)")
        _warn_once(f"warning: step {step} of {ckpt_dir} has no {DIGEST_FILE} (written before jaxchat recorded "
                   f"digests): loaded unverified")
        return False
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        ok = isinstance(manifest, dict) and manifest.get("digest") == _manifest_digest(manifest)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{where}: {DIGEST_FILE} cannot be read ({_one_line(e)})") from None
    if not ok or manifest.get("algorithm") != "xxh3_64":
        raise DamagedCheckpoint(f"{where}: {DIGEST_FILE} does not match its own digest (it was changed)")
    files = {r: v for r, v in manifest["files"].items()
             if items is None or "/" not in r or r.split("/", 1)[0] in items}
    problems, same_size = [], []
    for rel, (size, _) in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel} holds {os.path.getsize(full):,} bytes, {size:,} were written")
        else:
            same_size.append(rel)
    if not problems:
        digests = _hash_files(step_dir, same_size)
        problems = [f"{rel} differs from what was written (its digest does not match)" for rel in same_size
                    if digests[rel] != files[rel][1]]
    if problems:
        raise DamagedCheckpoint(f"{where}: {_first(problems)}")
    return True


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        print0(msg, file=sys.stderr)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The most telling line of an error: the innermost cause's first line, without tensorstore's spec dump."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.split(r" \[(?:tensorstore_spec|source locations)", text)[0]
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------------------------
# orbax read/write


def _manager(ckpt_dir: str, create: bool = False, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    # Synchronous saves: the save blocks anyway, and an error then surfaces here instead of in orbax's threads.
    options = ocp.CheckpointManagerOptions(create=create, max_to_keep=max_to_keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs (and tracebacks) every failed read or write from its worker threads, and after a failed write
    tensorstore completes the other pending writes into an event loop orbax has closed, each completion printing a
    traceback ('Event loop is closed'); we report the failure ourselves, in one line, so both are silenced here."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    hook = sys.unraisablehook

    def quiet(u):
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            _LATE_CALLBACKS.append(time.monotonic())
        else:
            hook(u)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_LATE_CALLBACKS: list[float] = []


def _settle(threads: set) -> None:
    """After a failed save, inside `_quiet_orbax`: the failed write leaves orbax's other writes running in worker
    threads (which would re-create the temporary directory after we removed it), abandoned coroutines (which,
    collected at interpreter exit, print dozens of tracebacks) and tensorstore writes completing late. Wait for the
    threads, collect the coroutines now, and wait until no late completion came for half a second (10 s at most)."""
    for t in threading.enumerate():
        if t not in threads and t is not threading.current_thread():
            t.join(timeout=60)
    gc.collect()
    start = time.monotonic()
    while time.monotonic() - start < 10:
        time.sleep(0.1)
        if time.monotonic() - max(_LATE_CALLBACKS[-1:] or [start]) > 0.5:
            break


def _write_error(e: BaseException) -> tuple[str, str | None]:
    """(reason, file) of a failed write: the OS error (tensorstore reports it as os_error_code) where there is one."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)} [{errno.errorcode.get(seen.errno, seen.errno)}]", seen.filename
        m = re.search(r"os_error_code='(\d+)'", str(seen))
        if m:
            code = int(m.group(1))
            f = re.search(r'Failed (?:writing|to open|opening|creating)[^"]*"([^"]+)"', str(seen))
            return f"{os.strerror(code)} [{errno.errorcode.get(code, code)}]", f.group(1) if f else None
        seen = seen.__cause__ or seen.__context__
    return _one_line(e), None


def _remove_partial(ckpt_dir: str, step: int) -> str:
    """Delete what a failed save of `step` left (the step directory, orbax's temporary directories); says what
    it did, as the end of the error message."""
    root = os.path.abspath(ckpt_dir)
    paths = [os.path.join(root, str(step))] + glob.glob(os.path.join(root, f"{step}.orbax-checkpoint-tmp*"))
    paths = [p for p in paths if os.path.lexists(p)]
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    left = [p for p in paths if os.path.lexists(p)]
    if left:
        return f"; could not remove the partial step, delete {' and '.join(left)}"
    return "; the partial step was removed" if paths else "; nothing of it was written"


def save_checkpoint(ckpt_dir: str, step: int, params: Params, config: GPTConfig, meta: dict | None = None,
                    opt_state: Any = None, loader_state: dict | None = None, max_to_keep: int | None = None) -> str:
    """Write one step (params, meta, and optionally optimizer and data-loader state) and its digests; blocks until
    complete. An existing step of the same number is replaced.

    Every process must call this (orbax gathers sharded arrays collectively); only process 0 writes JSON and the
    digests (after orbax has finished every process's files). Returns the step's directory.
    Raises:
        CheckpointWriteError (a UserError): any error while writing (no space left, permission denied, read-only
            filesystem, ...); the message names the OS error and the path, and the partial step has been removed.
    """
    meta = _json_safe(dict(meta or {}))
    meta["model_config"] = config.to_dict()
    meta["step"] = int(step)
    meta["digest_file"] = DIGEST_FILE
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if loader_state is not None:
        items["loader"] = ocp.args.JsonSave(_json_safe(loader_state))
    step_dir = os.path.join(os.path.abspath(ckpt_dir), str(int(step)))
    last, free = _last_step_bytes(ckpt_dir), _free_bytes(ckpt_dir)
    if multihost.any_process(bool(last and free is not None and free < 0.95 * last)):  # the usual full disk
        raise CheckpointWriteError(f"could not save step {step} to {step_dir}: {os.strerror(errno.ENOSPC)} [ENOSPC]: "
                                   f"the last step took {last / 2**20:,.1f} MiB and {(free or 0) / 2**20:,.1f} MiB are "
                                   f"free there; nothing of it was written")
    threads = set(threading.enumerate())
    try:
        with _quiet_orbax():
            try:
                with _manager(ckpt_dir, create=True, max_to_keep=max_to_keep) as mgr:
                    if int(step) in mgr.all_steps():  # a re-run with the same tag replaces that step
                        mgr.delete(int(step))
                    mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
                    mgr.wait_until_finished()
            except Exception:
                _settle(threads)
                raise
        if jax.process_index() == 0:
            write_digests(step_dir)
        multihost.barrier("checkpoint-digests")
    except Exception as e:
        reason, path = _write_error(e)
        cleanup = _remove_partial(ckpt_dir, int(step)) if jax.process_index() == 0 else ""
        raise CheckpointWriteError(f"could not save step {step} to {step_dir}: {reason}"
                                   + (f" (writing {path})" if path else "") + cleanup + _free_space(ckpt_dir)) from e
    return step_dir


def _last_step_bytes(ckpt_dir: str) -> int | None:
    """Bytes of the newest step in `ckpt_dir`, from its digests.json (None when there is none): what the next
    save of the same run will need, give or take the compression of its arrays."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    for s in sorted((int(n) for n in names if n.isdigit()), reverse=True):
        try:
            with open(os.path.join(ckpt_dir, str(s), DIGEST_FILE), encoding="utf-8") as f:
                return sum(size for size, _ in json.load(f)["files"].values())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent); None when unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _free_space(path: str) -> str:
    free = _free_bytes(path)
    return "" if free is None else f", {free / 2**20:,.1f} MiB free there now"


def _json_safe(x):
    """NaN and +-inf become None (JSON has no such numbers), recursively through dicts and lists."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def save_model(ckpt_dir: str, step: int, params: Params, config: GPTConfig, meta: dict | None = None) -> str:
    """Write params and meta (with 'model_config') as step `step` of `ckpt_dir`. Returns the step directory."""
    return save_checkpoint(ckpt_dir, step, params, config, meta)


def list_steps(ckpt_dir: str) -> list[int]:
    """Completed steps in a checkpoint directory, ascending ([] when none or no directory); not verified."""
    if not os.path.isdir(ckpt_dir):
        return []
    with _manager(ckpt_dir) as mgr:
        return sorted(mgr.all_steps())


def describe_tags(root: str) -> str:
    """'tags here: d2 (steps [5, 10]), d4 (steps [])' for a checkpoints root, or 'no tags under <root>'."""
    tags = sorted(t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))) if os.path.isdir(root) else []
    if not tags:
        return f"no tags under {root}"
    return "tags here: " + ", ".join(f"{t} (steps {list_steps(os.path.join(root, t))})" for t in tags)


def _existing_steps(ckpt_dir: str) -> list[int]:
    steps = list_steps(ckpt_dir)
    if not steps:
        raise MissingCheckpoint(f"no checkpoint in {ckpt_dir} (train one with `python -m train.pretrain`, or convert "
                                f"a nanochat one with `python -m jaxchat.convert`); "
                                f"{describe_tags(os.path.dirname(os.path.abspath(ckpt_dir)))}")
    return steps


def newest_intact(ckpt_dir: str, items: tuple[str, ...] | None, load: Callable[[int, bool], R],
                  step: int | None = None) -> R:
    """`load(step, verified)` after `verify_step(ckpt_dir, step, items)`; with step None, the same for the newest
    step that is not damaged.

    A damaged step is skipped; when one was, a warning line on stderr names the step used and why the newer ones
    were not. Every process must call this: process 0 verifies, and the verdict is agreed before anything is read.
    Raises:
        MissingCheckpoint: no such step, or no step at all (listing what exists).
        DamagedCheckpoint: the requested step, or every step, is damaged.
    """
    steps = _existing_steps(ckpt_dir)
    if step is not None and step not in steps:
        raise MissingCheckpoint(f"no step {step} in {ckpt_dir}; available steps: {steps}")
    skipped = []
    for s in ([step] if step is not None else steps[::-1]):
        damage, verified = None, True
        if jax.process_index() == 0:
            try:
                verified = verify_step(ckpt_dir, s, items)
            except DamagedCheckpoint as e:
                damage = e
        if multihost.any_process(damage is not None):
            damage = damage or DamagedCheckpoint(f"step {s} of {ckpt_dir} is damaged: as process 0 found")
        else:
            try:
                out = load(s, verified)
            except DamagedCheckpoint as e:  # an unverified (older) step that orbax cannot read
                damage = e
            else:
                if skipped:
                    why = "; ".join(f"step {k}: {r}" for k, r in skipped)
                    print0(f"warning: using step {s} of {ckpt_dir}, the newest intact one ({why})", file=sys.stderr)
                return out
        if step is not None:
            raise damage
        skipped.append((s, str(damage).split(" is damaged: ", 1)[-1]))
    why = "; ".join(f"step {k}: {r}" for k, r in skipped)
    raise DamagedCheckpoint(f"every step in {ckpt_dir} is damaged ({why}); train again or restore a copy")


def check_same_model(meta: dict, config: GPTConfig, what: str) -> None:
    """Raise UserError naming the fields where the checkpoint's model_config differs from `config`."""
    saved, now = meta.get("model_config") or {}, config.to_dict()
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise UserError(f"{what}: the model differs from the flags' ({'; '.join(diff)}); pass the flags of the "
                        f"original run, or start a new run under another tag")


def check_tokenizer(meta: dict, fingerprint: str | None, what: str) -> None:
    """Raise UserError when the checkpoint was trained with another tokenizer than the current one (both named)."""
    saved = meta.get("tokenizer_fingerprint")
    if saved and fingerprint and saved != fingerprint:
        raise UserError(f"{what} was trained with tokenizer {saved}, but $JAXCHAT_BASE_DIR/tokenizer is {fingerprint}; "
                        f"restore that tokenizer (or retrain the model with `python -m train.pretrain`)")


def _read_meta_file(ckpt_dir: str, step: int) -> dict:
    try:
        with _quiet_orbax(), _manager(ckpt_dir) as mgr:
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise DamagedCheckpoint(f"step {step} of {os.path.abspath(ckpt_dir)} is damaged: its meta cannot be read "
                                f"({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(f"step {step} of {os.path.abspath(ckpt_dir)} is damaged: its meta is not a JSON "
                                f"object")
    return dict(meta)


def _restore(ckpt_dir: str, step: int, items: dict, verified: bool) -> dict:
    """orbax restore of `items` (name -> restore args); a failure of an unverified step counts as damage."""
    try:
        with _quiet_orbax(), _manager(ckpt_dir) as mgr:
            return mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        if verified or isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            raise
        raise DamagedCheckpoint(f"step {step} of {os.path.abspath(ckpt_dir)} is damaged: {', '.join(items)} cannot "
                                f"be read ({_one_line(e)})") from None


def load_meta(ckpt_dir: str, step: int | None = None) -> dict:
    """The JSON metadata of a step, verified (newest intact step by default; see `newest_intact`).

    Raises MissingCheckpoint (a FileNotFoundError) when absent, DamagedCheckpoint (a ValueError) when damaged.
    """
    return newest_intact(ckpt_dir, ("meta",), lambda s, _: _read_meta_file(ckpt_dir, s), step)


def _abstract(tree, sharding=None):
    """ShapeDtypeStructs for orbax restore, optionally with one sharding (or a matching tree of them)."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, sharding)


def load_model(ckpt_dir: str, step: int | None = None, sharding=None) -> tuple[GPTConfig, Params, dict]:
    """Read (config, params, meta) of a step, verified against its digests (newest intact step by default).

    Args:
        ckpt_dir: a checkpoint directory written by `save_model`/`save_checkpoint`.
        step: which step; None for the newest intact one (a damaged newer step is skipped with a warning line).
        sharding: a `jax.sharding.Sharding` for every array, or a pytree of them matching params; default device 0.
    Raises:
        MissingCheckpoint (a FileNotFoundError): no such directory or step (the message says how to make one).
        DamagedCheckpoint (a UserError, ValueError): the step (or, with step None, every step) is damaged; one line
            naming the step, the file and what is wrong.
    """
    def load(s, verified):
        meta = _read_meta_file(ckpt_dir, s)
        config = GPTConfig.from_dict(meta["model_config"])
        restored = _restore(ckpt_dir, s, {"params": ocp.args.StandardRestore(
            _abstract(param_shapes(config), sharding))}, verified)
        return config, restored["params"], meta

    return newest_intact(ckpt_dir, ("params", "meta"), load, step)


def restore_checkpoint(ckpt_dir: str, step: int | None, abstract_params, abstract_opt_state=None,
                       check_meta: Callable[[dict, int], None] | None = None) -> dict:
    """Restore a training step, verified: {'params', 'meta', and 'opt_state' / 'loader' when asked for and present}.

    `abstract_params` / `abstract_opt_state` are pytrees of `jax.ShapeDtypeStruct` (with shardings) that say where
    each restored array goes. step None: the newest intact step (see `newest_intact`). `check_meta(meta, step)` runs
    before any array is read (e.g. to refuse another model config with a UserError).
    Raises:
        MissingCheckpoint: no such step. DamagedCheckpoint: one of the step's files is damaged.
    """
    def load(s, verified):
        step_dir = os.path.join(os.path.abspath(ckpt_dir), str(s))
        meta = _read_meta_file(ckpt_dir, s)
        if check_meta is not None:
            check_meta(meta, s)
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None and os.path.isdir(os.path.join(step_dir, "opt_state")):
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        if os.path.isdir(os.path.join(step_dir, "loader")):
            items["loader"] = ocp.args.JsonRestore()
        out = _restore(ckpt_dir, s, items, verified)
        return {"meta": meta, **{k: out[k] for k in items}}

    return newest_intact(ckpt_dir, None, load, step)


# ----------------------------------------------------------------------------------------------------------------
# One writer per tag


class WriterLock:
    """The lock that makes one run the only writer of a checkpoint directory: `<ckpt_dir>/.writer.lock`.

    The file holds the owner as JSON (host, pid, start time, command line) and is flock'ed by the owner for as long
    as it holds the lock (the kernel drops a flock when its process dies, however it dies). `acquire()`:
      - another live process holds it: UserError naming the owner (host, pid, command);
      - the file names a process of this host that is gone (a run killed with `kill -9`): taken over, saying so;
      - it names another host, which this host cannot check: refused, naming it and the file to delete if that run
        is gone.
    `release()` (also at interpreter exit) empties the file and, when the directory holds nothing else (no step was
    written), removes both.

    Several hosts: only process 0 takes the lock (the trainer does so and tells the other processes the verdict), so
    the lock names host 0's pid. A second job on another host is refused where the filesystem shares flocks across
    hosts (NFSv4, Lustre) and, in any case, because the owner file names another host. A job killed on several hosts
    and restarted with another host 0 is refused until that file is deleted.
    """

    def __init__(self, ckpt_dir: str):
        self.dir = os.path.abspath(ckpt_dir)
        self.path = os.path.join(self.dir, LOCK_FILE)
        self._fd: int | None = None

    def _owner(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def _describe(self, owner: dict) -> str:
        return (f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('started')}: "
                f"{owner.get('command', '?')})")

    def acquire(self) -> "WriterLock":
        """Take the lock or raise UserError (see the class docstring); prints a line when taking over a stale one."""
        for _ in range(10):  # retried only while a releasing owner removes the file under us
            try:
                os.makedirs(self.dir, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise UserError(f"cannot write checkpoints to {self.dir}: {os.strerror(e.errno)} "
                                f"[{errno.errorcode.get(e.errno, e.errno)}]; choose a writable $JAXCHAT_BASE_DIR"
                                ) from None
            try:
                if self._take(fd):
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise UserError(f"could not take the writer lock {self.path}: it keeps being removed")

    def _take(self, fd: int) -> bool:
        flocked = _try_flock(fd)
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # the owner removed this file as we opened it: open the new one
        except FileNotFoundError:
            return False
        owner = self._owner()
        for _ in range(20):  # a new owner holds the flock but has not written its name yet
            if owner or flocked is not False:
                break
            time.sleep(0.05)
            owner = self._owner()
        host = socket.gethostname()
        if owner.get("host") == host and owner.get("pid") == os.getpid():
            if self.path in _HELD:  # an earlier run of this same process never released it
                _HELD.pop(self.path).release()
                return False
            owner = {}
        if flocked is False or (owner.get("host") == host and _alive(owner.get("pid"))):
            raise UserError(f"another run is writing checkpoints to {self.dir}: {self._describe(owner)}; wait for it "
                            f"to finish or stop it, or write to another tag")
        if owner and owner.get("host") != host:
            raise UserError(f"{self.path} names a run on another host, {self._describe(owner)}, which this host "
                            f"cannot check; if it is no longer running, delete that file and start again")
        if owner:
            print0(f"Taking over the stale writer lock of {self.dir}: {self._describe(owner)} is no longer running",
                   file=sys.stderr)
        info = {"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(" ".join([os.path.basename(sys.executable), *sys.orig_argv[1:]]).split())[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD[self.path] = self
        atexit.register(self.release)
        return True

    def release(self) -> None:
        """Give the lock up (idempotent); removes the directory when no step was written into it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        atexit.unregister(self.release)
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        try:
            if os.listdir(self.dir) == [LOCK_FILE]:
                os.remove(self.path)  # still flocked: a process that opened it meanwhile sees the inode change
                os.rmdir(self.dir)
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_HELD: dict[str, WriterLock] = {}


def _try_flock(fd: int) -> bool | None:
    """True: flocked; False: another process holds it; None: no flock here (then only the owner file decides)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on a network filesystem without a lock manager
        return None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_largest_model(checkpoints_dir: str) -> str:
    """Default model tag: the largest `d<N>` tag, else the most recently modified directory (as nanochat)."""
    if not os.path.isdir(checkpoints_dir):
        raise MissingCheckpoint(f"no checkpoints directory {checkpoints_dir}")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise MissingCheckpoint(f"no model tags in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def checkpoint_dir(source: str, model_tag: str | None = None) -> str:
    """`$JAXCHAT_BASE_DIR/<source>_checkpoints/<tag>` for source in base|sft|rl (tag guessed when None)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
    root = os.path.join(get_base_dir(), SOURCES[source])
    if model_tag is None:
        try:
            model_tag = find_largest_model(root)
        except FileNotFoundError:
            hint = {"base": "python -m train.pretrain", "sft": "python -m train.sft", "mid": "python -m train.sft",
                    "rl": "python -m train.rl"}[source]
            raise MissingCheckpoint(f"no {source} checkpoint under {root}: run `{hint}` first") from None
    return os.path.join(root, model_tag)


def load_model_from(source: str = "base", model_tag: str | None = None, step: int | None = None, sharding=None):
    """Load (params, config, tokenizer, meta) from the standard checkpoint directories (nanochat `load_model`).

    Raises:
        MissingCheckpoint (a UserError and FileNotFoundError): no checkpoint (listing the tags and steps that
            exist, and the command that makes one); FileNotFoundError: no tokenizer.
        UserError: the tokenizer's vocab size or fingerprint disagrees with the checkpoint's.
    """
    from jaxchat.tokenizer import get_tokenizer  # lazy: keeps model-only users free of tokenizer files

    config, params, meta = load_model(checkpoint_dir(source, model_tag), step, sharding)
    tokenizer = get_tokenizer()
    where = f"{source} checkpoint {model_tag or ''} step {meta.get('step')}".replace("  ", " ")
    check_tokenizer(meta, tokenizer.fingerprint(), where)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"{where}: tokenizer vocab size {tokenizer.get_vocab_size()} != model vocab_size "
                        f"{config.vocab_size}; use the tokenizer the model was trained with")
    return params, config, tokenizer, meta


# ----------------------------------------------------------------------------------------------------------------
# nanochat interop


def _nanochat_names(config: GPTConfig) -> dict[str, tuple]:
    """nanochat state_dict key -> path into our params pytree."""
    names = {"transformer.wte.weight": ("wte",), "lm_head.weight": ("lm_head",),
             "resid_lambdas": ("resid_lambdas",), "x0_lambdas": ("x0_lambdas",),
             "smear_gate.weight": ("smear_gate",), "smear_lambda": ("smear_lambda",),
             "backout_lambda": ("backout_lambda",)}
    if config.bigram_embed_factor:  # nanochat 412e9a1; without bigrams its bigram_lambdas is a non-persistent buffer
        names.update({"bigram_embed.weight": ("bigram_embed",), "bigram_lambdas": ("bigram_lambdas",)})
    for i in range(config.n_layer):
        for sub, mats in (("attn", ("c_q", "c_k", "c_v", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            for m in mats:
                names[f"transformer.h.{i}.{sub}.{m}.weight"] = ("h", i, sub, m)
        if config.has_ve(i):
            names[f"transformer.h.{i}.attn.ve_gate.weight"] = ("h", i, "attn", "ve_gate")
            names[f"value_embeds.{i}.weight"] = ("value_embeds", str(i))
    return names


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (possibly bfloat16, which numpy lacks)
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def from_nanochat(state_dict: dict, config: GPTConfig) -> Params:
    """Params pytree (float32 jax arrays) from a nanochat `GPT.state_dict()` (torch tensors or numpy arrays).

    Strips torch.compile's `_orig_mod.` prefix. Raises ValueError listing missing keys, unexpected keys, or keys
    whose shape disagrees with the config; nothing is dropped silently.
    """
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    names = _nanochat_names(config)
    missing = sorted(set(names) - set(sd))
    extra = sorted(set(sd) - set(names))
    if missing or extra:
        raise ValueError(f"nanochat state_dict does not fit {config}: missing keys {missing}, unexpected keys {extra}")
    shapes = param_shapes(config)
    params = jax.tree_util.tree_map(lambda s: None, shapes)
    bad = []
    for key, path in names.items():
        arr = _to_numpy(sd[key])
        want = _get(shapes, path).shape
        if arr.shape != want:
            bad.append(f"{key}: {arr.shape} != {want}")
            continue
        parent = _get(params, path[:-1])
        parent[path[-1]] = jnp.asarray(arr)
    if bad:
        raise ValueError("nanochat state_dict shapes disagree with the config: " + "; ".join(bad))
    return params


def to_nanochat(params: Params, config: GPTConfig) -> dict[str, np.ndarray]:
    """nanochat `state_dict` (float32 numpy arrays, nanochat key names and (out, in) layouts) from our params."""
    return {key: np.asarray(jax.device_get(_get(params, path)), dtype=np.float32)
            for key, path in _nanochat_names(config).items()}
