"""Run model-written Python (HumanEval completions, RL rewards) in a throw-away sandbox process.

The job of nanochat's `nanochat/execution.py` (itself adapted from OpenAI's human-eval), built differently so it
is safe to call from threads (the Flask server, RL workers): no SIGALRM, no `multiprocessing`, no `preexec_fn`.

Layers, from the outside in:
- A fresh interpreter (`python -I`, so no PYTHON* env vars and no user site-packages) in its own session, with a
  minimal environment and a temporary working directory that is deleted afterwards.
- Where `unshare` works (root, or user namespaces enabled) the child also gets an empty network namespace and its
  own PID namespace: when the sandbox's first process dies the kernel kills everything it spawned.
- The parent enforces the wall-clock timeout (`communicate(timeout=...)`) and always SIGKILLs the whole process
  group afterwards, so nothing the program left behind survives the call.
- Inside the child a preamble runs before the program: resource limits (RLIMIT_CPU, RLIMIT_AS, RLIMIT_DATA,
  RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE); process creation disabled (`os.fork`, `posix.fork`, `subprocess`,
  `multiprocessing`, `ctypes`, ...) because root ignores RLIMIT_NPROC; sockets disabled; destructive file
  functions removed and `open` refused for writing outside the working directory (as root, file permissions
  do not protect /etc).

This is a guard against accidents (loops, fork bombs, memory hogs, stray writes), not a security boundary against
adversarial code: Python's introspection can dig the originals back out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

# Exit codes the preamble uses to tell the parent how the program ended.
_EXIT_OK, _EXIT_ERROR, _EXIT_MEMORY = 0, 3, 4


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run (nanochat `ExecutionResult`).

    success: the program ran to the end without an exception.
    stdout, stderr: what it printed (each truncated to `max_output_bytes`).
    error: "ExceptionType: message" when it failed, a timeout or memory message otherwise; None on success.
    timeout: killed by the wall-clock limit (or the CPU-time limit).
    memory_exceeded: raised MemoryError (or was killed) under the address-space limit.
    """
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False


# The preamble runs in the child before the untrusted program. It receives its settings as a JSON argument and the
# program on stdin, so nothing has to be quoted into source code.
_PREAMBLE = r'''
import builtins, io, json, os, sys, resource, traceback
cfg = json.loads(sys.argv[1])
code = sys.stdin.read()
sys.stdin.close()
sys.stdin = io.StringIO("")  # programs that read input get EOF, like nanochat's blocked stdin

def _limit(kind, value):
    if value is None:
        return
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass  # a hard limit lower than ours is fine

_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_CPU, cfg["cpu_seconds"])
_limit(resource.RLIMIT_AS, cfg["memory_bytes"])
_limit(resource.RLIMIT_DATA, cfg["memory_bytes"])
_limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
_limit(resource.RLIMIT_NPROC, cfg["nproc"])

workdir = os.path.realpath(os.getcwd())

def _inside(path):
    if isinstance(path, int):  # an already-open descriptor
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == workdir or path.startswith(workdir + os.sep)

_open, _io_open, _os_open = builtins.open, io.open, os.open

def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {file!r}")
    return _io_open(file, mode, *args, **kwargs)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
    return _os_open(path, flags, *args, **kwargs)

builtins.open = io.open = _guarded_open
os.open = _guarded_os_open

import posix, shutil, socket
def _disabled(*args, **kwargs):
    raise PermissionError("sandbox: this function is disabled")
# process creation, signals, privilege and destructive filesystem calls: on both os and the posix module it
# wraps, because `import posix; posix.fork()` would otherwise walk around the guard
for name in ("fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle", "execlp",
             "execlpe", "execv", "execve", "execvp", "execvpe", "kill", "killpg", "setuid", "setgid", "setsid",
             "setpgid", "putenv", "unsetenv", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
             "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
             "chroot", "chdir", "fchdir", "link", "symlink", "mkfifo", "mknod", "register_at_fork"):
    for mod in (os, posix):
        if hasattr(mod, name):
            setattr(mod, name, _disabled)
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, _disabled)
for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    setattr(socket, name, _disabled)
for name in ("subprocess", "_posixsubprocess", "multiprocessing", "ctypes", "_ctypes", "_socket", "pty",
             "resource", "signal", "_signal", "psutil", "tkinter", "ipdb", "joblib"):
    sys.modules[name] = None  # `import name` now raises ImportError
builtins.exit = builtins.quit = None
del resource

try:
    exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError as e:
    sys.stdout.flush()
    sys.stderr.write(f"sandbox-error: MemoryError: {e}\n"); sys.stderr.flush()
    os._exit(%(mem)d)
except BaseException as e:
    sys.stdout.flush()
    traceback.print_exc()
    sys.stderr.write(f"sandbox-error: {type(e).__name__}: {e}\n"); sys.stderr.flush()
    os._exit(%(err)d)
sys.stdout.flush(); sys.stderr.flush()
os._exit(%(ok)d)
''' % {"ok": _EXIT_OK, "err": _EXIT_ERROR, "mem": _EXIT_MEMORY}

