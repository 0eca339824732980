"""Chat web server: the chat page, an OpenAI-compatible API and nanochat's streaming API, over one engine.

The job of nanochat's `scripts/chat_web.py`, on Flask and werkzeug's threaded server. One `jaxchat.engine.Engine`
serves every request: its slots (`--max-batch` per device, over `--num-devices` devices) decode together, and its
queue is the only one: a request that finds it full (`--max-queue`) or gets no slot within `Defaults.wait_timeout`
is answered 503 with Retry-After. A request's thread turns the engine's outputs (text, finish reasons, token counts)
into the response; a client that goes away cancels it (WSGI `close()`), which frees its slots. One pipeline: the
OpenAI API; nanochat's `/chat/completions` is an adapter over it with nanochat's limits (roles user and assistant,
string content) and wire format. The tokenizer renders prompts (`Tokenizer.render_conversation`: a system message
is merged into the first user turn) and checks the order of roles.

    python -m serve.app -i sft                     # newest SFT checkpoint, http://127.0.0.1:8000
    python -m serve.app -i base --num-devices 8 --host 0.0.0.0 -p 8000

Endpoints:
    GET  /                     chat page (serve/ui.html, self-contained)
    POST /chat/completions     {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?} -> text/event-stream of
                               `data: {"token": str, "gpu": int}` and finally `data: {"done": true}` (nanochat's
                               API; "gpu": the device of the request's slot)
    POST /v1/chat/completions  the OpenAI chat completions API (streamed or not; system messages, n, stop, seed,
                               top_p), for the official `openai` client with base_url=http://host:port/v1
    GET  /v1/models            the one model served
    GET  /health               {"status", "ready", "model", "replicas", "available"}
    GET  /stats                request, token, slot and queue counters, tokens/s over the last 10 s
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jax
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from jaxchat.engine import DECODE_CHUNK, Engine, QueueFull

logger = logging.getLogger("jaxchat.serve")

# Abuse limits, as nanochat's chat_web.py.
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000  # characters (code points), per message
MAX_TOTAL_CONVERSATION_LENGTH = 32000  # characters, whole conversation
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 disables top-k filtering (full vocabulary)
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
# nanochat's API accepts only these two roles (its error text mentions 'system' but its check rejects it).
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
    """Generation defaults and the model's identity, from the command line: temperature/top_k/max_tokens when a
    request leaves them out (nanochat: 0.8, 50, 512); max_context, the model's sequence_len (None: unchecked): a
    prompt leaving no room for one token is a 400, max_tokens is cut to the room left; wait_timeout: seconds a
    request may wait for a slot (then 503)."""

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    model: str = "unknown"
    max_context: int | None = None
    wait_timeout: float = 60.0


class Stats:
    """Counters for /stats, updated from request threads under one lock: requests_served (streams that ran to the
    end), requests_active, requests_rejected (503), requests_invalid (400, 413), client_disconnects,
    tokens_generated, generation_seconds (summed over requests: admission to the last token), and the tokens of the
    last RATE_WINDOW_S seconds."""

    def __init__(self):
        self._lock, self.started, self._t0 = threading.Lock(), time.time(), time.monotonic()
        self.counts = dict.fromkeys(("requests_served", "requests_active", "requests_rejected", "requests_invalid",
                                     "client_disconnects", "tokens_generated", "generation_seconds"), 0)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, d in deltas.items():
                self.counts[name] += d

    def token(self, n: int) -> None:
        """Count n tokens just generated, for the recent-throughput window."""
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self._lock:
            c, recent = dict(self.counts), sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        seconds = c.pop("generation_seconds")
        return {**c, "tokens_per_sec": round(c["tokens_generated"] / seconds, 2) if seconds > 0 else 0.0,  # per request
                "tokens_per_sec_recent": round(recent / min(RATE_WINDOW_S, max(now - self._t0, 1e-3)), 2),  # all
                "uptime_s": round(time.time() - self.started, 1)}


class BadRequest(ValueError):
    """Request body that breaks the API contract or a limit; its message is sent back with `status` (400, 413 for a
    body over MAX_BODY_BYTES). `param` names the offending field (OpenAI's error shape reports it)."""

    def __init__(self, message: str, param: str | None = "messages", status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def read_json_body(req) -> Any:
    """The request's JSON body, read by us rather than Flask so every malformed body is a 400 with a reason.

    Raises BadRequest: 413 past MAX_BODY_BYTES (a chunked body is read up to one byte past the limit, never whole);
    400 for a wrong Content-Type, bytes that are not UTF-8 JSON, or JSON nested too deeply for the parser.
    """
    if not req.is_json:
        raise BadRequest("Content-Type must be application/json", None)
    too_large = BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes", None, 413)
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise too_large
    # the raw input, not req.stream: werkzeug cuts a chunked body silently at MAX_CONTENT_LENGTH
    data = get_input_stream(req.environ, max_content_length=None).read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise too_large
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply", None) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}", None) from None


def _number(body: dict, key: str, lo: float, hi: float, integer: bool, param: str | None = None):
    """body[key] checked to be a JSON number (an integer if `integer`) in [lo, hi]; None when absent/null."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int,) if integer else (int, float)):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}", param or key)
    # ints compare exactly at any size (math.isfinite would overflow on a 400-digit one)
    if (isinstance(v, float) and not math.isfinite(v)) or not (lo <= v <= hi):
        raise BadRequest(f"{key} must be between {lo} and {hi}", param or key)
    return v


def validate_request(body: Any, nanochat: bool = False) -> dict:
    """Check a parsed chat completions body; returns {messages, temperature, top_k, top_p, max_tokens, n, seed,
    stop (a list), stream, include_usage}, None where not given.

    Both APIs, nanochat's limits: messages a non-empty list of at most 500 {role, content} objects, content a
    non-empty string (no lone surrogates) of at most 8000 characters, 32000 in all; temperature in [0, 2], top_k in
    [0, 200], max_tokens in [1, 4096]. The order of roles is the tokenizer's to check. nanochat's API (`nanochat`)
    accepts only the roles user and assistant and string content, and ignores every other field. The OpenAI API
    also accepts a system message, content as a list of {"type": "text"} parts, max_completion_tokens, n in [1,
    MAX_N], top_p in (0, 1], an integer seed, stop as a string or up to MAX_STOP strings, stream and
    stream_options.include_usage; other OpenAI fields are ignored. Raises BadRequest naming the field.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", None)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list of {role, content} objects")
    if not messages:
        raise BadRequest("At least one message is required")
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise BadRequest(f"Too many messages. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per request")
    roles = ROLES if nanochat else ROLES + ("system",)
    out, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"Message {i} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            raise BadRequest(f"Message {i} has invalid role {role!r}. Must be one of {', '.join(roles)}")
        if isinstance(content, list) and not nanochat:  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"Message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or not content:
            raise BadRequest(f"Message {i} content must be a non-empty string")
        if len(content) > MAX_MESSAGE_LENGTH:
            raise BadRequest(f"Message {i} is too long. Maximum {MAX_MESSAGE_LENGTH} characters allowed per message")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"Message {i} content is not valid Unicode (lone surrogate)") from None
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise BadRequest(f"Total conversation is too long. Maximum {MAX_TOTAL_CONVERSATION_LENGTH} characters allowed")
    max_tokens = "max_tokens" if nanochat or "max_completion_tokens" not in body else "max_completion_tokens"
    p = {"messages": out, "temperature": _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, False),
         "top_k": _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, True),
         "max_tokens": _number(body, max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS, True, "max_tokens"),
         "top_p": None, "n": None, "seed": None, "stop": [], "stream": True, "include_usage": False}
    if nanochat:
        return p
    top_p = _number(body, "top_p", 0.0, 1.0, integer=False)
    if top_p is not None and top_p <= 0:
        raise BadRequest("top_p must be greater than 0 and at most 1", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters", "stop")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise BadRequest("stream_options must be {\"include_usage\": bool}", "stream_options")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("model must be a string", "model")
    return dict(p, top_p=top_p, n=_number(body, "n", 1, MAX_N, integer=True), stop=stop, stream=stream,
                seed=_number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True),
                include_usage=bool(opts.get("include_usage")))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


