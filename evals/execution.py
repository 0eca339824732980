"""Run model-written Python (HumanEval completions) inside an operating-system sandbox, and score it by the harness.

The job of nanochat's `nanochat/execution.py` (itself adapted from OpenAI's human-eval `execution.py`), built on
the kernel instead of on Python-level patches, which introspection always walks around. Safe to call from threads
(no SIGALRM, no `multiprocessing`, no `preexec_fn`).

What is isolated (Debian's `bubblewrap`, `bwrap`, one sandbox per call):
- Namespaces: user, mount, pid, net, ipc and uts (and cgroup where the kernel has it). All six work in the
  containers these machines run (root, kernel 6.x); without user namespaces there is no sandbox (see below).
- User: the program never runs as root of any namespace and holds no capability. As root (the usual case here),
  `execute_code` builds once per process a user namespace that maps 0 to 0 (bwrap needs it for the mounts) and a
  block of otherwise unused uids (2**30 .. 2**30 + 65535) onto themselves, with nested user namespaces capped at 0;
  bwrap enters it, and the harness switches to a uid of its own for each run before the program starts. A real,
  unprivileged kernel uid matters: the kernel does not apply RLIMIT_NPROC to uid 0. As a non-root caller, bwrap
  makes the namespace itself and the program is uid/gid 65534 there (`--disable-userns`, `--cap-drop ALL`).
  Set-uid binaries do nothing (bwrap mounts nosuid and sets no_new_privs).
- Filesystem: a read-only view of `/usr` (and the merged-`/usr` links `/bin`, `/lib`, `/lib64`) and of the Python
  installation's prefixes; nothing else of the host (no `/etc`, `/home`, `/work`, the rest of `/root`, `/sys`).
  `/tmp` is a private, size-limited tmpfs (the working directory, `HOME` and `TMPDIR`); `/dev` is bwrap's minimal
  one; `/proc` belongs to the new pid namespace. The interpreter runs `-I -S`: site-packages are on `sys.path`
  (numpy imports) but no `.pth` file runs.
- Network: an empty network namespace (only its own loopback), so nothing on the host, 127.0.0.1 included, is
  reachable.
- Processes: the program leads a new session (`--new-session`, no terminal to inject into) inside a new pid
  namespace whose init dies with the caller (`--die-with-parent`). At the end of every call, and at the wall-clock
  timeout, the init is SIGKILLed through a pidfd and the kernel kills every process of the namespace, `setsid`
  orphans included, before `execute_code` returns.

Limits (setrlimit in the child, hard = soft, so the program cannot raise them): CPU seconds (RLIMIT_CPU,
`ceil(timeout) + 1`), address space (RLIMIT_AS and RLIMIT_DATA, `maximum_memory_bytes`), processes and threads
(RLIMIT_NPROC, counted per user namespace, `max_processes`), file and output size (RLIMIT_FSIZE,
`max_file_bytes`: stdout and stderr are files, so it bounds them too; the caller keeps `max_output_bytes` of each),
no core dumps, size of `/tmp` (`max_tmp_bytes`), and a wall-clock `timeout` after which the namespace is killed.

The verdict comes from the harness, not from the exit status: the parent writes a fresh random nonce into a pipe;
the harness reads it only after the whole program (for HumanEval, its last statement is `check(entry_point)`) has
returned without an exception, and writes it back on a second pipe. A program that exits early (`os._exit(0)`,
`sys.exit(0)`, a signal, a forked child) or prints made-up markers cannot produce the nonce, because it is not in
the process until the checks are over. (Code that deliberately reads the harness's descriptors, or that fakes
`__eq__` on its results, can still fake a pass: no in-process scheme prevents that; the sandbox protects the host,
the nonce protects the score from ordinary early exits.)

Where no isolation is available (no `bwrap`, or its self-check fails: e.g. user namespaces disabled), `execute_code`
refuses with `SandboxUnavailable`, unless the caller opts out explicitly (`unsafe=True`, or `JAXCHAT_UNSAFE_EXEC=1`,
which `python -m evals.chat_eval --unsafe-exec` sets): then the program runs as a plain child process with the same
limits, a temporary working directory, its own session (killed at the end) and nanochat's accident guard (os.system,
os.kill, shutil.rmtree, subprocess.Popen disabled; nothing that breaks imports), and nothing else between it and the
host.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

from jaxchat.common import UserError

# Exit codes the harness uses to tell the parent how the program ended.
_EXIT_OK, _EXIT_ERROR, _EXIT_MEMORY = 0, 3, 4
_SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace


class SandboxUnavailable(UserError, OSError):
    """No operating-system isolation here, and the caller did not opt out with `--unsafe-exec`. An OSError too, so
    callers that skip an eval whose inputs are missing (SFT's ChatCORE) skip HumanEval the same way."""


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run (nanochat `ExecutionResult`).

    success: the harness saw the whole program return without an exception (the nonce came back).
    stdout, stderr: what it printed (each truncated to `max_output_bytes`).
    error: "ExceptionType: message" when it failed, a timeout or memory message otherwise; None on success.
    timeout: killed by the wall-clock limit (or the CPU-time limit).
    memory_exceeded: raised MemoryError under the address-space limit.
    """
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False


# The harness runs in the child before and after the program. Settings come as a JSON argument and the program on
# stdin, so nothing is quoted into source code. It keeps its own references to the few functions it needs after
# the program ran, so a program that patches `os` only spoils its own verdict.
_HARNESS = r'''
def _harness():
    import builtins, json, os, resource, sys, traceback
    cfg = json.loads(sys.argv[1])
    if cfg["run_uid"] is not None:  # root's namespace: leave uid 0 (and every capability) before anything else
        os.chown("/tmp", cfg["run_uid"], cfg["run_uid"])  # its private tmpfs, made by bwrap for uid 0
        os.chmod("/tmp", 0o700)
        os.setgroups([])
        os.setgid(cfg["run_uid"])
        os.setuid(cfg["run_uid"])
    for kind, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                        (resource.RLIMIT_AS, cfg["memory_bytes"]), (resource.RLIMIT_DATA, cfg["memory_bytes"]),
                        (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NPROC, cfg["nproc"])):
        if value is not None:
            try:
                resource.setrlimit(kind, (value, value))
            except (ValueError, OSError):
                pass  # a hard limit already lower than ours binds anyway
    code = sys.stdin.buffer.read().decode("utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # programs that read input get EOF
    os.close(null)
    sys.path.extend(p for p in cfg["site_paths"] if p not in sys.path)  # site-packages, without running .pth files
    if cfg["guard"]:  # unsafe mode only: nanochat's accident guard, minus what breaks imports
        import shutil, subprocess
        def disabled(*args, **kwargs):
            raise PermissionError("unsafe-exec guard: this function is disabled")
        os.system = os.kill = os.killpg = shutil.rmtree = subprocess.Popen = disabled
    nonce_fd, verdict_fd = cfg["nonce_fd"], cfg["verdict_fd"]
    read, write, exit_, flush = os.read, os.write, os._exit, sys.stdout.flush
    err = sys.stderr
    del cfg
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError as e:
        try:
            flush()
        except BaseException:
            pass
        err.write(f"sandbox-error: MemoryError: {e}\n"); err.flush()
        exit_(%(mem)d)
    except BaseException as e:
        try:
            flush()
        except BaseException:
            pass
        traceback.print_exc()
        err.write(f"sandbox-error: {type(e).__name__}: {e}\n"); err.flush()
        exit_(%(err)d)
    try:
        flush(); err.flush()
    except BaseException:
        pass
    write(verdict_fd, read(nonce_fd, 64))  # only now, after the program's last statement returned
    exit_(%(ok)d)
_harness()
''' % {"ok": _EXIT_OK, "err": _EXIT_ERROR, "mem": _EXIT_MEMORY}


def _bwrap_path() -> Optional[str]:
    """The bubblewrap binary: $JAXCHAT_BWRAP (tests point it elsewhere) or `bwrap` on PATH."""
    return shutil.which(os.environ.get("JAXCHAT_BWRAP", "bwrap"))


def _ro_view() -> list[str]:
    """bwrap arguments for the read-only view the interpreter needs: /usr, merged-/usr links, Python's prefixes."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    prefixes.add(os.path.dirname(os.path.realpath(sys.executable)))
    made = set()
    for p in sorted(prefixes):
        if not (p == "/usr" or p.startswith("/usr/")) and os.path.isdir(p):
            # bwrap would copy the host's modes onto the mount point's parents (/root is 0700): open them up, so
            # that the unprivileged run uid can reach the interpreter
            parts = p.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parent = "/" + "/".join(parts[:i])
                if parent not in made:
                    made.add(parent)
                    args += ["--perms", "0755", "--dir", parent]
            args += ["--ro-bind", p, p]
    return args


# As root, RLIMIT_NPROC binds only uids other than 0 (the kernel exempts the root user), and bwrap alone can map the
# sandbox's uid only onto the caller's. So root builds one user namespace per process that maps 0 to 0 (for bwrap's
# mounts) and a block of otherwise unused uids onto themselves; every run gets its own uid of the block, which the
# harness switches to before the program runs. Nested user namespaces are capped at 0 inside it.
_RUN_UID_BASE, _RUN_UID_COUNT = 1 << 30, 1 << 16
_userns_lock = threading.Lock()
_userns_fd: Optional[int] = None
_run_uid_counter = 0


def _root_userns() -> int:
    """A descriptor of the shared user namespace for root's sandboxes (created on first use; needs util-linux
    `unshare`). Raises OSError when it cannot be built."""
    global _userns_fd
    with _userns_lock:
        if _userns_fd is not None:
            return _userns_fd
        unshare = shutil.which("unshare")
        if unshare is None:
            raise OSError("util-linux `unshare` not found")
        holder = subprocess.Popen(
            [unshare, "--user", "/bin/sh", "-c",
             # the second exec runs as the namespace's mapped uid 0, which gives it back the capabilities that the
             # first one (still unmapped) lost
             "read go && exec /bin/sh -c 'echo 0 > /proc/sys/user/max_user_namespaces && echo ok && exec sleep 60'"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            own = os.readlink("/proc/self/ns/user")
            for _ in range(1000):
                if os.readlink(f"/proc/{holder.pid}/ns/user") != own:
                    break
                time.sleep(0.002)
            else:
                raise OSError("unshare --user did not make a user namespace")
            block = f"0 0 1\n{_RUN_UID_BASE} {_RUN_UID_BASE} {_RUN_UID_COUNT}\n"
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{holder.pid}/{name}", "w") as f:
                    f.write(block)
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
            if holder.stdout.readline() != b"ok\n":
                raise OSError(f"cannot cap nested user namespaces: {holder.stderr.read1(4096).decode().strip()}")
            fd = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            holder.kill()
            holder.wait()
        _userns_fd = fd
        return fd


def _next_run_uid() -> int:
    global _run_uid_counter
    with _userns_lock:
        _run_uid_counter = (_run_uid_counter + 1) % _RUN_UID_COUNT
        return _RUN_UID_BASE + _run_uid_counter


def _bwrap_command(bwrap: str, tmp_bytes: int, userns_fd: Optional[int]) -> list[str]:
    """The bwrap command line; `userns_fd` is root's shared namespace (None: bwrap makes one, as non-root)."""
    if userns_fd is not None:
        user = ["--userns", str(userns_fd), "--uid", "0", "--gid", "0"]
    else:
        user = ["--unshare-user", "--disable-userns", "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID),
                "--cap-drop", "ALL"]
    return [bwrap, *user, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "sandbox",
            *_ro_view(), "--proc", "/proc", "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp",
            "--chdir", "/tmp"]


# The self-check program: it must see itself as an unprivileged uid without capabilities, a read-only view without
# the host's files, only a loopback interface and no nested user namespaces, or the sandbox is not what this module
# promises.
_PROBE = """
import os, shutil, subprocess
assert os.getuid() != 0 and os.getgid() != 0 and os.getgroups() in ([], [os.getgid()]), (os.getuid(), os.getgid())
caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]
assert int(caps, 16) == 0, caps
assert not os.path.exists('/etc/passwd') and not os.path.exists('/work') and not os.path.exists('/root/.bashrc')
try:
    os.mkdir('/usr/jaxchat-probe')
    raise AssertionError('/usr is writable')
except OSError:
    pass
ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]
assert ifaces == ['lo'], ifaces
open('/tmp/probe', 'w').write('ok')
if shutil.which('unshare'):
    assert subprocess.run(['unshare', '--user', 'true'], capture_output=True).returncode != 0, 'nested user namespace'
"""

_probe_lock = threading.Lock()
_probe_cache: dict[str, Optional[str]] = {}  # bwrap path -> None when it works, else the reason it does not


def sandbox_problem() -> Optional[str]:
    """Why untrusted code cannot be isolated here (None when bwrap works). Probed once per bwrap binary.

    The probe runs a real sandboxed program that checks its own uid, capabilities, filesystem and network.
    """
    bwrap = _bwrap_path()
    if bwrap is None:
        return f"bubblewrap not found ({os.environ.get('JAXCHAT_BWRAP', 'bwrap')!r} is not on PATH)"
    with _probe_lock:
        if bwrap not in _probe_cache:
            try:
                r = _run(_PROBE, bwrap, timeout=20.0, memory_bytes=512 << 20, nproc=16, file_bytes=1 << 20,
                         output_bytes=1 << 14, tmp_bytes=1 << 20, guard=False)
                detail = " | ".join(r.stderr.strip().splitlines()[-3:])  # one line: the message is a UserError
                reason = f"{bwrap} fails its self-check: {r.error}" + (f" ({detail})" if detail else "")
                _probe_cache[bwrap] = None if r.success else reason
            except OSError as e:
                _probe_cache[bwrap] = f"{bwrap} cannot start: {e}"
        return _probe_cache[bwrap]


def unsafe_exec_requested() -> bool:
    """True when $JAXCHAT_UNSAFE_EXEC is 1/true/yes (set by `evals.chat_eval --unsafe-exec`)."""
    return os.environ.get("JAXCHAT_UNSAFE_EXEC", "").strip().lower() in ("1", "true", "yes")


def _refusal(problem: str) -> SandboxUnavailable:
    return SandboxUnavailable(
        f"refusing to run model-written code without isolation: {problem}. Install bubblewrap "
        f"(`apt-get install bubblewrap`; user namespaces must be enabled), or accept the risk with "
        f"`--unsafe-exec` (JAXCHAT_UNSAFE_EXEC=1)")


def require_isolation() -> None:
    """Raise SandboxUnavailable (a one-line UserError with the fix) unless bwrap works or unsafe exec was asked for."""
    problem = sandbox_problem()
    if problem is not None and not unsafe_exec_requested():
        raise _refusal(problem)


_warned_unsafe = False


def _read_all(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _wait_gone(pidfd: Optional[int], seconds: float) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [], seconds)  # readable once the process has exited


def _run(code: str, bwrap: Optional[str], *, timeout: float, memory_bytes: Optional[int], nproc: int,
         file_bytes: int, output_bytes: int, tmp_bytes: int, guard: bool) -> ExecutionResult:
    """One run: bwrap sandbox when `bwrap` is a path, a plain child process when None (unsafe mode)."""
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    info_r, info_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    workdir = None
    cfg = {"cpu_seconds": math.ceil(timeout) + 1, "memory_bytes": memory_bytes, "file_bytes": file_bytes,
           "nproc": nproc, "nonce_fd": nonce_r, "verdict_fd": verdict_w, "guard": guard,
           "site_paths": sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})}
    pass_fds = [nonce_r, verdict_w, info_w]
    cfg["run_uid"] = None
    if bwrap is not None:
        home, cwd = "/tmp", "/"
        userns_fd = _root_userns() if os.geteuid() == 0 else None
        if userns_fd is not None:
            cfg["run_uid"] = _next_run_uid()
            pass_fds.append(userns_fd)
        cmd = _bwrap_command(bwrap, tmp_bytes, userns_fd) + ["--info-fd", str(info_w)]
    else:
        workdir = home = cwd = tempfile.mkdtemp(prefix="jaxchat-unsafe-exec-")
        cmd = []
    cmd += [os.path.realpath(sys.executable), "-I", "-S", "-c", _HARNESS, json.dumps(cfg)]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home, "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    timed_out = False
    pidfd = None
    try:
        with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            src.write(code.encode("utf-8"))
            src.seek(0)
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=src, stdout=out, stderr=err, close_fds=True,
                                    pass_fds=pass_fds, start_new_session=True)
            for fd in (nonce_r, verdict_w, info_w):
                os.close(fd)
            nonce_r = verdict_w = info_w = -1
            try:
                if bwrap is not None:
                    # bwrap writes the namespace init's pid once it exists (EOF if it failed before that); a pidfd
                    # names that process exactly, so killing it cannot hit a recycled pid
                    info, deadline = b"", time.monotonic() + timeout
                    while select.select([info_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                        chunk = os.read(info_r, 4096)
                        if not chunk:
                            break
                        info += chunk
                    try:
                        pidfd = os.pidfd_open(json.loads(info)["child-pid"])
                    except (ValueError, KeyError, OSError):
                        pidfd = None
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
            finally:
                # the end of every run: the namespace's init dies and the kernel kills all its processes (orphans
                # included); the outer bwrap follows. Unsafe mode can only kill the session's process group.
                if pidfd is not None:
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
                _wait_gone(pidfd, 5.0)
            os.set_blocking(verdict_r, False)
            try:
                verdict = os.read(verdict_r, 256)
            except BlockingIOError:
                verdict = b""
            stdout, stderr = _read_all(out, output_bytes), _read_all(err, output_bytes)
    finally:
        for fd in (nonce_r, verdict_w, info_w, verdict_r, info_r, pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    # the last "sandbox-error:" line is the harness's summary of the exception (the program could print fake ones:
    # they change only the message of a failure, never the verdict)
    error = None
    for line in reversed(stderr.splitlines()):
        if line.startswith("sandbox-error: "):
            error = line[len("sandbox-error: "):]
            break
    passed = verdict == nonce and rc == _EXIT_OK and not timed_out
    if passed:
        return ExecutionResult(True, stdout, stderr)
    signalled = rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)
    if timed_out or (signalled and error is None):
        return ExecutionResult(False, stdout, stderr, error="Execution timed out", timeout=True)
    if rc == _EXIT_MEMORY or (error and error.startswith("MemoryError")):
        return ExecutionResult(False, stdout, stderr, error=f"Memory limit exceeded: {error}", memory_exceeded=True)
    if error is None:
        error = (f"Execution failed (exit status {rc})" if rc != _EXIT_OK
                 else "Program exited before its checks finished (no verdict from the harness)")
    return ExecutionResult(False, stdout, stderr, error=error)


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024,
                 max_processes: int = 16, max_file_bytes: int = 16 * 1024 * 1024,
                 max_output_bytes: int = 1 << 20, max_tmp_bytes: int = 64 * 1024 * 1024,
                 unsafe: Optional[bool] = None) -> ExecutionResult:
    """Run a Python program in the bwrap sandbox and report how it ended (nanochat `execute_code`).

    Args:
        code: the whole program (for HumanEval: imports + completion + tests + `check(entry_point)`).
        timeout: wall-clock seconds before the sandbox's pid namespace is killed (RLIMIT_CPU is ceil(timeout) + 1).
        maximum_memory_bytes: RLIMIT_AS/RLIMIT_DATA of the program (None: unlimited).
        max_processes: RLIMIT_NPROC: processes and threads of the sandbox's user (the program counts as one).
        max_file_bytes: RLIMIT_FSIZE: the largest file it may write, stdout and stderr included.
        max_output_bytes: stdout/stderr kept per stream.
        max_tmp_bytes: size of its private /tmp (tmpfs; sandbox only).
        unsafe: run without isolation if bwrap is unusable (None: $JAXCHAT_UNSAFE_EXEC decides).
    Returns:
        ExecutionResult; `success` only when the harness saw the program run to its end. A failing, looping,
        forking, exiting or memory-hungry program fails only its own call.
    Raises:
        TypeError: `code` is not a string.
        SandboxUnavailable: no working bwrap here and unsafe exec was not asked for (the message says how to fix).
    """
    if not isinstance(code, str):
        raise TypeError(f"execute_code: code must be str, got {type(code).__name__}")
    problem = sandbox_problem()
    if problem is not None:
        if not (unsafe if unsafe is not None else unsafe_exec_requested()):
            raise _refusal(problem)
        global _warned_unsafe
        if not _warned_unsafe:
            _warned_unsafe = True
            print(f"evals.execution: running model-written code WITHOUT isolation (unsafe exec): {problem}",
                  file=sys.stderr)
        bwrap = None
    else:
        bwrap = _bwrap_path()
    return _run(code, bwrap, timeout=timeout, memory_bytes=maximum_memory_bytes, nproc=max_processes,
                file_bytes=max_file_bytes, output_bytes=max_output_bytes, tmp_bytes=max_tmp_bytes, guard=bwrap is None)
