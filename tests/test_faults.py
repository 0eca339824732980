"""Training survives storage faults and operator mistakes (issue 24): damaged steps are refused in one line and
`latest` falls back to the newest intact one; a full disk or read-only filesystem stops a run cleanly; one writer
per tag; a huge document does not blow up the loader; SIGTERM before the first step ends the process at once."""

import contextlib
import errno
import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxchat import checkpoint as ckpt
from jaxchat import trainer as T
from jaxchat.common import UserError
from train import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test_pretrain's tiny synthetic run (d2, n_embd 64, seq 32, vocab 256; shares its compiled step in one session)
TINY = ["--data=synthetic", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--vocab-size=256",
        "--device-batch-size=2", "--total-batch-size=1024", "--warmup-steps=2", "--eval-tokens=512",
        "--core-metric-every=-1", "--sample-every=-1", "--eval-every=-1"]
RUN = TINY + ["--num-iterations=6", "--save-every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of RUN: its summary, console output and checkpoint directory (steps 2, 4, 6); tests copy it."""
    base = str(tmp_path_factory.mktemp("trained"))
    old = os.environ.get("JAXCHAT_BASE_DIR")
    os.environ["JAXCHAT_BASE_DIR"] = base
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            summary = pretrain.main(RUN + ["--model-tag=good"])
    finally:
        if old is None:
            del os.environ["JAXCHAT_BASE_DIR"]
        else:
            os.environ["JAXCHAT_BASE_DIR"] = old
    assert ckpt.list_steps(summary["checkpoint_dir"]) == [2, 4, 6]
    return {"summary": summary, "out": out.getvalue(), "dir": summary["checkpoint_dir"]}


def copy_run(trained, tag: str) -> str:
    dst = os.path.join(os.environ["JAXCHAT_BASE_DIR"], "base_checkpoints", tag)
    shutil.copytree(trained["dir"], dst)
    return dst


def biggest(step_dir: str, item: str) -> str:
    return max(glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True), key=os.path.getsize)


def flip_bits(d):  # 4 KiB of the largest params data file, inverted (the damage)
    path = biggest(os.path.join(d, "6"), "params")
    raw = bytearray(open(path, "rb").read())
    at = len(raw) // 3
    raw[at:at + 4096] = bytes(b ^ 0xFF for b in raw[at:at + 4096])
    open(path, "wb").write(bytes(raw))
    return rf"params/.*/d/\w+ differs from what was written \(its digest does not match\)"


def truncate(d):
    path = biggest(os.path.join(d, "6"), "params")
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return rf"params/.*/d/\w+ holds {size // 2:,} bytes, {size:,} were written"


def cut_meta(d):
    path = os.path.join(d, "6", "meta", "metadata")
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])
    return rf"meta/metadata holds {len(text) // 2:,} bytes"


def delete_manifests(d):
    for path in glob.glob(os.path.join(d, "6", "params", "**", "manifest.ocdbt"), recursive=True):
        os.remove(path)
    return r"params/.*manifest.ocdbt is missing"


def unfinished(d):  # killed between orbax's rename and the digests
    os.remove(os.path.join(d, "6", ckpt.DIGEST_FILE))
    return r"digests.json is missing \(its save did not finish\)"


@pytest.mark.parametrize("damage", [flip_bits, truncate, cut_meta, delete_manifests, unfinished],
                         ids=lambda f: f.__name__)
