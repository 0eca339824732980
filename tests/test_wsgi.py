"""serve/wsgi.py: a Flask app on waitress, against a minimal app defined here (a JSON endpoint, an SSE stream).

Everything talks to 127.0.0.1 only; every socket has a timeout and every wait a bound, so no test can hang.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from flask import Flask, Response, request

from serve.wsgi import STOPPING, Server
from serving import raw_status

ROOT = Path(__file__).resolve().parents[1]


class Probe:
    """What the app saw: calls, the largest number of requests in it at once, stream progress."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0
        self.inside = 0
        self.most_inside = 0
        self.release = threading.Event()  # the stream waits on it after its first event
        self.stream_waiting = threading.Event()  # set while the stream's generator waits for `release`
        self.stream_closed = threading.Event()


def make_app(probe: Probe) -> Flask:
    app = Flask("wsgi-test")

    @app.before_request
    def count():
        with probe.lock:
            probe.calls += 1

    @app.get("/json")
    def get_json():
        return {"ok": True}

    @app.post("/echo")
    def echo():
        body = request.get_json()
        return {"keys": sorted(body), "length": request.content_length}

    @app.get("/slow")
    def slow():
        with probe.lock:
            probe.inside += 1
            probe.most_inside = max(probe.most_inside, probe.inside)
        time.sleep(float(request.args.get("s", "0.3")))
        with probe.lock:
            probe.inside -= 1
        return {"slept": True}

    @app.get("/stream")
    def stream():
        def events():
            try:
                yield f"data: {json.dumps({'n': 0})}\n\n"
                probe.stream_waiting.set()
                probe.release.wait(10)
                probe.stream_waiting.clear()
                for n in (1, 2):
                    yield f"data: {json.dumps({'n': n})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                probe.stream_closed.set()

        return Response(events(), mimetype="text/event-stream")

    @app.get("/stopping")
    def stopping():
        return {"has_event": isinstance(request.environ.get(STOPPING), threading.Event)}

    return app


@pytest.fixture
def server_factory():
    started = []

    def start(probe=None, **settings):
        probe = probe or Probe()
        server = Server(make_app(probe), "127.0.0.1", 0, **settings)
        thread = server.start_in_thread(shutdown_timeout=5)
        started.append((server, thread))
        return server, probe

    yield start
    for server, thread in started:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()


