"""Chat web server: the chat page and a streaming completion API over a pool of engine replicas.

The job of nanochat's `scripts/chat_web.py` (FastAPI + uvicorn there), written for Flask on werkzeug's
threaded server. Each replica is one `jaxchat.engine.Engine` whose params were `jax.device_put` on its own
device; a request takes a replica from a `queue.Queue` for the whole of its stream and gives it back when
the stream ends, fails, or the client goes away (WSGI `close()`), so the engine is never shared between
threads. Requests that find every replica busy wait in a bounded line; past that they get 503 with
Retry-After instead of piling up threads.

    python -m serve.app -i sft                     # newest SFT checkpoint, http://127.0.0.1:8000
    python -m serve.app -i base --num-devices 8 --host 0.0.0.0 -p 8000

Endpoints:
    GET  /                  chat page (serve/ui.html, self-contained)
    POST /chat/completions  {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?} -> text/event-stream of
                            `data: {"token": str, "gpu": int}` and finally `data: {"done": true}`
    GET  /health            {"status", "ready", "model", "replicas", "available"}
    GET  /stats             request, token and queue counters
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

logger = logging.getLogger("jaxchat.serve")

# Abuse limits, as nanochat's chat_web.py.
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000  # characters (code points), per message
MAX_TOTAL_CONVERSATION_LENGTH = 32000  # characters, whole conversation
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 disables top-k filtering (full vocabulary)
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
# nanochat accepts only these two roles (its error text mentions 'system' but its check rejects it).
ROLES = ("user", "assistant")
# Worst case JSON for 32000 characters is ~12 bytes each ("\ud83d\ude00"); anything bigger is not a chat.
MAX_BODY_BYTES = 1 << 20
LOG_CHARS = 200  # conversation content is logged truncated to this many characters per message
UI_PATH = Path(__file__).with_name("ui.html")


@dataclass
class Defaults:
    """Generation defaults and the model's identity, from the command line.

    temperature/top_k/max_tokens apply when a request leaves them out (nanochat: 0.8, 50, 512). max_context is
    the model's sequence_len in tokens (None: unchecked); a prompt that leaves no room for one token is refused
    with 400, and max_tokens is cut to the room left.
    """

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    model: str = "unknown"
    max_context: int | None = None


@dataclass
class Worker:
    """One engine replica. `gpu` is the replica index reported in every streamed event; `device` is the
    jax.Device its params live on (None for fakes), made the default device while it generates."""

    gpu: int
    engine: Any
    device: Any = None


class PoolFull(Exception):
    """Every replica is busy and the wait line is full (or the wait timed out): answer 503."""


class WorkerPool:
    """Replicas handed out one request at a time through a `queue.Queue`, with a bounded wait line.

    At most `len(workers) + max_queue` requests hold or wait for a replica; `acquire` refuses the rest at once,
    and refuses a waiter after `wait_timeout` seconds. Thread-safe.
    """

    def __init__(self, workers: list[Worker], max_queue: int = 64, wait_timeout: float = 60.0):
        if not workers:
            raise ValueError("WorkerPool needs at least one worker")
        self.workers = list(workers)
        self.max_queue = max_queue
        self.wait_timeout = wait_timeout
        self._free: queue.Queue[Worker] = queue.Queue()
        for w in self.workers:
            self._free.put(w)
        self._lock = threading.Lock()
        self._admitted = 0  # requests holding or waiting for a worker

    def acquire(self) -> Worker:
        """Take a free replica, waiting in line if all are busy. Raises PoolFull."""
        with self._lock:
            if self._admitted >= len(self.workers) + self.max_queue:
                raise PoolFull("all replicas busy and the wait queue is full")
            self._admitted += 1
        try:
            return self._free.get(timeout=self.wait_timeout)
        except queue.Empty:
            with self._lock:
                self._admitted -= 1
            raise PoolFull(f"no replica became free within {self.wait_timeout:.0f}s") from None

    def release(self, worker: Worker) -> None:
        """Give a replica back (call exactly once per successful acquire)."""
        with self._lock:
            self._admitted -= 1
        self._free.put(worker)

    @property
    def available(self) -> int:
        return self._free.qsize()

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(0, self._admitted - (len(self.workers) - self._free.qsize()))


class Stats:
    """Counters for /stats, updated from request threads under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests_served = 0  # streams that ran to the end (done event sent)
        self.requests_active = 0
        self.requests_rejected = 0  # 503s
        self.requests_invalid = 0  # 400s
        self.client_disconnects = 0
        self.tokens_generated = 0
        self.generation_seconds = 0.0  # summed over streams: wall time from first engine call to last token

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)

    def snapshot(self) -> dict:
        with self._lock:
            gen_s = self.generation_seconds
            return {
                "requests_served": self.requests_served,
                "requests_active": self.requests_active,
                "requests_rejected": self.requests_rejected,
                "requests_invalid": self.requests_invalid,
                "client_disconnects": self.client_disconnects,
                "tokens_generated": self.tokens_generated,
                # per-stream decode rate: tokens over the summed time streams spent generating them
                "tokens_per_sec": round(self.tokens_generated / gen_s, 2) if gen_s > 0 else 0.0,
                "uptime_s": round(time.time() - self.started, 1),
            }