_LOG_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_LOG_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _clip(text: str) -> str:
    """User text as one log line: truncated to LOG_CHARS, and newlines, other control characters, line separators
    and backslashes escaped, so a message can never start a forged log line."""
    clipped = text if len(text) <= LOG_CHARS else text[:LOG_CHARS] + f"...[{len(text) - LOG_CHARS} more chars]"
    return _LOG_UNSAFE.sub(lambda m: _LOG_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), clipped)


class _Call:
    """An admitted request: its engine `Request`, texts so far, and its end (counted, logged, slots freed) once, from
    the stream's end or the response's close(), whichever is first (close() alone: a stream never started)."""

    def __init__(self, req, req_id: str, stats: Stats):
        self.req, self.id, self.stats = req, req_id, stats
        self.texts = [""] * req.n
        self.t0 = time.perf_counter()
        self._ended = threading.Lock()

    def batches(self):
        counted = 0
        for batch in self.req.batches():
            for out in batch:
                self.texts[out.index] += out.text
            self.stats.token(sum(self.req.num_tokens) - counted)
            counted = sum(self.req.num_tokens)
            yield batch

    def end(self, finished: bool) -> None:
        if not self._ended.acquire(blocking=False):
            return
        self.req.cancel()
        tokens = sum(self.req.num_tokens)
        self.stats.add(requests_active=-1, requests_served=int(finished), client_disconnects=int(not finished),
                       tokens_generated=tokens, generation_seconds=time.perf_counter() - self.t0)
        logger.info("[%s] [ASSISTANT] (%d tokens%s) %s", self.id, tokens, "" if finished else ", client disconnected",
                    " | ".join(_clip(t) for t in self.texts))