def _connect(server, timeout=10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def test_json_endpoint_and_server_header(server_factory):
    server, _ = server_factory()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/json")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"ok": True}
    assert resp.getheader("Server") == "jaxchat" and "werkzeug" not in str(resp.headers).lower()
    conn.request("GET", "/stopping")  # same keep-alive connection
    assert json.loads(conn.getresponse().read()) == {"has_event": True}
    conn.close()


def test_sse_events_arrive_while_the_generator_is_still_producing(server_factory):
    """The first event reaches the client while the app's generator is blocked before its second: waitress sends
    each chunk as it is written (no response buffering)."""
    server, probe = server_factory()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/stream")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.readline() == b'data: {"n": 0}\n'
    # the event is here, and the generator has not finished: it is waiting for `release` before its next event
    assert probe.stream_waiting.wait(5) and not probe.stream_closed.is_set()
    probe.release.set()
    rest = resp.read().decode()
    assert rest == '\ndata: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    assert probe.stream_closed.wait(5)
    conn.close()


CHUNKED = (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")


def test_chunked_body_is_dechunked_for_the_app(server_factory):
    server, _ = server_factory()
    body = b'4\r\n{"a"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'  # {"a": 1} in three chunks
    status, data = raw_status(server.port, CHUNKED + body, half_close=True)
    assert status == 200 and json.loads(data.split(b"\r\n\r\n", 1)[1]) == {"keys": ["a"], "length": 8}


@pytest.mark.parametrize("name, body, half_close", [
    ("chunk size zz", b"zz\r\n{}\r\n0\r\n\r\n", False),
    ("negative chunk size", b"-2\r\n{}\r\n0\r\n\r\n", False),
    ("junk after a chunk", b"2\r\n{}XX\r\n0\r\n\r\n", False),
    ("bad chunk extension", b"2;\x01\r\n{}\r\n0\r\n\r\n", False),
    ("truncated chunk, client closes its side", b"10\r\n{\"a\":", True),
    ("truncated chunk, client goes idle", b"10\r\n{\"a\":", False),
    ("chunk shorter than its size", b"5\r\n{}\r\n0\r\n\r\n", False),
])
def test_malformed_or_truncated_chunked_body_is_400_and_never_reaches_the_app(server_factory, name, body,
                                                                              half_close):
    server, probe = server_factory(channel_timeout=1)
    t0 = time.monotonic()
    status, data = raw_status(server.port, CHUNKED + body, half_close=half_close)
    assert status == 400, (name, data)
    assert probe.calls == 0
    assert time.monotonic() - t0 < 8  # the idle ones: channel_timeout (1 s) plus the cleanup interval


def test_threads_bound_the_requests_in_the_app(server_factory):
    server, probe = server_factory(threads=2)
    results = []

    def get():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/slow?s=0.3")
        results.append(conn.getresponse().status)
        conn.close()

    workers = [threading.Thread(target=get) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert results == [200] * 6 and probe.most_inside == 2


def test_idle_and_slowloris_connections_do_not_stop_a_request_and_idle_ones_time_out(server_factory):
    """100 idle connections and 100 slowloris ones (headers trickling in) on a server with 2 threads: they hold no
    thread, a normal request is still answered at once, and the idle ones are closed after channel_timeout."""
    server, _ = server_factory(threads=2, channel_timeout=2)
    threads_before = threading.active_count()
    idle = [_connect(server, timeout=15) for _ in range(100)]
    slow = [_connect(server, timeout=15) for _ in range(100)]
    try:
        for s in slow:
            s.sendall(b"GET /json HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stop_trickle = threading.Event()

        def trickle():  # one more header line per connection every 0.5 s: never idle, never finished
            n = 0
            while not stop_trickle.wait(0.5):
                n += 1
                for s in slow:
                    try:
                        s.sendall(f"X-Slow-{n}: 1\r\n".encode())
                    except OSError:
                        pass

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/json")
        assert conn.getresponse().status == 200
        conn.close()
        assert time.monotonic() - t0 < 5.0  # slowloris connections never idle out: blocked would mean forever
        assert threading.active_count() <= threads_before + 2  # no thread per connection (+ the trickler)
        # idle connections are closed by the server after channel_timeout (2 s) + cleanup interval (1 s)
        deadline = time.monotonic() + 10
        closed = 0
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += s.recv(1) == b""
            except (socket.timeout, OSError):
                pass
        assert closed == len(idle)
        stop_trickle.set()
        trickler.join(5)
    finally:
        for s in idle + slow:
            s.close()


def test_connection_limit_holds_extra_connections_in_the_backlog(server_factory):
    """With connection_limit=10 (waitress counts its own two sockets) 20 idle connections leave no room: a request
    waits in the backlog until idle ones time out, then is served."""
    server, _ = server_factory(connection_limit=10, channel_timeout=1)
    idle = [_connect(server) for _ in range(20)]
    try:
        time.sleep(0.3)
        assert len(server._server.active_channels) <= 8
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/json")
        assert conn.getresponse().status == 200
        conn.close()
        # served only once idle ones were reaped (rounds of channel_timeout + cleanup interval, ~1-2 s each)
        assert 0.5 < time.monotonic() - t0 < 25
    finally:
        for s in idle:
            s.close()


CHILD = textwrap.dedent("""
    import json, sys, time
    from flask import Flask, Response
    from serve.wsgi import serve

    marker = sys.argv[1]
    app = Flask("child")

    @app.get("/stream")
    def stream():
        def events():
            try:
                for n in range(10_000):
                    yield f"data: {json.dumps({'n': n})}\\n\\n"
                    time.sleep(0.05)
            finally:
                open(marker, "w").close()  # the app's generator was closed: it could release its slot
        return Response(events(), mimetype="text/event-stream")

    @app.get("/slow")
    def slow():
        time.sleep(1.5)
        return {"done": True}

    serve(app, "127.0.0.1", 0, threads=4, shutdown_timeout=10,
          on_listening=lambda s: print(s.port, flush=True))
    print("exited cleanly", flush=True)
""")


def test_sigterm_ends_streams_cleanly_lets_requests_finish_and_exits(tmp_path):
    marker = tmp_path / "stream-closed"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=tmp_path)
    try:
        port = int(child.stdout.readline())
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        stream.request("GET", "/stream")
        resp = stream.getresponse()
        assert resp.readline() == b'data: {"n": 0}\n'
        slow_result = []

        def slow():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/slow")
            r = conn.getresponse()
            slow_result.append((r.status, json.loads(r.read())))

        slow_thread = threading.Thread(target=slow)
        slow_thread.start()
        time.sleep(0.5)  # /slow is now computing
        child.send_signal(signal.SIGTERM)
        rest = resp.read()  # ends with the chunked terminator: a clean end, no IncompleteRead
        assert rest.endswith(b"\n\n") and b"[DONE]" not in rest
        slow_thread.join(10)
        assert slow_result == [(200, {"done": True})]  # the request in flight finished
        assert child.wait(10) == 0 and child.stdout.read().strip() == "exited cleanly"
        assert marker.exists()
        with pytest.raises(OSError):  # nobody listens any more
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
