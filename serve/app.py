"""Chat web server: the chat page and a streaming completion API over a pool of engine replicas.

The job of nanochat's `scripts/chat_web.py` (FastAPI + uvicorn there), written for Flask on werkzeug's
threaded server. Each replica is one `jaxchat.engine.Engine` whose params were `jax.device_put` on its own
device; a request takes a replica from a `queue.Queue` for the whole of its stream and gives it back when
the stream ends, fails, or the client goes away (WSGI `close()`), so the engine is never shared between
threads. Requests that find every replica busy wait in a bounded line; past that they get 503 with
Retry-After instead of piling up threads.

    python -m serve.app -i sft                     # newest SFT checkpoint, http://127.0.0.1:8000
    python -m serve.app -i base --num-devices 8 --host 0.0.0.0 -p 8000

Each replica is a `jaxchat.engine.BatchEngine` of `--max-batch` slots (continuous batching): the pool hands out
slots, so up to max_batch requests decode together on one replica, each joining the running decode loop at the next
chunk boundary. `--max-batch 1` serves one conversation per replica at a time.

Endpoints:
    GET  /                     chat page (serve/ui.html, self-contained)
    POST /chat/completions     {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?} -> text/event-stream of
                               `data: {"token": str, "gpu": int}` and finally `data: {"done": true}` (nanochat's API)
    POST /v1/chat/completions  the OpenAI chat completions API (streamed or not; system messages, n, stop, seed,
                               top_p), for the official `openai` client with base_url=http://host:port/v1
    GET  /v1/models            the one model served
    GET  /health               {"status", "ready", "model", "replicas", "available"}
    GET  /stats                request, token, slot and queue counters, tokens/s over the last 10 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import queue
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

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
MAX_N = 8  # OpenAI API: most choices per request
MAX_STOP = 4  # OpenAI API: most stop sequences, as OpenAI's own limit
MAX_STOP_CHARS = 64
RATE_WINDOW_S = 10.0  # /stats tokens_per_sec_recent averages over this window
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
    slots: int = 1  # requests this replica serves at once (its BatchEngine's max_batch)


class PoolFull(Exception):
    """Every replica is busy and the wait line is full (or the wait timed out): answer 503."""


class WorkerPool:
    """Replica slots handed out one request each through a `queue.Queue`, with a bounded wait line.

    A replica of `slots` slots is in the queue that many times, so it serves up to `slots` requests at once. At most
    `capacity + max_queue` requests hold or wait for a slot; `acquire` refuses the rest at once, and refuses a waiter
    after `wait_timeout` seconds. Thread-safe.
    """

    def __init__(self, workers: list[Worker], max_queue: int = 64, wait_timeout: float = 60.0):
        if not workers:
            raise ValueError("WorkerPool needs at least one worker")
        self.workers = list(workers)
        self.max_queue = max_queue
        self.wait_timeout = wait_timeout
        self._free: queue.Queue[Worker] = queue.Queue()
        self.capacity = sum(w.slots for w in self.workers)
        for k in range(max(w.slots for w in self.workers)):  # round-robin: the first slots of every replica first
            for w in self.workers:
                if k < w.slots:
                    self._free.put(w)
        self._lock = threading.Lock()
        self._admitted = 0  # requests holding or waiting for a worker

    def acquire(self) -> Worker:
        """Take a free replica, waiting in line if all are busy. Raises PoolFull."""
        with self._lock:
            if self._admitted >= self.capacity + self.max_queue:
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
            return max(0, self._admitted - (self.capacity - self._free.qsize()))


class Stats:
    """Counters for /stats, updated from request threads under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self._started_mono = time.monotonic()
        self.requests_served = 0  # streams that ran to the end (done event sent)
        self.requests_active = 0
        self.requests_rejected = 0  # 503s
        self.requests_invalid = 0  # 400s
        self.client_disconnects = 0
        self.tokens_generated = 0
        self.generation_seconds = 0.0  # summed over streams: wall time from first engine call to last token
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S seconds

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)

    def token(self, n: int = 1) -> None:
        """Count n tokens just generated, for the recent-throughput window."""
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def recent_rate(self) -> float:
        """Tokens per second generated by all streams together over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            total = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        return round(total / min(RATE_WINDOW_S, max(now - self._started_mono, 1e-3)), 2)

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
                "tokens_per_sec_recent": None,  # filled in below, outside the lock
                "uptime_s": round(time.time() - self.started, 1),
            }


class BadRequest(ValueError):
    """Request body that breaks the API contract or a limit; its message is sent back as {"error": ...} (400).
    `param` names the offending field (OpenAI's error shape reports it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(body: dict, key: str, lo: float, hi: float, integer: bool):
    """body[key] checked to be a JSON number (an integer if `integer`) in [lo, hi]; None when absent/null."""
    v = body.get(key)
    if v is None:
        return None
    ok_types = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok_types):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}", key)
    # ints compare exactly at any size (math.isfinite would overflow on a 400-digit one)
    if (isinstance(v, float) and not math.isfinite(v)) or not (lo <= v <= hi):
        raise BadRequest(f"{key} must be between {lo} and {hi}", key)
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


