"""Chat web server: the chat page, OpenAI's and nanochat's APIs and vLLM's tokenizer endpoints, over one engine.

The job of nanochat's `scripts/chat_web.py`, on Flask and waitress (`serve.wsgi`: a bounded pool of threads, idle
connections closed, SIGTERM ends streams cleanly). One `jaxchat.engine.Engine` serves every request: its slots
(`--max-batch` per device, over `--num-devices` devices) decode together, and its queue is the only one: a request
that finds it full (`--max-queue`) or gets no slot within `Defaults.wait_timeout` is answered 503 with Retry-After.
A request's thread turns the engine's outputs (text, finish reasons, token counts, logprobs) into the response; a
client that goes away cancels it (WSGI `close()`), which frees its slots. One pipeline: the OpenAI API; nanochat's
`/chat/completions` is an adapter over it with nanochat's limits (roles user and assistant, string content) and wire
format. The tokenizer renders chats (`Tokenizer.render_conversation`: a system message is merged into the first user
turn) and checks the order of roles. Request checks, the BOS rule of /v1/completions and the logprobs shapes are in
`serve.protocol`.

    python -m serve.app -i sft                     # newest SFT checkpoint, http://127.0.0.1:8000
    python -m serve.app -i base --num-devices 8 --host 0.0.0.0 -p 8000

Endpoints:
    GET  /                     chat page (serve/ui.html, self-contained)
    POST /chat/completions     {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?} -> text/event-stream of
                               `data: {"token": str, "gpu": int}` and finally `data: {"done": true}` (nanochat's
                               API; "gpu": the device of the request's slot)
    POST /v1/chat/completions  the OpenAI chat completions API (streamed or not; system messages, n, stop, seed,
                               top_p, logprobs and top_logprobs), for the official `openai` client with
                               base_url=http://host:port/v1 and lm-eval's local-chat-completions
    POST /v1/completions       the OpenAI (legacy) completions API as vLLM serves it, for lm-eval's
                               local-completions: prompts as text or token ids, echo, logprobs, max_tokens 0
    GET  /tokenizer_info       vLLM's: bos/eos tokens, model_max_length, the Jinja chat template
    POST /tokenize             vLLM's: {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}
    POST /detokenize           vLLM's: {"tokens"} -> {"prompt"}
    GET  /v1/models            the one model served
    GET  /health               {"status", "ready", "model", "replicas", "available"}
    GET  /stats                request, token, slot and queue counters, tokens/s over the last 10 s
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import jax
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from jaxchat.chat_template import detokenize_request, tokenize_request, tokenizer_info
from jaxchat.engine import DECODE_CHUNK, Engine, QueueFull
from serve.protocol import (MAX_BODY_BYTES, MAX_MAX_TOKENS, MAX_TEMPERATURE, MAX_TOP_K, MIN_MAX_TOKENS,
                            MIN_TEMPERATURE, MIN_TOP_K, BadRequest, CompletionLogprobs, chat_logprob,
                            completion_prompts, read_json_body, validate_completion_request, validate_request)

logger = logging.getLogger("jaxchat.serve")

LOG_CHARS = 200  # request and reply text is logged truncated to this many characters per message
RATE_WINDOW_S = 10.0  # /stats tokens_per_sec_recent averages over this window
UI_PATH = Path(__file__).with_name("ui.html")
EXTRA_THREADS = 8  # WSGI threads beyond the engine's slots and queue: pages, /health, /stats, /tokenize, scoring


@dataclass
class Defaults:
    """Generation defaults and the model's identity, from the command line: temperature/top_k/max_tokens when a
    request leaves them out (nanochat: 0.8, 50, 512); max_context, the model's sequence_len (None: unchecked): a
    prompt leaving no room for one token is a 400, max_tokens is cut to the room left; wait_timeout: seconds a
    request may wait for a slot (then 503); eos_token, what ends a reply (`/tokenizer_info`: "<|bos|>" for a base
    model, whose next document it starts)."""

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    model: str = "unknown"
    max_context: int | None = None
    wait_timeout: float = 60.0
    eos_token: str = "<|assistant_end|>"


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
    """An admitted request: its engine `Request`s (one per prompt, n samples each: choice i * n + j is prompt i's
    sample j), texts so far, and its end (counted, logged, slots freed) once, from the stream's end or the
    response's close(), whichever is first (close() alone: a stream never started)."""

    def __init__(self, reqs: list, choices: int, n: int, req_id: str, stats: Stats):
        self.reqs, self.n, self.id, self.stats = reqs, n, req_id, stats
        self.texts = [""] * choices  # none submitted (max_tokens 0): the choices stay empty
        self.t0 = time.perf_counter()
        self._ended = threading.Lock()

    @property
    def completion_tokens(self) -> int:
        return sum(sum(r.num_tokens) for r in self.reqs)

    @property
    def finish_reasons(self) -> list[str | None]:
        return [why for r in self.reqs for why in r.finish_reasons]

    def batches(self) -> Iterator[list]:
        """The engine's batches of outputs (`Request.batches`), prompt after prompt, each output's index its
        choice's."""
        counted = 0
        for i, req in enumerate(self.reqs):
            for batch in req.batches():
                batch = [out._replace(index=i * self.n + out.index) for out in batch]
                for out in batch:
                    self.texts[out.index] += out.text
                self.stats.token(self.completion_tokens - counted)
                counted = self.completion_tokens
                yield batch

    def end(self, finished: bool) -> None:
        if not self._ended.acquire(blocking=False):
            return
        for req in self.reqs:
            req.cancel()
        tokens = self.completion_tokens
        self.stats.add(requests_active=-1, requests_served=int(finished), client_disconnects=int(not finished),
                       tokens_generated=tokens, generation_seconds=time.perf_counter() - self.t0)
        logger.info("[%s] [ASSISTANT] (%d tokens%s) %s", self.id, tokens, "" if finished else ", client disconnected",
                    " | ".join(_clip(t) for t in self.texts))