class BadRequest(ValueError):
    """Request body that breaks the API contract or a limit; its message is sent back as {"error": ...}."""


def _number(body: dict, key: str, lo: float, hi: float, integer: bool):
    """body[key] checked to be a JSON number (an integer if `integer`) in [lo, hi]; None when absent/null."""
    v = body.get(key)
    if v is None:
        return None
    ok_types = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok_types):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(v) or not (lo <= v <= hi):
        raise BadRequest(f"{key} must be between {lo} and {hi}")
    return v


def validate_chat_request(body: Any) -> tuple[list[dict], float | None, int | None, int | None]:
    """Check a parsed /chat/completions body against nanochat's limits.

    Returns (messages, temperature, top_k, max_tokens), the last three None when not given.
    Raises BadRequest naming the field: body not an object; messages missing/empty/over 500; a message that is
    not {"role": "user"|"assistant", "content": non-empty str}; roles not alternating user, assistant, ... from
    user; content over 8000 characters or a conversation over 32000; text that is not valid Unicode (lone
    surrogates); temperature outside [0, 2], top_k outside [0, 200], max_tokens outside [1, 4096].
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list of {role, content} objects")
    if len(messages) == 0:
        raise BadRequest("At least one message is required")
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise BadRequest(f"Too many messages. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per request")
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"Message {i} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"Message {i} has invalid role {role!r}. Must be 'user' or 'assistant'")
        expected = ROLES[i % 2]
        if role != expected:
            raise BadRequest(f"Message {i} has role {role!r}, expected {expected!r}: roles alternate starting with user")
        if not isinstance(content, str):
            raise BadRequest(f"Message {i} content must be a string")
        if not content:
            raise BadRequest(f"Message {i} has empty content")
        if len(content) > MAX_MESSAGE_LENGTH:
            raise BadRequest(f"Message {i} is too long. Maximum {MAX_MESSAGE_LENGTH} characters allowed per message")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"Message {i} content is not valid Unicode (lone surrogate)") from None
        total += len(content)
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise BadRequest(f"Total conversation is too long. Maximum {MAX_TOTAL_CONVERSATION_LENGTH} characters allowed")
    temperature = _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, integer=False)
    top_k = _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, integer=True)
    max_tokens = _number(body, "max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True)
    return messages, temperature, top_k, max_tokens


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that prime the model for the next assistant turn, as nanochat's chat_web:
    <|bos|> then per message <|user_start|> text <|user_end|> or <|assistant_start|> text <|assistant_end|>,
    then <|assistant_start|>."""
    special = tokenizer.encode_special
    wrap = {"user": (special("<|user_start|>"), special("<|user_end|>")),
            "assistant": (special("<|assistant_start|>"), special("<|assistant_end|>"))}
    ids = [tokenizer.get_bos_token_id()]
    for m in messages:
        start, end = wrap[m["role"]]
        ids.append(start)
        ids.extend(tokenizer.encode(m["content"]))
        ids.append(end)
    ids.append(special("<|assistant_start|>"))
    return ids


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _clip(text: str) -> str:
    return text if len(text) <= LOG_CHARS else text[:LOG_CHARS] + f"...[{len(text) - LOG_CHARS} more chars]"


