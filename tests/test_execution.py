"""The code sandbox: success, failures, and the bad programs it must contain (loops, forks, memory, stray writes).

These run as root in CI, where file permissions and RLIMIT_NPROC do not protect anything, so each guard is tested
for what it really stops. Fork bombs are bounded (8 children) so a broken sandbox cannot take the machine down.
"""

import os
import socket
import threading
import time
import uuid

import pytest

from evals import execution
from evals.execution import execute_code

FORK_BYPASS = """
import _imp, importlib.machinery, time
# a fresh copy of the posix module, without the preamble's patches: the guard of last resort is the process group
# (or PID namespace) that the parent kills
posix = _imp.create_builtin(importlib.machinery.ModuleSpec("posix", importlib.machinery.BuiltinImporter))
for i in range(8):
    if posix.fork() == 0:
        time.sleep(60)
        posix._exit(0)
print("forked")
"""


def sandbox_processes():
    """Processes still running the sandbox preamble (their command line contains its text)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"sandbox: this function is disabled" in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.fixture(params=["namespaces", "plain"])
def mode(request, monkeypatch):
    """Run a test with unshare's namespaces (when this machine allows them) and without."""
    monkeypatch.setattr(execution, "_unshare_prefix", None)
    if request.param == "plain":
        monkeypatch.setenv("JAXCHAT_SANDBOX_UNSHARE", "0")
    elif not execution._namespace_prefix():
        pytest.skip("unshare is not usable here")
    yield request.param
    execution._unshare_prefix = None


def test_success_and_output():
    r = execute_code("import math\nprint(math.factorial(5))\nimport sys\nprint('warn', file=sys.stderr)")
    assert r.success and r.stdout == "120\n" and "warn" in r.stderr and r.error is None
    assert not r.timeout and not r.memory_exceeded


def test_exception_reported():
    r = execute_code("def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong answer'")
    assert not r.success and r.error == "AssertionError: wrong answer" and not r.timeout
    r = execute_code("def broken(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")
    r = execute_code("print(input())")  # stdin is empty
    assert not r.success and r.error.startswith("EOFError")


def test_infinite_loop_times_out(mode):
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=1.0)
    assert r.timeout and not r.success and r.error == "Execution timed out"
    assert time.time() - t0 < 8


def test_memory_hog(mode):
    r = execute_code("x = bytearray(2 * 1024**3)\nprint('allocated')", maximum_memory_bytes=256 * 1024**2)
    assert not r.success and r.memory_exceeded and "allocated" not in r.stdout


def test_fork_is_disabled(mode):
    r = execute_code("import os\nfor _ in range(8):\n    os.fork()")
    assert not r.success and "disabled" in r.error
    for code in ("import posix\nposix.fork()", "import subprocess", "import multiprocessing",
                 "import ctypes", "import os\nos.system('true')"):
        r = execute_code(code)
        assert not r.success, code
    assert sandbox_processes() == []


def test_fork_bomb_past_the_preamble_is_cleaned_up(mode):
    t0 = time.time()
    r = execute_code(FORK_BYPASS, timeout=2.0)
    assert "forked" in r.stdout
    assert time.time() - t0 < 10
    time.sleep(0.2)
    assert sandbox_processes() == []  # none of the 8 sleeping children survived


def test_write_outside_workdir_is_blocked(mode):
    target = f"/etc/jaxchat-sandbox-test-{uuid.uuid4().hex}"
    for code in (f"open({target!r}, 'w').write('x')",
                 f"import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import pathlib\npathlib.Path({target!r}).write_text('x')",
                 "import os\nos.remove('/etc/hostname')",
                 "import shutil\nshutil.rmtree('/tmp')"):
        r = execute_code(code)
        assert not r.success, code
        assert not os.path.exists(target)
    assert os.path.exists("/etc/hostname") or not os.path.exists("/etc")
    r = execute_code("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert r.success and r.stdout == "ok\n"  # its own directory is writable


def test_file_size_limit():
    r = execute_code("open('big', 'wb').write(b'x' * (8 * 1024**2))", max_file_bytes=1024**2)
    assert not r.success


def test_network_is_blocked(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = execute_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert not r.success
        r = execute_code(f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)")
        assert not r.success
    finally:
        server.close()


def test_thread_safe_calls():
    results = [None] * 4

    def run(i):
        results[i] = execute_code(f"print({i} * 2)")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == ["0\n", "2\n", "4\n", "6\n"]
    with pytest.raises(TypeError):
        execute_code(b"print(1)")