_UNSHARE_ARGS = ["--net", "--pid", "--fork", "--kill-child"]
_unshare_prefix: Optional[list[str]] = None


def _namespace_prefix() -> list[str]:
    """`unshare` arguments when this machine lets us make network and PID namespaces, else [] (probed once)."""
    global _unshare_prefix
    if _unshare_prefix is None:
        exe = shutil.which("unshare")
        _unshare_prefix = []
        if exe and os.environ.get("JAXCHAT_SANDBOX_UNSHARE", "1") != "0":
            args = [exe] + _UNSHARE_ARGS
            if os.geteuid() != 0:
                args.insert(1, "--map-root-user")  # unprivileged: needs user namespaces
            try:
                probe = subprocess.run(args + ["true"], capture_output=True, timeout=10)
                if probe.returncode == 0:
                    _unshare_prefix = args
            except (OSError, subprocess.SubprocessError):
                pass
    return list(_unshare_prefix)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session, so its pid is the group id
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024,
                 max_processes: int = 16, max_file_bytes: int = 16 * 1024 * 1024,
                 max_output_bytes: int = 1 << 20) -> ExecutionResult:
    """Run a Python program in the sandbox and report how it ended (nanochat `execute_code`).

    Args:
        code: the whole program (for HumanEval: imports + completion + tests + `check(entry_point)`).
        timeout: wall-clock seconds before the process group is killed (the CPU-time limit is set a bit above).
        maximum_memory_bytes: RLIMIT_AS/RLIMIT_DATA of the child (None: unlimited).
        max_processes: RLIMIT_NPROC (only binds non-root users; for root the preamble blocks process creation).
        max_file_bytes: RLIMIT_FSIZE, the largest file the program may write in its directory.
        max_output_bytes: stdout/stderr kept per stream.
    Returns:
        ExecutionResult. A failing, looping, forking or memory-hungry program fails only its own call.
    Raises:
        TypeError: `code` is not a string.
    """
    if not isinstance(code, str):
        raise TypeError(f"execute_code: code must be str, got {type(code).__name__}")
    cfg = {
        "cpu_seconds": int(timeout) + 2,
        "memory_bytes": maximum_memory_bytes,
        "file_bytes": max_file_bytes,
        "nproc": max_processes,
    }
    workdir = tempfile.mkdtemp(prefix="jaxchat-sandbox-")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = _namespace_prefix() + [sys.executable, "-I", "-c", _PREAMBLE, json.dumps(cfg)]
    timed_out = False
    try:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            out, err = proc.communicate(code.encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild still holds the pipes open (no PID namespace)
                proc.kill()
                out, err = b"", b""
        finally:
            _kill_group(proc)  # whatever the program spawned dies with it
        rc = proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stdout = out[:max_output_bytes].decode("utf-8", errors="replace")
    stderr = err[:max_output_bytes].decode("utf-8", errors="replace")
    # the last "sandbox-error:" line is the preamble's summary of the exception
    error = None
    for line in reversed(stderr.splitlines()):
        if line.startswith("sandbox-error: "):
            error = line[len("sandbox-error: "):]
            break
    cpu_killed = rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)
    if timed_out or (cpu_killed and error is None and rc != _EXIT_MEMORY):
        return ExecutionResult(False, stdout, stderr, error="Execution timed out", timeout=True)
    if rc == _EXIT_OK:
        return ExecutionResult(True, stdout, stderr)
    if rc == _EXIT_MEMORY or (error and error.startswith("MemoryError")):
        return ExecutionResult(False, stdout, stderr, error=f"Memory limit exceeded: {error}", memory_exceeded=True)
    if error is None:
        error = f"Execution failed (exit status {rc})"
    return ExecutionResult(False, stdout, stderr, error=error)
