"""Server test helpers: `serve_in_thread` (the app on `serve.wsgi.Server`, waitress, as `python -m serve.app` runs
it, in a daemon thread) and `FakeEngine`, an `Engine` stand-in that streams scripted token ids, `delay` seconds per
token, through the real `jaxchat.engine.Request` (so text, stop strings, finish reasons and token counts are the
engine's own), with the engine's slots (`max_batch`), its queue bound (`max_queue`, QueueFull) and FIFO admission."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque

from jaxchat.engine import QueueFull, Request


def random_params(config, seed: int = 0):
    """`init_params(config)` with the zero-initialised matrices (output projections, lm_head) filled with N(0, 0.25)
    noise, so a tiny random model's distributions vary with the input and it emits varied tokens."""
    import jax

    from jaxchat.model import init_params

    leaves, treedef = jax.tree_util.tree_flatten(init_params(config, jax.random.PRNGKey(seed)))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        0.5 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 2 and not x.any() else x
        for k, x in zip(keys, leaves)])


def raw_status(port: int, payload: bytes, half_close: bool = False, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes to 127.0.0.1:port (half_close: then shut our side); the response's status code and bytes (0
    if the server closed without a word)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0), data


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, **settings):
    """Serve `app` on `serve.wsgi.Server` (`settings`: its keyword arguments) in a daemon thread; (server, url),
    stop with server.stop()."""
    from serve.wsgi import Server

    server = Server(app, host, port, **settings)
    server.start_in_thread(shutdown_timeout=5)
    return server, server.url


class FakeEngine:
    """`script`: the ids every sample emits (a stop id ends it with "stop", as the engine does; running out of
    script ends it with "length"), or a callable returning them per request. `fail_at`: raise at that token.
    `calls`: submit's arguments; `closed`: samples ended (finished, cancelled or failed); `slots_used`."""

    def __init__(self, tokenizer, script, delay=0.0, fail_at=None, max_batch=1, max_queue=4, num_devices=1):
        self.tokenizer, self.script, self.delay, self.fail_at = tokenizer, script, delay, fail_at
        self.max_batch, self.max_queue, self.num_devices = max_batch, max_queue, num_devices
        self.stop_ids = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
        self.calls, self.closed, self.slots_used = [], 0, set()
        self._slots = [None] * max_batch
        self._queue: deque = deque()
        self._cv = threading.Condition()
        threading.Thread(target=self._admit, daemon=True).start()

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        pass

    def device_of(self, slot: int) -> int:
        return slot * self.num_devices // self.max_batch

    def submit(self, tokens, n=1, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seed=42, stop=(),
               logprobs=None, stop_token_ids=None) -> Request:
        with self._cv:
            if self.busy_slots + self.queued + n > self.max_batch + self.max_queue:
                raise QueueFull(f"{self.busy_slots} slots busy, {self.queued} queued")
            self.calls.append(dict(tokens=list(tokens), n=n, max_tokens=max_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, stop=list(stop)))
            script = self.script(tokens) if callable(self.script) else self.script
            req = Request(tokens, n, len(script) if max_tokens is None else max_tokens, temperature, top_k, top_p,
                          seed, self.stop_ids, stop, logprobs, self.tokenizer)
            req.script = script
            self._queue.extend((req, i) for i in range(n))
            self._cv.notify_all()
        return req

    def _admit(self) -> None:
        while True:
            with self._cv:
                while not (self._queue and None in self._slots):
                    self._cv.wait()
                req, i = self._queue.popleft()
                slot = self._slots.index(None)
                self._slots[slot] = (req, i)
                self.slots_used.add(slot)
                req.slots[i] = slot
                if all(s is not None for s in req.slots):
                    req.admitted.set()
            threading.Thread(target=self._stream, args=(req, i, slot), daemon=True).start()

    def _stream(self, req: Request, i: int, slot: int) -> None:
        try:
            for k, tok in enumerate(req.script[:req.budget]):
                if self.delay:
                    time.sleep(self.delay)
                if req.cancelled or i in req.released:
                    return
                if k == self.fail_at:
                    raise RuntimeError("device on fire")
                reason = "stop" if tok in self.stop_ids else "length" if k + 1 == req.budget else None
                req._put(i, [tok], [1], None, reason)
                if reason:
                    return
            req._put(i, [], [], None, "length")
        except Exception as e:
            req._close(e)
        finally:
            with self._cv:
                self._slots[slot] = None
                self.closed += 1
                self._cv.notify_all()
