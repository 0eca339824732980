"""Run a WSGI app (the Flask chat server) on waitress, a production WSGI server, and stop it gracefully.

Why waitress rather than werkzeug's development server or gunicorn:
- werkzeug's `run_simple` starts one thread per connection with no bound and no idle timeout, names itself in the
  `Server` header, and hands a malformed chunked body to the app (which then fails with a 500).
- gunicorn's workers are forked processes: each would load the model and its JAX devices again, and a fork after
  JAX has started its threads is unsafe. Its gthread worker in one process still needs the fork.
- waitress is one process: an asyncore loop owns every socket (an idle or slow connection costs a socket, not a
  thread), a fixed pool of `threads` runs the app, connections beyond `connection_limit` wait in the listen backlog,
  idle connections close after `channel_timeout`, and it reads and de-chunks request bodies itself (a malformed
  chunk is its 400, a body over `max_request_body_size` its 413), so the app always sees a whole body with its
  Content-Length. A request cut off mid-way (truncated chunked body, unfinished headers) gets a 400 here too when
  the client closes its side or the connection idles out, where waitress alone would close without a word. Each write of the app reaches the socket at once (waitress 3's send_bytes is 1), so Server-Sent
  Events stream token by token.

Every request in flight, a stream included, holds one of the `threads` until it ends; requests beyond that wait
in waitress's queue. Size `threads` to the requests the app may hold at once (engine slots plus its wait queue).

Stopping (`serve` on SIGTERM or SIGINT, `Server.stop` in tests): the listening socket closes, a response still
streaming ends cleanly after its current chunk (its iterator is closed, so the app's generator can release what it
holds, and the chunked body gets its terminator), requests still computing get `shutdown_timeout` seconds to finish,
then every connection closes. The app can see the stop coming: `environ[STOPPING]` is a `threading.Event`. A second
signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)

STOPPING = "jaxchat.server_stopping"  # WSGI environ key: a threading.Event set when the server starts stopping

# Defaults sized for the chat server on one host (the command that runs it can override each).
THREADS = 64  # requests handled at once: engine slots plus the app's wait queue
CONNECTION_LIMIT = 512  # open connections, idle ones included; more wait in the listen backlog
CHANNEL_TIMEOUT = 60  # seconds an idle keep-alive connection or a stalled request upload stays open
MAX_REQUEST_BODY_SIZE = 1 << 20  # bytes; waitress answers 413 beyond it
SHUTDOWN_TIMEOUT = 30.0  # seconds requests still computing get to finish after a stop


_INCOMPLETE_BODY = b"the request ended (connection closed or idle) before its headers or body were complete\n"


def _incomplete_request_channel(base: type) -> type:
    """waitress's channel, answering 400 to a request cut off mid-way (a truncated chunked body, headers that
    never end) instead of closing silently: on EOF from the client and when `channel_timeout` closes it."""

    class Channel(base):
        def handle_close(self):
            request = self.request  # the request being read; None between requests
            if request is not None and self.connected and not self.requests and (
                    request.header_bytes_received or request.headers_finished):
                head = (f"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                        f"Content-Length: {len(_INCOMPLETE_BODY)}\r\nServer: {self.adj.ident}\r\n\r\n")
                try:  # best effort: the socket is non-blocking and the client may be gone
                    self.socket.send(head.encode() + _INCOMPLETE_BODY)
                except OSError:
                    pass
                self.request = None
            super().handle_close()

    return Channel


def _ending_on_stop(body: Iterable[bytes], stopping: threading.Event):
    """The response body, ended after the current chunk once the server is stopping; always closes `body`."""
    try:
        for chunk in body:
            yield chunk
            if stopping.is_set():
                return
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class Server:
    """`app` on waitress at host:port (port 0: a free port, see `.port`). Run with `run()`, stop with `stop()`.

    Args:
        app: a WSGI application (a Flask app).
        host, port: where to listen.
        threads: requests handled at once (each in-flight request, streams included, holds one).
        connection_limit: open connections, idle ones included (waitress counts its own two sockets too).
        channel_timeout: seconds before an idle connection (no request in flight) is closed.
        max_request_body_size: bytes; a larger body gets 413 from waitress.
        ident: the `Server` response header.
    """

    def __init__(self, app: Callable, host: str = "127.0.0.1", port: int = 0, *, threads: int = THREADS,
                 connection_limit: int = CONNECTION_LIMIT, channel_timeout: int = CHANNEL_TIMEOUT,
                 max_request_body_size: int = MAX_REQUEST_BODY_SIZE, ident: str = "jaxchat"):
        import waitress

        self.stopping = threading.Event()
        self._app = app
        self._server = waitress.create_server(
            self._wrapped, host=host, port=port, threads=threads, connection_limit=connection_limit,
            channel_timeout=channel_timeout, cleanup_interval=max(1, min(30, channel_timeout // 2)),
            max_request_body_size=max_request_body_size, ident=ident, asyncore_use_poll=True)
        self._server.channel_class = _incomplete_request_channel(self._server.channel_class)
        self.host, self.port = self._server.effective_host, self._server.effective_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wrapped(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ[STOPPING] = self.stopping
        return _ending_on_stop(self._app(environ, start_response), self.stopping)

    def stop(self) -> None:
        """Begin stopping (safe from a signal handler or another thread); `run` returns once it is done."""
        self.stopping.set()
        self._server.pull_trigger()  # wake the loop out of its poll

    def _in_flight(self) -> int:
        """Requests queued or running, plus connections with output not yet sent."""
        dispatcher = self._server.task_dispatcher
        unsent = sum(1 for ch in list(self._server.active_channels.values()) if ch.total_outbufs_len)
        return len(dispatcher.queue) + dispatcher.active_count + unsent

    def run(self, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Serve until `stop()`, then drain as the module docstring says and close everything."""
        from waitress import wasyncore

        socket_map = self._server._map  # waitress's socket map: its loop runs here instead of server.run()
        try:
            while not self.stopping.is_set():
                wasyncore.loop(timeout=1.0, use_poll=True, map=socket_map, count=1)
            self._server.del_channel()  # stop listening: new connections are refused
            self._server.socket.close()
            deadline = time.monotonic() + shutdown_timeout
            while self._in_flight() and time.monotonic() < deadline:
                wasyncore.loop(timeout=0.05, use_poll=True, map=socket_map, count=1)
            if self._in_flight():
                logger.warning("stopping with %d request(s) unfinished after %.0fs", self._in_flight(),
                               shutdown_timeout)
        finally:
            self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
            wasyncore.close_all(socket_map)

    def start_in_thread(self, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> threading.Thread:
        """Run in a daemon thread (tests, load tests); stop with `stop()` and join the returned thread."""
        thread = threading.Thread(target=self.run, args=(shutdown_timeout,), name="wsgi-server", daemon=True)
        thread.start()
        return thread


def serve(app: Callable, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = SHUTDOWN_TIMEOUT,
          on_listening: Callable[[Server], Any] | None = None, **settings: Any) -> None:
    """Serve `app` on waitress in this (main) thread until SIGTERM or SIGINT, then stop gracefully and return.

    `settings` are `Server`'s keyword arguments (threads, connection_limit, channel_timeout,
    max_request_body_size, ident). `on_listening(server)` is called once the socket is bound (e.g. to log the
    URL). A second SIGTERM/SIGINT while stopping raises KeyboardInterrupt (stop now).
    """
    server = Server(app, host, port, **settings)

    def on_signal(signum, frame):
        if server.stopping.is_set():
            raise KeyboardInterrupt
        logger.info("%s: stopping (streams end now, requests computing get %.0fs)", signal.Signals(signum).name,
                    shutdown_timeout)
        server.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_listening is not None:
            on_listening(server)
        server.run(shutdown_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