def create_app(engine, tokenizer, defaults: Defaults | None = None) -> Flask:
    """The Flask app over `engine` (a `jaxchat.engine.Engine`, or anything with its `start`, `submit`,
    `busy_slots`, `queued`, `max_batch`, `max_queue`, `num_devices`, `device_of`), whose scheduler thread it
    starts, and `tokenizer` (`jaxchat.tokenizer.Tokenizer`)."""
    defaults = defaults or Defaults()
    engine.start()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["jaxchat_stats"] = stats = Stats()
    app.extensions["jaxchat_engine"] = engine
    ui_html = UI_PATH.read_text(encoding="utf-8")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")

    def error(status: int, message: str, param: str | None = None, openai: bool = True, **headers) -> Response:
        kind = "invalid_request_error" if status in (400, 404, 405, 413) else "server_error"
        code = {404: "not_found", 413: "request_too_large", 503: "server_busy"}.get(status)
        resp = jsonify(error={"message": message, "type": kind, "param": param, "code": code} if openai else message)
        resp.status_code = status
        resp.headers.update(headers)
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        # JSON instead of werkzeug's HTML pages (404, 405, 413, ...), in OpenAI's shape under /v1
        return error(e.code or 500, e.description or e.name, openai=request.path.startswith("/v1/"))

    @app.get("/")
    def index():
        return Response(ui_html, mimetype="text/html")

    @app.get("/health")
    def health():
        return jsonify(status="ok", ready=True, model=defaults.model, replicas=engine.num_devices,
                       available=engine.max_batch - engine.busy_slots)

    @app.get("/stats")
    def get_stats():
        busy = engine.busy_slots
        return jsonify(**stats.snapshot(), slots=engine.max_batch, slots_busy=busy, slots_free=engine.max_batch - busy,
                       queue=engine.queued, max_queue=engine.max_queue, replicas=engine.num_devices)

    def start(nanochat: bool):
        """The one pipeline's front half: parse, render, submit, wait for a slot. (call, params) or (None, error
        response: 400, 413 or 503)."""
        err = functools.partial(error, openai=not nanochat)
        try:
            p = validate_request(read_json_body(request), nanochat)
            ids, _ = tokenizer.render_conversation({"messages": p["messages"]}, max_tokens=1 << 30)  # no cut: see below
            prompt = ids + [assistant_start]
            room = 1 << 30 if defaults.max_context is None else defaults.max_context - len(prompt)
            if room < 1:
                raise BadRequest(f"Conversation is {len(prompt)} tokens; the model's context is {defaults.max_context}")
        except ValueError as e:  # BadRequest, or the tokenizer's: the order of roles
            stats.add(requests_invalid=1)
            return None, err(getattr(e, "status", 400), str(e), e.param if isinstance(e, BadRequest) else "messages")
        max_tokens = min(defaults.max_tokens if p["max_tokens"] is None else p["max_tokens"], room)
        p.update(max_tokens=max_tokens, n=p["n"] or 1, top_p=1.0 if p["top_p"] is None else float(p["top_p"]),
                 temperature=defaults.temperature if p["temperature"] is None else float(p["temperature"]),
                 top_k=defaults.top_k if p["top_k"] is None else p["top_k"],
                 seed=random.randint(0, 2**31 - 1) if p["seed"] is None else p["seed"] % 2**31)
        try:
            req = engine.submit(prompt, n=p["n"], max_tokens=max_tokens, temperature=p["temperature"],
                                top_k=p["top_k"] or None, top_p=p["top_p"], seed=p["seed"], stop=p["stop"])
            if not req.admitted.wait(defaults.wait_timeout):
                req.cancel()
                raise QueueFull(f"no slot became free within {defaults.wait_timeout:.0f}s")
        except QueueFull as e:
            stats.add(requests_rejected=1)
            logger.warning("503: %s", e)
            return None, err(503, f"Server busy: {e}. Retry later.", **{"Retry-After": "5"})
        req_id = f"{random.getrandbits(32):08x}"
        logger.info("[%s] %d messages, prompt %d tokens, %s", req_id, len(p["messages"]), len(prompt),
                    " ".join(f"{k}={_clip(str(p[k]))}" for k in ("temperature", "top_k", "top_p", "max_tokens", "n",
                                                                  "seed", "stop")))
        for m in p["messages"]:
            logger.info("[%s] [%s] %s", req_id, m["role"].upper(), _clip(m["content"]))
        stats.add(requests_active=1)
        return _Call(req, req_id, stats), p

    def sse(call: _Call, events, failed, done: str) -> Response:
        """The stream of `events()`, then `done`; an engine failure sends `failed(message)` first (the server serves
        on). Closing the response (the client went away) cancels the request."""
        def stream() -> Iterator[str]:
            finished = False
            try:
                try:
                    yield from events()
                except Exception as e:
                    logger.exception("[%s] generation failed", call.id)
                    yield _sse(failed(f"generation failed: {type(e).__name__}"))
                finished = True
                yield done
            finally:
                call.end(finished)

        resp = Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
        resp.call_on_close(lambda: call.end(False))
        return resp

    @app.post("/chat/completions")
    def chat_completions():
        """nanochat's API: an adapter over the pipeline, with nanochat's wire format."""
        call, p = start(nanochat=True)
        if call is None:
            return p
        gpu = engine.device_of(call.req.slots[0])

        def events() -> Iterator[str]:
            for batch in call.batches():
                if any(out.text for out in batch):  # a decode chunk's events in one write
                    yield "".join(_sse({"token": out.text, "gpu": gpu}) for out in batch if out.text)

        return sse(call, events, lambda message: {"error": message}, _sse({"done": True}))

    card = {"id": defaults.model, "object": "model", "created": int(stats.started), "owned_by": "jaxchat"}

    @app.get("/v1/models")
    def list_models():
        return jsonify(object="list", data=[card])

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id):
        return jsonify(card) if model_id == defaults.model else error(404, f"The model '{model_id}' does not exist",
                                                                      "model")

    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        call, p = start(nanochat=False)
        if call is None:
            return p
        n, req = p["n"], call.req
        head = {"id": f"chatcmpl-{random.getrandbits(96):024x}", "created": int(time.time()), "model": defaults.model}
        usage = lambda: {"prompt_tokens": len(req.tokens), "completion_tokens": sum(req.num_tokens),  # noqa: E731
                         "total_tokens": len(req.tokens) + sum(req.num_tokens)}
        if not p["stream"]:
            finished = False
            try:
                for _ in call.batches():
                    pass
                finished = True
            except Exception as e:
                logger.exception("[%s] generation failed", call.id)
                return error(500, f"generation failed: {type(e).__name__}")
            finally:
                call.end(finished)
            return jsonify(**head, object="chat.completion", usage=usage(), choices=[
                {"index": i, "message": {"role": "assistant", "content": call.texts[i]}, "logprobs": None,
                 "finish_reason": req.finish_reasons[i]} for i in range(n)])

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        def events() -> Iterator[str]:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            for batch in call.batches():
                pieces = [chunk([{"index": out.index, "delta": delta, "logprobs": None, "finish_reason": why}])
                          for out in batch for delta, why in (({"content": out.text}, None), ({}, out.finish_reason))
                          if (out.text and delta) or why]
                if pieces:
                    yield "".join(pieces)
            if p["include_usage"]:
                yield chunk([], usage=usage())

        return sse(call, events, lambda message: {"error": {"message": message, "type": "server_error", "param": None,
                                                            "code": None}}, "data: [DONE]\n\n")

    return app