_LOG_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_LOG_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _clip(text: str) -> str:
    """User text as one log line: truncated to LOG_CHARS, and newlines, other control characters, line separators
    and backslashes escaped, so a message can never start a forged log line."""
    clipped = text if len(text) <= LOG_CHARS else text[:LOG_CHARS] + f"...[{len(text) - LOG_CHARS} more chars]"
    return _LOG_UNSAFE.sub(lambda m: _LOG_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), clipped)


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


class TooLarge(Exception):
    """Request body over MAX_BODY_BYTES (413), also when it arrives chunked without a Content-Length."""


def read_json_body(req) -> Any:
    """The request's JSON body, read by us rather than Flask so every malformed body is a 400 with a reason.

    Raises TooLarge past MAX_BODY_BYTES (a chunked body is read up to one byte past the limit, never whole);
    BadRequest for a wrong Content-Type, bytes that are not UTF-8 JSON, or JSON nested too deeply for the parser.
    """
    if not req.is_json:
        raise BadRequest("Content-Type must be application/json")
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise TooLarge()
    # the raw input, not req.stream: werkzeug cuts a chunked body silently at MAX_CONTENT_LENGTH
    data = get_input_stream(req.environ, max_content_length=None).read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise TooLarge()
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None


def validate_openai_request(body: Any) -> dict:
    """Check a parsed /v1/chat/completions body; the OpenAI fields map onto nanochat's limits.

    Accepts a leading {"role": "system"} message, merged into the first user message as nanochat's tokenizer does
    (`Tokenizer.render_conversation`: system + "\\n\\n" + user); content as a str or a list of {"type": "text"}
    parts; max_tokens or max_completion_tokens; n in [1, MAX_N]; top_p in (0, 1]; an integer seed; stop as a str or
    up to MAX_STOP strings; stream (bool) and stream_options.include_usage. Other OpenAI fields are ignored.
    Returns a dict: messages (system merged), temperature, top_k, top_p, max_tokens, n, seed, stop (list), stream,
    include_usage (None where not given). Raises BadRequest naming the field.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    flat = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):  # OpenAI content parts: text only
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise BadRequest(f"Message {i}: only text content parts are supported", "messages")
            m = dict(m, content="".join(p["text"] for p in parts))
        flat.append(m)
    system = None
    if isinstance(flat[0], dict) and flat[0].get("role") == "system":
        system = flat[0].get("content")
        if not isinstance(system, str) or not system:
            raise BadRequest("Message 0 (system) must have non-empty string content", "messages")
        if len(system) > MAX_MESSAGE_LENGTH:
            raise BadRequest(f"Message 0 is too long. Maximum {MAX_MESSAGE_LENGTH} characters allowed per message",
                             "messages")
        flat = flat[1:]
        if not flat:
            raise BadRequest("a system message must be followed by a user message", "messages")
    if any(isinstance(m, dict) and m.get("role") == "system" for m in flat):
        raise BadRequest("only the first message may have role 'system'", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    try:
        msgs, temperature, top_k, max_tokens = validate_chat_request(
            {"messages": flat, "temperature": body.get("temperature"), "top_k": body.get("top_k"),
             "max_tokens": max_tokens})
    except BadRequest as e:
        raise BadRequest(str(e), e.param or "messages") from None
    if system is not None:
        if len(system) + sum(len(m["content"]) for m in msgs) > MAX_TOTAL_CONVERSATION_LENGTH:
            raise BadRequest(f"Total conversation is too long. Maximum {MAX_TOTAL_CONVERSATION_LENGTH} characters "
                             "allowed", "messages")
        try:
            system.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("Message 0 content is not valid Unicode (lone surrogate)", "messages") from None
        msgs = [dict(msgs[0], content=system + "\n\n" + msgs[0]["content"])] + msgs[1:]
    top_p = _number(body, "top_p", 0.0, 1.0, integer=False)
    if top_p is not None and top_p <= 0:
        raise BadRequest("top_p must be greater than 0 and at most 1", "top_p")
    n = _number(body, "n", 1, MAX_N, integer=True)
    seed = _number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise BadRequest("stream_options must be {\"include_usage\": bool}", "stream_options")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("model must be a string", "model")
    return {"messages": msgs, "temperature": temperature, "top_k": top_k, "top_p": top_p, "max_tokens": max_tokens,
            "n": n, "seed": seed, "stop": stop, "stream": stream, "include_usage": bool(opts.get("include_usage"))}


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could begin a stop string (kept back from the stream until they can't)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def generate_choices(worker: Worker, tokenizer, prompt: list[int], n: int, temperature: float, top_k: int,
                     top_p: float, max_tokens: int, seed: int, stops: list[str],
                     on_token: Callable[[int], None] = lambda n: None) -> Iterator[tuple[int, str, str | None, int]]:
    """n completions of one prompt as (choice index, text piece, finish_reason or None, completion tokens so far).

    Each choice ends once with a final event (piece possibly "", finish_reason 'stop' at <|assistant_end|>/<|bos|>
    or a stop string, which is cut off with what follows it; 'length' at max_tokens). Text is decoded whole per
    choice, sent only when it does not end in an unfinished UTF-8 character (U+FFFD) nor in what may be the start
    of a stop string. The engine's generator is closed on exit, whatever the reason.
    """
    special_stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    kwargs = {} if top_p is None or top_p >= 1.0 else {"top_p": top_p}
    gen = worker.engine.generate(prompt, num_samples=n, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k if top_k > 0 else None, seed=seed, **kwargs)
    ids: list[list[int]] = [[] for _ in range(n)]
    sent = [""] * n
    finished = [False] * n
    try:
        for column, _ in gen:
            for i, tok in enumerate(column[:n]):
                if finished[i]:
                    continue
                tok = int(tok)
                if tok in special_stop:
                    finished[i] = True
                    text = tokenizer.decode(ids[i]).rstrip("\ufffd")
                    yield i, text[len(sent[i]):], "stop", len(ids[i])
                    continue
                ids[i].append(tok)
                on_token(1)
                text = tokenizer.decode(ids[i])
                if text.endswith("\ufffd"):
                    continue
                cut = min((j for j in (text.find(s, max(0, len(sent[i]) - len(s))) for s in stops) if j >= 0),
                          default=-1)
                if cut >= 0:
                    finished[i] = True
                    yield i, text[len(sent[i]):cut], "stop", len(ids[i])
                    continue
                upto = len(text) - _held_back(text, stops)
                if upto > len(sent[i]):
                    yield i, text[len(sent[i]):upto], None, len(ids[i])
                    sent[i] = text[:upto]
            if all(finished):
                return
        for i in range(n):  # the engine stopped: max_tokens (or the context) reached
            if not finished[i]:
                finished[i] = True
                yield i, tokenizer.decode(ids[i]).rstrip("\ufffd")[len(sent[i]):], "length", len(ids[i])
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

    def openai_error(status: int, message: str, param: str | None = None, **headers) -> Response:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 503: "server_error"}.get(status, "server_error")
        code = {404: "not_found", 413: "request_too_large", 503: "server_busy"}.get(status)
        resp = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
        resp.status_code = status
        resp.headers.update(headers)
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        # JSON instead of werkzeug's HTML pages (404, 405, 413, ...), in OpenAI's shape under /v1
        if request.path.startswith("/v1/"):
            return openai_error(e.code or 500, e.description or e.name)
        return error(e.code or 500, e.description or e.name)

    def slot_counts() -> dict:
        busy = sum(getattr(w.engine, "busy_slots", 0) for w in pool.workers)
        queued = sum(getattr(w.engine, "queued", 0) for w in pool.workers)
        return {"slots": pool.capacity, "slots_busy": pool.capacity - pool.available, "slots_free": pool.available,
                "engine_slots_busy": busy, "engine_queue": queued}

    @app.get("/")
    def index():
        return Response(ui_html, mimetype="text/html")

    @app.get("/health")
    def health():
        return jsonify(status="ok", ready=len(pool.workers) > 0, model=defaults.model,
                       replicas=len(pool.workers), available=pool.available)

    @app.get("/stats")
    def get_stats():
        snap = stats.snapshot()
        snap["tokens_per_sec_recent"] = stats.recent_rate()
        return jsonify(**snap, **slot_counts(), replicas=len(pool.workers), available=pool.available,
                       busy=pool.capacity - pool.available, queue=pool.waiting, max_queue=pool.max_queue)

    def parse(validate, err):
        """(parsed, None) or (None, error response) for the current request."""
        try:
            return validate(read_json_body(request)), None
        except TooLarge:
            stats.add(requests_invalid=1)
            return None, err(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        except BadRequest as e:
            stats.add(requests_invalid=1)
            return None, err(400, str(e), e.param) if err is openai_error else err(400, str(e))

    def prompt_for(messages, max_tokens):
        """(prompt ids, max_tokens cut to the context's room); BadRequest when the prompt leaves none."""
        prompt = render_prompt(tokenizer, messages)
        max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
        if defaults.max_context is not None:
            room = defaults.max_context - len(prompt)
            if room < 1:
                raise BadRequest(f"Conversation is {len(prompt)} tokens; the model's context is "
                                 f"{defaults.max_context}", "messages")
            max_tokens = min(max_tokens, room)
        return prompt, max_tokens

    def admit(messages, sampling: str, prompt_len: int, err):
        """Take a slot and log the request; (worker, req_id, release) or raises PoolFull after counting it."""
        try:
            worker = pool.acquire()
        except PoolFull as e:
            stats.add(requests_rejected=1)
            logger.warning("503: %s", e)
            raise
        req_id = f"{random.getrandbits(32):08x}"
        logger.info("[%s] %d messages, %s, prompt %d tokens", req_id, len(messages), sampling, prompt_len)
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

        return worker, req_id, release

    @app.post("/chat/completions")
    def chat_completions():
        body, bad = parse(validate_chat_request, error)
        if bad is not None:
            return bad
        messages, temperature, top_k, max_tokens = body
        try:
            prompt, max_tokens = prompt_for(messages, max_tokens)
        except BadRequest as e:
            stats.add(requests_invalid=1)
            return error(400, str(e))
        temperature = defaults.temperature if temperature is None else float(temperature)
        top_k = defaults.top_k if top_k is None else top_k
        try:
            worker, req_id, release = admit(
                messages, f"temperature={temperature} top_k={top_k} max_tokens={max_tokens}", len(prompt), error)
        except PoolFull as e:
            return error(503, f"Server busy: {e}. Retry later.", **{"Retry-After": "5"})

        def events() -> Iterator[str]:
            pieces: list[str] = []
            finished = False
            t0 = time.perf_counter()
            count = [0]

            def on_token():
                count[0] += 1
                stats.token()

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

    # ------------------------------------------------------------------------------------------ OpenAI-compatible

    @app.get("/v1/models")
    def list_models():
        return jsonify(object="list", data=[{"id": defaults.model, "object": "model", "created": int(stats.started),
                                             "owned_by": "jaxchat"}])

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id):
        if model_id != defaults.model:
            return openai_error(404, f"The model '{model_id}' does not exist", "model")
        return jsonify(id=defaults.model, object="model", created=int(stats.started), owned_by="jaxchat")

    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        body, bad = parse(validate_openai_request, openai_error)
        if bad is not None:
            return bad
        try:
            prompt, max_tokens = prompt_for(body["messages"], body["max_tokens"])
        except BadRequest as e:
            stats.add(requests_invalid=1)
            return openai_error(400, str(e), e.param)
        temperature = defaults.temperature if body["temperature"] is None else float(body["temperature"])
        top_k = defaults.top_k if body["top_k"] is None else body["top_k"]
        top_p = 1.0 if body["top_p"] is None else float(body["top_p"])
        n = body["n"] or 1
        seed = random.randint(0, 2**31 - 1) if body["seed"] is None else body["seed"] % 2**31
        stops = body["stop"]
        try:
            worker, req_id, release = admit(
                body["messages"], f"temperature={temperature} top_k={top_k} top_p={top_p} max_tokens={max_tokens} "
                f"n={n} seed={seed} stop={[_clip(s) for s in stops]}", len(prompt), openai_error)
        except PoolFull as e:
            return openai_error(503, f"Server busy: {e}. Retry later.", **{"Retry-After": "5"})
        completion_id = f"chatcmpl-{random.getrandbits(96):024x}"
        created = int(time.time())
        model = defaults.model
        t0 = time.perf_counter()
        count = [0]

        def on_token(k: int) -> None:
            count[0] += k
            stats.token(k)

        def choices():
            return generate_choices(worker, tokenizer, prompt, n, temperature, top_k, top_p, max_tokens, seed, stops,
                                    on_token)

        def usage(tokens: list[int]) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": sum(tokens),
                    "total_tokens": len(prompt) + sum(tokens)}

        def log_done(texts, finished, note=""):
            stats.add(tokens_generated=count[0], generation_seconds=time.perf_counter() - t0)
            logger.info("[%s] [ASSISTANT] (replica %d, %d tokens%s) %s", req_id, worker.gpu, count[0], note,
                        " | ".join(_clip(t) for t in texts))
            release(finished)

        if not body["stream"]:
            texts, reasons, tokens = [""] * n, ["length"] * n, [0] * n
            finished = False
            try:
                for i, piece, reason, k in choices():
                    texts[i] += piece
                    tokens[i] = k
                    if reason is not None:
                        reasons[i] = reason
                finished = True
            except Exception as e:
                logger.exception("[%s] generation failed", req_id)
                return openai_error(500, f"generation failed: {type(e).__name__}")
            finally:
                log_done(texts, finished)
            return jsonify(id=completion_id, object="chat.completion", created=created, model=model,
                           choices=[{"index": i, "message": {"role": "assistant", "content": texts[i]},
                                     "logprobs": None, "finish_reason": reasons[i]} for i in range(n)],
                           usage=usage(tokens))

        def chunk(choices_: list[dict], **extra) -> str:
            return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": choices_, **extra})

        def events() -> Iterator[str]:
            texts, tokens = [""] * n, [0] * n
            finished = False
            try:
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                try:
                    for i, piece, reason, k in choices():
                        texts[i] += piece
                        tokens[i] = k
                        if piece:
                            yield chunk([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                          "finish_reason": None}])
                        if reason is not None:
                            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
                    if body["include_usage"]:
                        yield chunk([], usage=usage(tokens))
                except Exception as e:
                    logger.exception("[%s] generation failed", req_id)
                    yield _sse({"error": {"message": f"generation failed: {type(e).__name__}", "type": "server_error",
                                          "param": None, "code": None}})
                finished = True
                yield "data: [DONE]\n\n"
            finally:
                log_done(texts, finished, "" if finished else ", client disconnected")

        resp = Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        resp.call_on_close(lambda: release(False))
        return resp

    return app


