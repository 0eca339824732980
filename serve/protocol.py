"""What the server's APIs accept and return: request checks, the prompts of /v1/completions, logprobs shapes.

Three APIs share these checks: nanochat's `/chat/completions` (its limits: roles user and assistant, string
content), OpenAI's `/v1/chat/completions` and `/v1/completions` as vLLM serves them
(`vllm/entrypoints/openai/protocol.py`: ChatCompletionRequest, CompletionRequest). A body that breaks them raises
`BadRequest` naming the field; the server answers 400 (413 for a body over MAX_BODY_BYTES) with the message.

The BOS rule of /v1/completions (`completion_prompts`). nanochat trains a base model with <|bos|> at the start of
every document, and scores it so (CORE), so the model's log-probabilities mean something only after one. The
server therefore puts <|bos|> before every prompt, a string or token ids, unless the prompt already starts with it
or the request says `"add_special_tokens": false` (vLLM's field; vLLM applies it to strings only). The added token
is conditioning, not part of the prompt: `echo` returns the prompt as sent and its `logprobs` hold exactly one
entry per token of it (the first null, as OpenAI's), then one per generated token. So lm-evaluation-harness, which
tokenizes through `/tokenize` without special tokens, sends ids without <|bos|> and sums `token_logprobs[ctxlen:-1]`
of its own ids, scores each continuation given <|bos|> and its context, as nanochat's own evals do. The <|bos|>
takes one position of the context: a prompt of `sequence_len` tokens is too long.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Any

from jaxchat.chat_template import encode_with_special_tokens

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
MAX_N = 8  # OpenAI API: most choices per request
MAX_STOP = 4  # OpenAI API: most stop sequences, as OpenAI's own limit
MAX_STOP_CHARS = 64
MAX_PROMPTS = 256  # /v1/completions: most prompts per request (lm-eval sends its --batch_size)
MAX_LOGPROBS = 20  # most top alternatives per token (OpenAI's limit; the engine's TOP_LOGPROBS)


class BadRequest(ValueError):
    """Request body that breaks the API contract or a limit; its message is sent back with `status` (400, 413 for a
    body over MAX_BODY_BYTES). `param` names the offending field (OpenAI's error shape reports it)."""

    def __init__(self, message: str, param: str | None = "messages", status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def read_json_body(req) -> Any:
    """The request's JSON body, read by us rather than Flask so every malformed body is a 400 with a reason.

    The WSGI server (`serve.wsgi`, waitress) de-chunks a chunked body and answers a malformed one 400 itself, so the
    body arrives whole with its Content-Length. Raises BadRequest: 413 past MAX_BODY_BYTES (at most one byte past
    the limit is read); 400 for a wrong Content-Type, bytes that are not UTF-8 JSON, or JSON nested too deeply.
    """
    if not req.is_json:
        raise BadRequest("Content-Type must be application/json", None)
    too_large = BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes", None, 413)
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise too_large
    data = req.stream.read(MAX_BODY_BYTES + 1)
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


def _flag(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be a boolean", key)
    return v


def _openai_fields(body: dict) -> dict:
    """The sampling and delivery fields both OpenAI APIs share: top_p in (0, 1], n in [1, MAX_N], an integer seed,
    stop as a string or up to MAX_STOP strings, stream, stream_options.include_usage, model a string."""
    top_p = _number(body, "top_p", 0.0, 1.0, integer=False)
    if top_p is not None and top_p <= 0:
        raise BadRequest("top_p must be greater than 0 and at most 1", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters", "stop")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise BadRequest("stream_options must be {\"include_usage\": bool}", "stream_options")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("model must be a string", "model")
    return {"temperature": _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, False),
            "top_k": _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, True), "top_p": top_p,
            "n": _number(body, "n", 1, MAX_N, integer=True), "stop": stop, "stream": _flag(body, "stream", False),
            "seed": _number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True),
            "include_usage": bool(opts.get("include_usage"))}


def validate_request(body: Any, nanochat: bool = False) -> dict:
    """Check a parsed chat completions body; returns {messages, temperature, top_k, top_p, max_tokens, n, seed,
    stop (a list), stream, include_usage, logprobs}, None where not given.

    Both APIs, nanochat's limits: messages a non-empty list of at most 500 {role, content} objects, content a
    non-empty string (no lone surrogates) of at most 8000 characters, 32000 in all; temperature in [0, 2], top_k in
    [0, 200], max_tokens in [1, 4096]. The order of roles is the tokenizer's to check. nanochat's API (`nanochat`)
    accepts only the roles user and assistant and string content, and ignores every other field. The OpenAI API
    also accepts a system message, content as a list of {"type": "text"} parts, max_completion_tokens, the fields
    of `_openai_fields`, and logprobs (bool) with top_logprobs in [0, MAX_LOGPROBS] (p["logprobs"]: the number of
    alternatives, None without logprobs); other OpenAI fields are ignored. Raises BadRequest naming the field.
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
         "top_p": None, "n": None, "seed": None, "stop": [], "stream": True, "include_usage": False, "logprobs": None}
    if nanochat:
        return p
    top = _number(body, "top_logprobs", 0, MAX_LOGPROBS, integer=True)
    logprobs = _flag(body, "logprobs", False)
    if top is not None and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return dict(p, **_openai_fields(body), logprobs=(top or 0) if logprobs else None)


def validate_completion_request(body: Any) -> dict:
    """Check a parsed /v1/completions body (OpenAI's Completions API as vLLM serves it); returns {prompts, echo,
    logprobs, max_tokens, add_special_tokens, and `_openai_fields`'s}, None where not given.

    prompt: a string, a list of strings, a list of token ids or a list of token-id lists (1 to MAX_PROMPTS prompts;
    ids are checked against the vocabulary by `completion_prompts`); p["prompts"] is a list of str or list[int].
    max_tokens in [0, 4096] (0: no generation, with echo only the prompt scored); echo and add_special_tokens
    booleans; logprobs an integer in [0, MAX_LOGPROBS] or null. Other fields are ignored. Raises BadRequest.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", None)
    prompt = body.get("prompt")
    is_ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa
    if isinstance(prompt, str) or (is_ids(prompt) and prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(x, str) for x in prompt) or all(map(is_ids, prompt))):
        prompts = prompt
    else:
        raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                         "lists", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    for i, x in enumerate(prompts):
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(f"prompt {i} is not valid Unicode (lone surrogate)", "prompt") from None
    return {"prompts": prompts, **_openai_fields(body), "echo": _flag(body, "echo", False),
            "logprobs": _number(body, "logprobs", 0, MAX_LOGPROBS, integer=True),
            "max_tokens": _number(body, "max_tokens", 0, MAX_MAX_TOKENS, integer=True),
            "add_special_tokens": _flag(body, "add_special_tokens", True)}


def completion_prompts(tokenizer, prompts: list, add_special_tokens: bool) -> list[tuple[list[int], list[int]]]:
    """(the prompt's ids as the client sent them, the ids the model reads) per prompt, by the module's BOS rule:
    a string is tokenized as /tokenize does (special token names become their ids, no <|bos|> added); the model
    reads <|bos|> + those ids when add_special_tokens and they do not start with it.

    Raises BadRequest: an id outside [0, vocab_size), a prompt that is empty for the model.
    """
    bos, vocab = tokenizer.get_bos_token_id(), tokenizer.get_vocab_size()
    out = []
    for i, x in enumerate(prompts):
        ids = encode_with_special_tokens(tokenizer, x) if isinstance(x, str) else list(x)
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt {i} holds a token id outside [0, {vocab})", "prompt")
        model_ids = [bos] + ids if add_special_tokens and ids[:1] != [bos] else ids
        if not model_ids:
            raise BadRequest(f"prompt {i} is empty", "prompt")
        out.append((ids, model_ids))
    return out


def _top_dict(tokenizer, token: int, logprob: float, top) -> dict[str, float]:
    """Completions' top_logprobs entry: {token text: logprob} of the top alternatives and the chosen token (vLLM's
    shape). Two ids with the same text (pieces of one character both show U+FFFD) keep the larger logprob, so the
    greedy token's value stays the maximum (lm-eval's is_greedy)."""
    out: dict[str, float] = {}
    for i, lp in list(top) + [(token, logprob)]:
        out.setdefault(tokenizer.id_to_token(i), lp)
    return out


class CompletionLogprobs:
    """One completions choice's `logprobs` ({tokens, token_logprobs, top_logprobs, text_offset}), built token by
    token: the echoed prompt's then the generated ones. text_offset is the character offset of each token in the
    choice's text (from `start`), counted over whole characters of the UTF-8 bytes decoded so far."""

    def __init__(self, tokenizer, start: int = 0):
        self.tokenizer, self.chars = tokenizer, start
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.entries: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token: int, logprob: float | None, top=None) -> None:
        """Append a token: its logprob (None: the prompt's first) and top ((id, logprob), ...)."""
        e = self.entries
        e["text_offset"].append(self.chars)
        self.chars += len(self._utf8.decode(self.tokenizer.id_to_bytes(token)))
        e["tokens"].append(self.tokenizer.id_to_token(token))
        e["token_logprobs"].append(logprob)
        e["top_logprobs"].append(None if logprob is None else _top_dict(self.tokenizer, token, logprob, top))

    def add_scored(self, ids: list[int], scored) -> None:
        """The echoed prompt `ids` from a `jaxchat.scoring.ScoredSequence` of the ids the model read (those, or
        <|bos|> and those): one entry per id, the first with logprob None."""
        skip = len(scored.token_logprobs) - len(ids)  # 1 when the server put <|bos|> first
        for t, token in enumerate(ids):
            self.add(token, None if t == 0 else scored.token_logprobs[skip + t], scored.top[skip + t])

    def take(self) -> dict[str, list]:
        """The entries added since the last take (a stream's chunk)."""
        out = self.entries
        self.entries = {k: [] for k in out}
        return out


def chat_logprob(tokenizer, token: int, logprob: float, top) -> dict:
    """One entry of a chat choice's `logprobs.content`: {token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]} (OpenAI's shape; bytes: the token's UTF-8 bytes, which rebuild characters split over tokens)."""
    def entry(i, lp):
        return {"token": tokenizer.id_to_token(i), "logprob": lp, "bytes": list(tokenizer.id_to_bytes(i))}
    return {**entry(token, logprob), "top_logprobs": [entry(i, lp) for i, lp in top]}