def build_engine(params, config, tokenizer, num_devices: int = 1, max_batch: int = 8, **engine_kwargs):
    """One `jaxchat.engine.Engine` of max_batch slots per device over the first `num_devices` JAX devices;
    `engine_kwargs` go to it. Raises ValueError for --num-devices outside [1, devices], --max-batch below 1."""
    devices = jax.devices()
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"--num-devices {num_devices}: JAX sees {len(devices)} device(s) ({devices[0].platform})")
    if max_batch < 1:
        raise ValueError(f"--max-batch {max_batch}: must be >= 1")
    return Engine(params, config, tokenizer, max_batch=max_batch * num_devices, devices=devices[:num_devices],
                  **engine_kwargs)


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
    p.add_argument("-n", "--num-devices", type=int, default=1, help="JAX devices the engine's slots are split over")
    p.add_argument("--max-queue", type=int, default=64, help="samples that may wait for a slot before 503")
    p.add_argument("--max-batch", type=int, default=8, help="slots per device: requests decoded together")
    p.add_argument("--warmup", action="store_true", help="compile every shape before serving (else requests do)")
    p.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK,
                   help="tokens per host round-trip: smaller streams smoother, larger gives more tokens/s")
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
    engine = build_engine(params, config, tokenizer, args.num_devices, args.max_batch, max_queue=args.max_queue,
                          decode_chunk=args.decode_chunk)
    if args.warmup:
        t0 = time.perf_counter()
        engine.warmup()
        logger.info("warm-up compiles done in %.1fs", time.perf_counter() - t0)
    ckpt_dir = checkpoint_dir(args.source, args.model_tag)
    step = args.step if args.step is not None else max(list_steps(ckpt_dir), default=None)
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                        model=f"{args.source}/{Path(ckpt_dir).name}" + (f"@{step}" if step is not None else ""),
                        max_context=getattr(config, "sequence_len", None))
    app = create_app(engine, tokenizer, defaults)
    logger.info("model %s, %d slots on %d device(s); temperature %.2f, top-k %d, max tokens %d", defaults.model,
                engine.max_batch, engine.num_devices, args.temperature, args.top_k, args.max_tokens)
    logger.info("serving on http://%s:%d", args.host, args.port)
    from werkzeug.serving import run_simple

    run_simple(args.host, args.port, app, threaded=True, use_reloader=False, use_debugger=False)


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