def stream_tokens(worker: Worker, tokenizer, prompt: list[int], temperature: float, top_k: int, max_tokens: int,
                  on_token: Callable[[], None] = lambda: None) -> Iterator[str]:
    """SSE events for one completion: {"token": text, "gpu": i} per decodable piece, no done event.

    Token ids accumulate and the whole reply is decoded each step; only text that does not end in U+FFFD (an
    unfinished multi-byte UTF-8 character) is emitted, so characters split across tokens arrive whole
    (nanochat's rule). Stops at <|assistant_end|> or <|bos|>, or after max_tokens. The engine's generator is
    closed on exit, whatever the reason.
    """
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    gen = worker.engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k if top_k > 0 else None, seed=random.randint(0, 2**31 - 1))
    # jax.default_device is thread-local config: enter it per engine step so it never spans a yield.
    if worker.device is not None:
        import jax

        on_device = lambda: jax.default_device(worker.device)  # noqa: E731
    else:
        on_device = contextlib.nullcontext
    reply: list[int] = []
    sent = ""
    try:
        while True:
            with on_device():
                try:
                    token_column, _ = next(gen)
                except StopIteration:
                    return
            token = int(token_column[0])
            if token in stop:
                return
            on_token()
            reply.append(token)
            text = tokenizer.decode(reply)
            if not text.endswith("\ufffd") and len(text) > len(sent):
                piece, sent = text[len(sent):], text
                yield _sse({"token": piece, "gpu": worker.gpu})
    finally:
        gen.close()


def create_app(pool: WorkerPool, tokenizer, defaults: Defaults | None = None) -> Flask:
    """The Flask app over `pool` (engines may be fakes with Engine.generate's contract) and `tokenizer`
    (jaxchat.tokenizer.Tokenizer or anything with encode/decode/encode_special/get_bos_token_id)."""
    defaults = defaults or Defaults()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["jaxchat_stats"] = stats = Stats()
    app.extensions["jaxchat_pool"] = pool
    ui_html = UI_PATH.read_text(encoding="utf-8")

    def error(status: int, message: str, **headers) -> Response:
        resp = jsonify(error=message)
        resp.status_code = status
        resp.headers.update(headers)
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        # JSON instead of werkzeug's HTML pages (404, 405, 413, ...)
        return error(e.code or 500, e.description or e.name)

    @app.get("/")
    def index():
        return Response(ui_html, mimetype="text/html")

    @app.get("/health")
    def health():
        return jsonify(status="ok", ready=len(pool.workers) > 0, model=defaults.model,
                       replicas=len(pool.workers), available=pool.available)

    @app.get("/stats")
    def get_stats():
        return jsonify(**stats.snapshot(), replicas=len(pool.workers), available=pool.available,
                       busy=len(pool.workers) - pool.available, queue=pool.waiting, max_queue=pool.max_queue)

    @app.post("/chat/completions")
    def chat_completions():
        if not request.is_json:
            stats.add(requests_invalid=1)
            return error(400, "Content-Type must be application/json")
        body = request.get_json(silent=True)
        try:
            if body is None:
                raise BadRequest("request body is not valid JSON")
            messages, temperature, top_k, max_tokens = validate_chat_request(body)
            prompt = render_prompt(tokenizer, messages)
            max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
            if defaults.max_context is not None:
                room = defaults.max_context - len(prompt)
                if room < 1:
                    raise BadRequest(f"Conversation is {len(prompt)} tokens; the model's context is "
                                     f"{defaults.max_context}")
                max_tokens = min(max_tokens, room)
        except BadRequest as e:
            stats.add(requests_invalid=1)
            return error(400, str(e))
        temperature = defaults.temperature if temperature is None else float(temperature)
        top_k = defaults.top_k if top_k is None else top_k

        try:
            worker = pool.acquire()
        except PoolFull as e:
            stats.add(requests_rejected=1)
            logger.warning("503: %s", e)
            return error(503, f"Server busy: {e}. Retry later.", **{"Retry-After": "5"})

        req_id = f"{random.getrandbits(32):08x}"
        logger.info("[%s] %d messages, temperature=%s top_k=%s max_tokens=%s, prompt %d tokens", req_id,
                    len(messages), temperature, top_k, max_tokens, len(prompt))
        for m in messages:
            logger.info("[%s] [%s] %s", req_id, m["role"].upper(), _clip(m["content"]))
        stats.add(requests_active=1)

        released = threading.Lock()

        def release(finished: bool) -> None:
            # idempotent: runs from the generator's finally or from the response's close(), whichever first;
            # close() alone covers a stream that never started (an unstarted generator skips its finally).
            if released.acquire(blocking=False):
                pool.release(worker)
                stats.add(requests_active=-1, requests_served=int(finished), client_disconnects=int(not finished))

        def events() -> Iterator[str]:
            pieces: list[str] = []
            finished = False
            t0 = time.perf_counter()
            count = [0]

            def on_token():
                count[0] += 1

            try:
                try:
                    for ev in stream_tokens(worker, tokenizer, prompt, temperature, top_k, max_tokens, on_token):
                        pieces.append(json.loads(ev[6:])["token"])
                        yield ev
                except Exception as e:  # engine failure: tell the client, keep serving others
                    logger.exception("[%s] generation failed", req_id)
                    yield _sse({"error": f"generation failed: {type(e).__name__}"})
                finished = True
                yield _sse({"done": True})
            finally:
                stats.add(tokens_generated=count[0], generation_seconds=time.perf_counter() - t0)
                logger.info("[%s] [ASSISTANT] (replica %d, %d tokens%s) %s", req_id, worker.gpu, count[0],
                            "" if finished else ", client disconnected", _clip("".join(pieces)))
                release(finished)

        resp = Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        resp.call_on_close(lambda: release(False))
        return resp

    return app