def build_workers(params, config, tokenizer, num_devices: int, engine_cls=None, max_batch: int = 1,
                  **engine_kwargs) -> list[Worker]:
    """One replica per device: params `jax.device_put` on jax.devices()[i] for i < num_devices, each an Engine
    wrapped in a `jaxchat.engine.BatchEngine` of `max_batch` slots (with a custom engine_cls: the engine as is).
    `engine_kwargs` go to each Engine (e.g. decode_chunk).

    Raises ValueError when --num-devices is below 1 or above the devices JAX sees, or --max-batch below 1.
    """
    import jax

    devices = jax.devices()
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"--num-devices {num_devices}: JAX sees {len(devices)} device(s) ({devices[0].platform})")
    if max_batch < 1:
        raise ValueError(f"--max-batch {max_batch}: must be >= 1")
    wrap = engine_cls is None
    if engine_cls is None:
        from jaxchat.engine import Engine as engine_cls
    workers = []
    for i, dev in enumerate(devices[:num_devices]):
        replica = jax.device_put(params, dev)
        engine = engine_cls(replica, config, tokenizer, **engine_kwargs)
        if wrap:
            from jaxchat.engine import BatchEngine

            engine = BatchEngine(engine, max_batch, device=dev)
        workers.append(Worker(gpu=i, engine=engine, device=dev, slots=max_batch if wrap else 1))
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
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 503")
    p.add_argument("--max-batch", type=int, default=8,
                   help="slots per replica: requests decoded together by continuous batching (1: one at a time)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every prompt and attend shape before serving (else the first requests compile)")
    p.add_argument("--decode-chunk", type=int, default=None,
                   help="tokens per device round-trip in the engine (default: the engine's); smaller streams "
                        "sooner and smoother, larger gives more tokens/sec")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name, lo, hi in (("temperature", MIN_TEMPERATURE, MAX_TEMPERATURE), ("top_k", MIN_TOP_K, MAX_TOP_K),
                         ("max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS), ("max_batch", 1, 1024)):
        if not lo <= getattr(args, name) <= hi:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in [{lo}, {hi}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jaxchat.checkpoint import checkpoint_dir, list_steps, load_model_from

    params, config, tokenizer, meta = load_model_from(args.source, model_tag=args.model_tag, step=args.step)
    engine_kwargs = {} if args.decode_chunk is None else {"decode_chunk": args.decode_chunk}
    workers = build_workers(params, config, tokenizer, args.num_devices, max_batch=args.max_batch, **engine_kwargs)
    if args.warmup:
        t0 = time.perf_counter()
        for w in workers:
            w.engine.warmup()
        logger.info("warm-up compiles done in %.1fs", time.perf_counter() - t0)
    ckpt_dir = checkpoint_dir(args.source, args.model_tag)
    step = args.step if args.step is not None else max(list_steps(ckpt_dir), default=None)
    tag = Path(ckpt_dir).name
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                        model=f"{args.source}/{tag}" + (f"@{step}" if step is not None else ""),
                        max_context=getattr(config, "sequence_len", None))
    app = create_app(WorkerPool(workers, max_queue=args.max_queue), tokenizer, defaults)
    logger.info("model %s on %d replica(s) of %d slots; temperature %.2f, top-k %d, max tokens %d", defaults.model,
                len(workers), args.max_batch, args.temperature, args.top_k, args.max_tokens)
    logger.info("serving on http://%s:%d", args.host, args.port)
    from werkzeug.serving import run_simple

    run_simple(args.host, args.port, app, threaded=True, use_reloader=False, use_debugger=False)


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