def test_a_damaged_step_is_refused_in_one_line_and_newest_falls_back(trained, damage, capsys):
    d = copy_run(trained, "dmg")
    what = damage(d)
    with pytest.raises(ckpt.DamagedCheckpoint, match=rf"^step 6 of {d} is damaged: {what}") as e:
        ckpt.load_model(d, 6)
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)
    capsys.readouterr()
    config, params, meta = ckpt.load_model(d)  # serving's default: the newest intact step, saying why
    assert meta["step"] == 4 and config.n_layer == 2
    err = capsys.readouterr().err
    assert re.search(rf"warning: using step 4 of {d}, the newest intact one \(step 6: {what}", err), err
    good = ckpt.load_model(trained["dir"], 4)[1]
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conversion_refuses_a_damaged_step_and_uses_the_newest_intact_one(trained, tmp_path, capsys):
    pytest.importorskip("torch", reason="nanochat .pt files need PyTorch (pip install -e '.[torch]')")
    from jaxchat import convert
    from jaxchat.common import run_cli

    d = copy_run(trained, "conv")
    truncate(d)
    with pytest.raises(SystemExit) as e:
        run_cli(convert.main, [d, str(tmp_path / "nano"), "--to-nanochat", "--step", "6"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: step 6 of {d} is damaged"), err
    run_cli(convert.main, [d, str(tmp_path / "nano"), "--to-nanochat"])
    assert sorted(os.listdir(tmp_path / "nano")) == ["meta_000004.json", "model_000004.pt"]


def test_resume_refuses_a_damaged_optimizer_state_and_latest_resumes_exactly_from_the_step_before(trained, capsys):
    d = copy_run(trained, "opt")
    path = biggest(os.path.join(d, "6"), "opt_state")
    os.truncate(path, 100)
    assert ckpt.load_model(d)[2]["step"] == 6  # serving reads only params and meta: step 6 is fine for it
    with pytest.raises(ckpt.DamagedCheckpoint, match=r"step 6 of .* is damaged: opt_state/.* holds 100 bytes"):
        pretrain.main(RUN + ["--model-tag=opt", "--resume-from-step=6"])
    capsys.readouterr()
    resumed = pretrain.main(RUN + ["--model-tag=opt", "--resume-from-step=latest"])
    assert "using step 4" in capsys.readouterr().err
    full = trained["summary"]["losses"]
    assert resumed["losses"] == {s: full[s] for s in (4, 5)}  # exactly equal
    assert ckpt.load_meta(d, 6)["loop_state"]["step"] == 6  # the damaged step was written again, whole


# ----------------------------------------------------------------------------------------------------------------
# A failed save: no space left, a read-only filesystem


@contextlib.contextmanager
def small_filesystem(path: str, size: int):
    """A tmpfs of `size` bytes at `path` when this is root and mounting works (and $JAXCHAT_TEST_INJECT_FAULTS is
    unset), else False: then the test injects the OS error."""
    os.makedirs(path)
    mounted = os.geteuid() == 0 and not os.environ.get("JAXCHAT_TEST_INJECT_FAULTS") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", path], capture_output=True)


def step_bytes(step_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)


def inject(monkeypatch, code: int, at: int):
    """Without a small filesystem: orbax's save of step `at` writes part of it and then fails with OSError(code)."""
    real = ckpt.ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step != at:
            return real(self, step, *a, **kw)
        partial = os.path.join(str(self.directory), f"{at}.orbax-checkpoint-tmp", "params")
        os.makedirs(partial)
        open(os.path.join(partial, "d"), "wb").write(b"\0" * 1000)
        raise ValueError("writing failed") from OSError(code, os.strerror(code), os.path.join(partial, "d"))

    monkeypatch.setattr(ckpt.ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("case", ["full-at-first-save", "full", "read-only"])
def test_a_failed_save_stops_the_run_in_one_line_and_keeps_the_last_good_step(trained, tmp_path, monkeypatch, case):
    """full-at-first-save: orbax's write fails midway (a filesystem of half a step); full: room for step 2 only,
    found before step 4 is written; read-only: the filesystem turns read-only before step 4 is saved."""
    mnt = str(tmp_path / "mnt")
    step = step_bytes(os.path.join(trained["dir"], "2"))
    code = errno.EROFS if case == "read-only" else errno.ENOSPC
    first = case == "full-at-first-save"
    size = {"full-at-first-save": step // 2, "full": int(1.6 * step), "read-only": 8 * step}[case]
    with small_filesystem(mnt, size) as mounted:
        monkeypatch.setenv("JAXCHAT_BASE_DIR", mnt)
        if not mounted:
            inject(monkeypatch, code, 2 if first else 4)
        d = os.path.join(mnt, "base_checkpoints", "full")
        if mounted and case == "read-only":  # a read-only bind mount over the directory (the run's open lock file
            real = T.Trainer._save           # would keep the whole filesystem from being remounted read-only)

            def save(self, s, *a):
                if s == 4:
                    subprocess.run(["mount", "--bind", d, d], check=True)
                    subprocess.run(["mount", "-o", "remount,bind,ro", d], check=True)
                return real(self, s, *a)

            monkeypatch.setattr(T.Trainer, "_save", save)
        with pytest.raises(ckpt.CheckpointWriteError) as e:
            pretrain.main(RUN + ["--model-tag=full"])
        msg, s = str(e.value), 2 if first else 4
        assert "\n" not in msg
        assert re.match(rf"could not save step {s} to {d}/{s}: {os.strerror(code)} \[{errno.errorcode[code]}\]",
                        msg), msg
        assert re.search(r"; no checkpoint was written$" if first else
                         rf"; the last good checkpoint is step 2 in {d} \(resume with --resume-from-step=2\)$",
                         msg), msg
        if case == "full" and mounted:
            assert "the last step took" in msg and "nothing of it was written" in msg, msg
        elif case != "read-only" or not mounted:
            assert "the partial step was removed" in msg, msg
        if first:
            assert not os.path.exists(d) or os.listdir(d) == [ckpt.LOCK_FILE], os.listdir(d)
            return
        if mounted and case == "read-only":
            subprocess.run(["umount", d], check=True)
        assert sorted(os.listdir(d)) == [ckpt.LOCK_FILE, "2"], os.listdir(d)  # no orbax *-tmp directory left
        assert ckpt.load_model(d)[2]["step"] == 2  # intact (verified)
        if mounted:
            subprocess.run(["mount", "-o", f"remount,rw,size={8 * step}", mnt], check=True)
        monkeypatch.undo()
        monkeypatch.setenv("JAXCHAT_BASE_DIR", mnt)
        resumed = pretrain.main(RUN + ["--model-tag=full", "--resume-from-step=latest"])
        full = trained["summary"]["losses"]
        assert resumed["losses"] == {s: full[s] for s in range(2, 6)}  # resuming from the last good step is exact


# ----------------------------------------------------------------------------------------------------------------
# One writer per tag; SIGTERM before the first step


def start_child(argv: list[str], prelude: str, env: dict | None = None) -> subprocess.Popen:
    code = (f"import sys\n{prelude}\nfrom jaxchat.common import run_cli\nfrom train.pretrain import main\n"
            f"run_cli(main, sys.argv[1:])")
    env = dict(os.environ, JAXCHAT_NO_REEXEC="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return "".join(lines)
    raise AssertionError("".join(lines))


# The first batch never comes: a loader stuck on a huge document. time.sleep resumes after a signal handler runs.
STUCK_LOADER = """
import time
from jaxchat import trainer
def micro_batches(loader, micro_steps):
    print("loading the first batch", flush=True)
    time.sleep(600)
trainer.micro_batches = micro_batches
"""


def test_one_writer_per_tag_and_sigterm_before_the_first_step_exits_at_once(capsys):
    base = os.environ["JAXCHAT_BASE_DIR"]
    d = os.path.join(base, "base_checkpoints", "shared")
    first = start_child(TINY + ["--num-iterations=4", "--save-every=2", "--model-tag=shared", "--seed=1"],
                        STUCK_LOADER)
    try:
        out = read_until(first, r"^loading the first batch")
        # a second run on the same tag, started while the first one works: refused in one line naming the owner
        with pytest.raises(UserError, match=rf"another run is writing checkpoints to {d}: pid {first.pid} on host "
                                            rf"{re.escape(socket.gethostname())} \(since [-\d]+ [:\d]+: python"):
            pretrain.main(TINY + ["--num-iterations=4", "--model-tag=shared", "--seed=2"])
        t0 = time.monotonic()
        first.send_signal(signal.SIGTERM)
        out += first.communicate(timeout=60)[0]
        elapsed = time.monotonic() - t0
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert elapsed < 10, elapsed
    assert "Stopped by SIGTERM before the first step of this run: nothing to save; no checkpoint was written" in out
    assert not os.path.exists(d)  # nothing saved, and the lock (with the directory it made) is gone
    capsys.readouterr()
    second = pretrain.main(TINY + ["--num-iterations=2", "--model-tag=shared", "--seed=2"])
    assert "Taking over" not in capsys.readouterr().err
    assert ckpt.load_meta(d)["user_config"]["seed"] == 2 and second["last_saved"] == 2


def test_writer_lock_takes_over_a_dead_pid_and_refuses_another_hosts(tmp_path, capsys):
    d = str(tmp_path / "tag")
    os.makedirs(d)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = os.path.join(d, ckpt.LOCK_FILE)
    with open(lock_file, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "then", "command": "python old"}, f)
    with ckpt.WriterLock(d):
        assert json.load(open(lock_file))["pid"] == os.getpid()
        assert f"Taking over the stale writer lock of {d}: pid {dead.pid} on host" in capsys.readouterr().err
        with ckpt.WriterLock(d):  # the same process again (a run that never released it): no refusal
            pass
    assert not os.path.exists(d)  # released, and nothing was written there
    os.makedirs(d)
    with open(lock_file, "w") as f:
        json.dump({"host": "gpu-node-7", "pid": 4242, "started": "then", "command": "python -m train.pretrain"}, f)
    with pytest.raises(UserError, match=rf"{lock_file} names a run on another host, pid 4242 on host gpu-node-7 .*"
                                        r"if it is no longer running, delete that file"):
        ckpt.WriterLock(d).acquire()


# ----------------------------------------------------------------------------------------------------------------
# A huge document; the console line


def test_cut_documents_keep_every_token_packing_uses():
    from jaxchat.dataloader import cut_document, max_doc_chars
    from jaxchat.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "far", "away", "7", "--", "\n", "éé"]
    text = " ".join(rng.choice(words, size=6000))
    tok = Tokenizer.train_from_iterator([" ".join(rng.choice(words, size=300)) for _ in range(40)], vocab_size=280)
    T = 64
    limit = max_doc_chars(tok, T)
    assert limit == 2 * (T + 2) * int(tok.token_bytes().max()) < len(text)
    cut = cut_document(text, limit)
    assert limit // 2 <= len(cut) <= limit and text.startswith(cut)
    whole, head = tok.encode(text), tok.encode(cut)
    assert len(head) >= T + 2  # never fits a row whole, like the whole document
    assert head[:T] == whole[:T]  # every token packing can take from it
    assert cut_document("x" * 1000, 100) == "x" * 100 and cut_document("short", 100) == "short"


def test_a_huge_document_is_read_in_bounded_memory(tmp_path):
    """A train shard of one 50 MB document and two short ones (the issue's: 18.8 GB and no step in 15 minutes):
    three steps, peak RSS under 4 GB."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from jaxchat.tokenizer import Tokenizer

    base = tmp_path / "base"
    (base / "base_data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = np.array("the cat dog sat on mat and ran to a big red house with small green tree".split())
    block = " ".join(rng.choice(words, size=200_000))
    huge = (block + " ") * (50_000_000 // (len(block) + 1) + 1)
    short = [" ".join(rng.choice(words, size=60)) for _ in range(22)]
    pq.write_table(pa.table({"text": [huge, short[0], short[1]]}), str(base / "base_data" / "shard_00000.parquet"))
    pq.write_table(pa.table({"text": short[2:]}), str(base / "base_data" / "shard_00001.parquet"))
    del huge
    Tokenizer.train_from_iterator(short, vocab_size=270).save(str(base / "tokenizer"))
    proc = start_child(["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=2",
                        "--total-batch-size=128", "--num-iterations=3", "--eval-every=-1", "--eval-tokens=128",
                        "--core-metric-every=-1", "--sample-every=-1"], "",
                       env={"JAXCHAT_BASE_DIR": str(base), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    try:
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert len(re.findall(r"^step 0000[0-2]/00003", out, re.M)) == 3
    peak = float(re.search(r"^Peak memory usage: ([\d.]+)MiB", out, re.M).group(1))
    assert peak < 4096, peak


def test_console_line_shows_the_eta_and_cpu_peak_memory_is_the_rss(trained):
    lines = [line for line in trained["out"].splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and all(re.search(r" \| eta: \d+\.\dm$", line) for line in lines), lines
    peak = re.search(r"^Peak memory usage: ([\d.]+)MiB$", trained["out"], re.M)
    assert peak and 50 < float(peak.group(1)) < 64 * 1024  # the process's peak RSS, not "n/a"