def build_workers(params, config, tokenizer, num_devices: int, engine_cls=None, **engine_kwargs) -> list[Worker]:
    """One Engine replica per device: params `jax.device_put` on jax.devices()[i] for i < num_devices.
    `engine_kwargs` go to each Engine (e.g. decode_chunk).

    Raises ValueError when --num-devices is below 1 or above the devices JAX sees.
    """
    import jax

    devices = jax.devices()
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"--num-devices {num_devices}: JAX sees {len(devices)} device(s) ({devices[0].platform})")
    if engine_cls is None:
        from jaxchat.engine import Engine as engine_cls
    workers = []
    for i, dev in enumerate(devices[:num_devices]):
        replica = jax.device_put(params, dev)
        workers.append(Worker(gpu=i, engine=engine_cls(replica, config, tokenizer, **engine_kwargs), device=dev))
    return workers


def serve_in_thread(app: Flask, host: str = "127.0.0.1", port: int = 0):
    """Start werkzeug's threaded server for `app` in a daemon thread (tests, load tests).

    Returns (server, url); stop with server.shutdown().
    """
    from werkzeug.serving import make_server

    server = make_server(host, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="serve", daemon=True).start()
    return server, f"http://{host}:{server.server_port}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="jaxchat web chat server (nanochat scripts/chat_web.py)")
    p.add_argument("-i", "--source", default="sft", choices=["sft", "rl", "base"], help="checkpoint family")
    p.add_argument("-g", "--model-tag", default=None, help="model tag to load (default: newest)")
    p.add_argument("-s", "--step", type=int, default=None, help="step to load (default: newest)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0: full vocabulary)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to expose)")
    p.add_argument("-n", "--num-devices", type=int, default=1, help="engine replicas, one per JAX device")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a replica before 503")
    p.add_argument("--decode-chunk", type=int, default=None,
                   help="tokens per device round-trip in the engine (default: the engine's); smaller streams "
                        "sooner and smoother, larger gives more tokens/sec")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name, lo, hi in (("temperature", MIN_TEMPERATURE, MAX_TEMPERATURE), ("top_k", MIN_TOP_K, MAX_TOP_K),
                         ("max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS)):
        if not lo <= getattr(args, name) <= hi:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in [{lo}, {hi}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jaxchat.checkpoint import checkpoint_dir, list_steps, load_model_from

    params, config, tokenizer, meta = load_model_from(args.source, model_tag=args.model_tag, step=args.step)
    engine_kwargs = {} if args.decode_chunk is None else {"decode_chunk": args.decode_chunk}
    workers = build_workers(params, config, tokenizer, args.num_devices, **engine_kwargs)
    ckpt_dir = checkpoint_dir(args.source, args.model_tag)
    step = args.step if args.step is not None else max(list_steps(ckpt_dir), default=None)
    tag = Path(ckpt_dir).name
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                        model=f"{args.source}/{tag}" + (f"@{step}" if step is not None else ""),
                        max_context=getattr(config, "sequence_len", None))
    app = create_app(WorkerPool(workers, max_queue=args.max_queue), tokenizer, defaults)
    logger.info("model %s on %d replica(s); temperature %.2f, top-k %d, max tokens %d", defaults.model,
                len(workers), args.temperature, args.top_k, args.max_tokens)
    logger.info("serving on http://%s:%d", args.host, args.port)
    from werkzeug.serving import run_simple

    run_simple(args.host, args.port, app, threaded=True, use_reloader=False, use_debugger=False)


if __name__ == "__main__":
    main()