def create_app(engine, tokenizer, defaults: Defaults | None = None) -> Flask:
    """The Flask app over `engine` (a `jaxchat.engine.Engine`, or anything with its `start`, `submit`, `score`,
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
    max_model_len = defaults.max_context or 0  # 0: not known (/tokenizer_info's model_max_length)

    def error(status: int, message: str, param: str | None = None, openai: bool = True, **headers) -> Response:
        kind = "invalid_request_error" if status in (400, 404, 405, 413) else "server_error"
        code = {404: "not_found", 413: "request_too_large", 503: "server_busy"}.get(status)
        resp = jsonify(error={"message": message, "type": kind, "param": param, "code": code} if openai else message)
        resp.status_code = status
        resp.headers.update(headers)
        return resp

    def invalid(e: ValueError, openai: bool = True, param: str | None = None) -> Response:
        """400 (413) for a request that breaks the API: BadRequest, or the tokenizer's ValueError."""
        stats.add(requests_invalid=1)
        return error(getattr(e, "status", 400), str(e), getattr(e, "param", param), openai)

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

    def resolve(p: dict) -> dict:
        """The request's settings with the server's defaults where it gave none."""
        return dict(p, max_tokens=defaults.max_tokens if p["max_tokens"] is None else p["max_tokens"], n=p["n"] or 1,
                    top_p=1.0 if p["top_p"] is None else float(p["top_p"]),
                    temperature=defaults.temperature if p["temperature"] is None else float(p["temperature"]),
                    top_k=defaults.top_k if p["top_k"] is None else p["top_k"],
                    seed=random.randint(0, 2**31 - 1) if p["seed"] is None else p["seed"] % 2**31)

    def admit(prompts: list[list[int]], budgets: list[int], p: dict, err, what: str) -> tuple:
        """The one pipeline's front half: submit each prompt's n samples with its budget of tokens (budgets all > 0,
        or all 0: then nothing is submitted), wait for the first to get a slot (FIFO: the others follow). (call,
        None) or (None, 503 response)."""
        reqs = []
        try:
            for prompt, budget in zip(prompts, budgets):
                if budget > 0:
                    reqs.append(engine.submit(prompt, n=p["n"], max_tokens=budget, temperature=p["temperature"],
                                              top_k=p["top_k"] or None, top_p=p["top_p"], seed=p["seed"],
                                              stop=p["stop"], logprobs=p["logprobs"]))
            if reqs and not reqs[0].admitted.wait(defaults.wait_timeout):
                raise QueueFull(f"no slot became free within {defaults.wait_timeout:.0f}s")
        except QueueFull as e:
            for req in reqs:
                req.cancel()
            stats.add(requests_rejected=1)
            logger.warning("503: %s", e)
            return None, err(503, f"Server busy: {e}. Retry later.", **{"Retry-After": "5"})
        req_id = f"{random.getrandbits(32):08x}"
        logger.info("[%s] %s, %s", req_id, what, " ".join(
            f"{k}={_clip(str(p[k]))}" for k in ("temperature", "top_k", "top_p", "max_tokens", "n", "seed", "stop")))
        stats.add(requests_active=1)
        return _Call(reqs, len(prompts) * p["n"], p["n"], req_id, stats), None

    def start_chat(nanochat: bool):
        """Parse, render, admit a chat request: (call, params) or (None, error response: 400, 413 or 503)."""
        err = functools.partial(error, openai=not nanochat)
        try:
            p = resolve(validate_request(read_json_body(request), nanochat))
            ids, _ = tokenizer.render_conversation({"messages": p["messages"]}, max_tokens=1 << 30)  # no cut: see below
            prompt = ids + [assistant_start]
            room = 1 << 30 if defaults.max_context is None else defaults.max_context - len(prompt)
            if room < 1:
                raise BadRequest(f"Conversation is {len(prompt)} tokens; the model's context is {defaults.max_context}")
        except ValueError as e:  # BadRequest, or the tokenizer's: the order of roles
            return None, invalid(e, not nanochat, "messages")
        p["max_tokens"] = min(p["max_tokens"], room)
        call, resp = admit([prompt], [p["max_tokens"]], p, err,
                           f"{len(p['messages'])} messages, prompt {len(prompt)} tokens")
        if call is None:
            return None, resp
        for m in p["messages"]:
            logger.info("[%s] [%s] %s", call.id, m["role"].upper(), _clip(m["content"]))
        return call, p

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

    def run_to_end(call: _Call, each=lambda out: None) -> Response | None:
        """A non-streamed reply: every output through `each`; None, or the 500 of an engine failure."""
        finished = False
        try:
            for batch in call.batches():
                for out in batch:
                    each(out)
            finished = True
        except Exception as e:
            logger.exception("[%s] generation failed", call.id)
            return error(500, f"generation failed: {type(e).__name__}")
        finally:
            call.end(finished)
        return None

    def openai_failed(message: str) -> dict:
        return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}

    @app.post("/chat/completions")
    def chat_completions():
        """nanochat's API: an adapter over the pipeline, with nanochat's wire format."""
        call, p = start_chat(nanochat=True)
        if call is None:
            return p
        gpu = engine.device_of(call.reqs[0].slots[0])

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

    def usage(prompt_tokens: int, call: _Call) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": call.completion_tokens,
                "total_tokens": prompt_tokens + call.completion_tokens}

    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        """OpenAI's chat completions; with logprobs, each choice's `logprobs.content` has one entry per generated
        token (a stop token included, whose text the reply leaves out), the model's distribution before
        temperature."""
        call, p = start_chat(nanochat=False)
        if call is None:
            return p
        n, prompt_tokens = p["n"], len(call.reqs[0].tokens)
        head = {"id": f"chatcmpl-{random.getrandbits(96):024x}", "created": int(time.time()), "model": defaults.model}

        def logprob(out) -> dict | None:
            return None if out.logprobs is None or out.token is None else chat_logprob(tokenizer, out.token,
                                                                                      *out.logprobs)
        if not p["stream"]:
            content = [[] for _ in range(n)]
            failed = run_to_end(call, lambda out: content[out.index].extend(filter(None, [logprob(out)])))
            if failed is not None:
                return failed
            return jsonify(**head, object="chat.completion", usage=usage(prompt_tokens, call), choices=[
                {"index": i, "message": {"role": "assistant", "content": call.texts[i]},
                 "logprobs": None if p["logprobs"] is None else {"content": content[i]},
                 "finish_reason": call.finish_reasons[i]} for i in range(n)])

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        def pieces(out) -> Iterator[str]:
            entry = logprob(out)
            if out.text or entry:
                yield chunk([{"index": out.index, "delta": {"content": out.text}, "finish_reason": None,
                              "logprobs": None if entry is None else {"content": [entry]}}])
            if out.finish_reason:
                yield chunk([{"index": out.index, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])

        def events() -> Iterator[str]:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            for batch in call.batches():
                text = "".join(piece for out in batch for piece in pieces(out))
                if text:
                    yield text
            if p["include_usage"]:
                yield chunk([], usage=usage(prompt_tokens, call))

        return sse(call, events, openai_failed, "data: [DONE]\n\n")

    @app.post("/v1/completions")
    def openai_completions():
        """OpenAI's completions API, as vLLM serves it (see `serve.protocol` for the fields and the BOS rule).

        Choice i * n + j is prompt i's sample j. echo puts the prompt before the generated text; with logprobs N,
        `logprobs` = {tokens, token_logprobs, top_logprobs (dicts of the top N and the chosen token), text_offset}:
        with echo, one entry per prompt token as sent (the first null), scored by the engine's one batched forward
        (`Engine.score`), then one per generated token (a stop token included, its text left out), from the
        engine's logprobs decode. max_tokens 0 generates nothing (finish_reason "length"): with echo and logprobs,
        lm-eval's scoring request without the extra token. A prompt (with the <|bos|> the server puts first) must
        leave room for one token when max_tokens > 0; max_tokens is cut to the room left.
        """
        try:
            p = resolve(validate_completion_request(read_json_body(request)))
            prompts = completion_prompts(tokenizer, p["prompts"], p["add_special_tokens"])
            context, want = defaults.max_context, min(p["max_tokens"], 1)
            for i, (ids, model_ids) in enumerate(prompts):
                if context is not None and len(model_ids) + want > context:
                    bos = " with the <|bos|> the server puts first" if len(model_ids) > len(ids) else ""
                    raise BadRequest(f"prompt {i} is {len(model_ids)} tokens{bos}; the model's context is {context}"
                                     + (" and max_tokens > 0 needs room for one more" if want else ""), "prompt")
            if want and len(prompts) * p["n"] > engine.max_batch + engine.max_queue:
                raise BadRequest(f"{len(prompts)} prompts x n={p['n']} samples is more than the server's "
                                 f"{engine.max_batch} slots and {engine.max_queue} queue places", "prompt")
            scored = None
            if p["echo"] and p["logprobs"] is not None:
                scored = engine.score([model_ids for _, model_ids in prompts], top_n=p["logprobs"])
        except ValueError as e:
            return invalid(e, param="prompt")
        budgets = [min(p["max_tokens"], context - len(m)) if context else p["max_tokens"] for _, m in prompts]
        call, resp = admit([m for _, m in prompts], budgets, p, error,
                           f"{len(prompts)} prompt(s), {sum(len(m) for _, m in prompts)} tokens, echo={p['echo']} "
                           f"logprobs={p['logprobs']}")
        if call is None:
            return resp
        n, total = p["n"], len(prompts) * p["n"]
        prompt_tokens = sum(len(m) for _, m in prompts)
        echoed, logs = [""] * total, [None] * total
        for i, (ids, _) in enumerate(prompts):
            text = p["prompts"][i] if isinstance(p["prompts"][i], str) else tokenizer.decode(ids)
            logger.info("[%s] [PROMPT %d] %s", call.id, i, _clip(text))
            for k in range(i * n, (i + 1) * n):
                echoed[k] = text if p["echo"] else ""
                if p["logprobs"] is not None:
                    logs[k] = CompletionLogprobs(tokenizer)
                    if scored is not None:
                        logs[k].add_scored(ids, scored[i])
        if not call.reqs:  # max_tokens 0: no generation
            call.end(True)
        head = {"id": f"cmpl-{random.getrandbits(96):024x}", "created": int(time.time()), "model": defaults.model}

        def add(out) -> None:
            if logs[out.index] is not None and out.token is not None and out.logprobs is not None:
                logs[out.index].add(out.token, *out.logprobs)

        reasons = lambda: call.finish_reasons or ["length"] * total  # noqa: E731
        if not p["stream"]:
            failed = run_to_end(call, add) if call.reqs else None
            if failed is not None:
                return failed
            return jsonify(**head, object="text_completion", usage=usage(prompt_tokens, call), choices=[
                {"index": k, "text": echoed[k] + call.texts[k], "finish_reason": reasons()[k],
                 "logprobs": None if logs[k] is None else logs[k].take()} for k in range(total)])

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({**head, "object": "text_completion", "choices": choices, **extra})

        def events() -> Iterator[str]:
            if p["echo"] or not call.reqs:
                yield "".join(chunk([{"index": k, "text": echoed[k], "finish_reason": None if call.reqs else "length",
                                      "logprobs": None if logs[k] is None else logs[k].take()}])
                              for k in range(total))
            for batch in call.batches():  # one sample's outputs of one decode chunk
                for out in batch:
                    add(out)
                k = batch[0].index
                yield chunk([{"index": k, "text": "".join(out.text for out in batch),
                              "finish_reason": batch[-1].finish_reason,
                              "logprobs": None if logs[k] is None else logs[k].take()}])
            if p["include_usage"]:
                yield chunk([], usage=usage(prompt_tokens, call))

        return sse(call, events, openai_failed, "data: [DONE]\n\n")

    @app.get("/tokenizer_info")
    def get_tokenizer_info():
        return jsonify(tokenizer_info(tokenizer, max_model_len, eos_token=defaults.eos_token))

    @app.post("/tokenize")
    def tokenize():
        try:
            return jsonify(tokenize_request(tokenizer, read_json_body(request), max_model_len))
        except ValueError as e:  # BadRequest, TokenizationRequestError, text the tokenizer refuses
            return invalid(e, param="prompt")

    @app.post("/detokenize")
    def detokenize():
        try:
            return jsonify(detokenize_request(tokenizer, read_json_body(request)))
        except ValueError as e:
            return invalid(e, param="tokens")

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
    from serve import wsgi

    p = argparse.ArgumentParser(description="jaxchat web chat server (nanochat scripts/chat_web.py)")
    p.add_argument("-i", "--source", default="sft", choices=["sft", "rl", "base"], help="checkpoint family")
    p.add_argument("-g", "--model-tag", default=None, help="model tag to load (default: newest)")
    p.add_argument("-s", "--step", type=int, default=None, help="step to load (default: newest)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0: full vocabulary)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on (0: a free one, logged)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to expose)")
    p.add_argument("-n", "--num-devices", type=int, default=1, help="JAX devices the engine's slots are split over")
    p.add_argument("--max-queue", type=int, default=64, help="samples that may wait for a slot before 503")
    p.add_argument("--max-batch", type=int, default=8, help="slots per device: requests decoded together")
    p.add_argument("--warmup", action="store_true", help="compile every shape before serving (else requests do)")
    p.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK,
                   help="tokens per host round-trip: smaller streams smoother, larger gives more tokens/s")
    p.add_argument("--connection-limit", type=int, default=wsgi.CONNECTION_LIMIT,
                   help="open connections, idle ones included (more wait in the listen backlog)")
    p.add_argument("--idle-timeout", type=int, default=wsgi.CHANNEL_TIMEOUT,
                   help="seconds before an idle connection, or one whose request stalls, is closed")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name, lo, hi in (("temperature", MIN_TEMPERATURE, MAX_TEMPERATURE), ("top_k", MIN_TOP_K, MAX_TOP_K),
                         ("max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS), ("max_batch", 1, 1024),
                         ("connection_limit", 8, 1 << 16), ("idle_timeout", 1, 3600)):
        if not lo <= getattr(args, name) <= hi:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in [{lo}, {hi}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jaxchat.checkpoint import checkpoint_dir, load_model_from
    from serve import wsgi

    params, config, tokenizer, meta = load_model_from(args.source, model_tag=args.model_tag, step=args.step)
    engine = build_engine(params, config, tokenizer, args.num_devices, args.max_batch, max_queue=args.max_queue,
                          decode_chunk=args.decode_chunk)
    if args.warmup:
        t0 = time.perf_counter()
        engine.warmup()
        logger.info("warm-up compiles done in %.1fs", time.perf_counter() - t0)
    step = meta.get("step")  # the step loaded: a damaged newer one is skipped (jaxchat.checkpoint.newest_intact)
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                        model=f"{args.source}/{Path(checkpoint_dir(args.source, args.model_tag)).name}"
                              + (f"@{step}" if step is not None else ""),
                        max_context=getattr(config, "sequence_len", None),
                        eos_token="<|bos|>" if args.source == "base" else "<|assistant_end|>")
    app = create_app(engine, tokenizer, defaults)
    # every request in flight holds a thread: one per slot and per queue place (admitted or waiting), and a few more
    threads = engine.max_batch + args.max_queue + EXTRA_THREADS
    logger.info("model %s, %d slots on %d device(s); temperature %.2f, top-k %d, max tokens %d; %d threads, "
                "%d connections, %ds idle timeout", defaults.model, engine.max_batch, engine.num_devices,
                args.temperature, args.top_k, args.max_tokens, threads, args.connection_limit, args.idle_timeout)
    wsgi.serve(app, args.host, args.port, threads=threads, connection_limit=args.connection_limit,
               channel_timeout=args.idle_timeout, max_request_body_size=MAX_BODY_BYTES,
               on_listening=lambda server: logger.info("serving on %s", server.url))
    logger.info("stopped")


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
