"""The tokenizer as vLLM-style servers expose it: a Jinja chat template and the tokenization endpoints.

Clients of OpenAI-compatible servers (lm-evaluation-harness's `local-completions` with its remote tokenizer,
vLLM's own tools) do not load our tokenizer; they ask the server:
- `GET /tokenizer_info` -> `tokenizer_info(...)`: bos/eos token strings, `model_max_length` and `chat_template`,
  a Jinja template (the Hugging Face convention) that renders messages as `Tokenizer.render_conversation` does.
- `POST /tokenize` -> `tokenize_request(...)`: `{"prompt", "add_special_tokens"}` or `{"messages",
  "add_generation_prompt", "add_special_tokens"}` to `{"tokens", "count", "max_model_len"}`.
- `POST /detokenize` -> `detokenize_request(...)`: `{"tokens"}` to `{"prompt"}`.
Shapes and defaults follow vLLM (`vllm/entrypoints/openai/protocol.py`: TokenizeCompletionRequest,
TokenizeChatRequest, DetokenizeRequest, TokenizeResponse; `serving_tokenization.py`: TokenizerInfo).

Text given to these endpoints is tokenized as Hugging Face tokenizers do: a special token's name inside it
("<|assistant_end|>") becomes that token's id. That is how a rendered template turns back into the right ids, and how
lm-eval finds `eos_token_id` (it tokenizes the eos string and takes the first id). The chat endpoints do not do this:
there user text is ordinary text (`Tokenizer.encode`), so the one place the template and the engine differ is a
message whose text contains a special token's name.
"""

from __future__ import annotations

import functools
from typing import Any

from jaxchat.tokenizer import PART_TYPES

# Renders exactly the ids of `Tokenizer.render_conversation` (+ "<|assistant_start|>" with add_generation_prompt,
# as `render_for_completion`): <|bos|>, a leading system message merged into the first user message as
# "system\n\nuser", user turns in <|user_start|>..<|user_end|>, assistant turns in <|assistant_start|>..
# <|assistant_end|>. Content is a string or a list of parts: {"type": "text"} as is (OpenAI's text parts, joined as
# the server joins them), {"type": "python"} in <|python_start|>..<|python_end|>, {"type": "python_output"} in
# <|output_start|>..<|output_end|> (nanochat's tool calls). One difference from render_conversation: two text
# parts in a row become one string here, so the ids at their seam may differ (the text is the same).
# Literals are written as {{ '...' }} and every tag trims whitespace, so the output is the same with or without
# trim_blocks/lstrip_blocks (Hugging Face sets both; lm-eval's environment neither). No variable other than
# `messages` and `add_generation_prompt` is read, because lm-eval passes only those (under StrictUndefined).
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'python' -%}{{ '<|python_start|>' + part['text'] + '<|python_end|>' }}"
    "{%- elif part['type'] == 'python_output' -%}{{ '<|output_start|>' + part['text'] + '<|output_end|>' }}"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='') -%}"
    "{{ '<|bos|>' }}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}{%- set ns.system = render(message['content']) + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<|user_start|>' + ns.system + render(message['content']) + '<|user_end|>' }}{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant_start|>' + render(message['content']) + '<|assistant_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt is defined and add_generation_prompt -%}{{ '<|assistant_start|>' }}{%- endif -%}"
)

ROLES = ("system", "user", "assistant")


class TokenizationRequestError(ValueError):
    """A malformed /tokenize or /detokenize body: the server answers 400 with this message; `param` names the
    field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def tokenizer_info(tokenizer, max_model_len: int, eos_token: str = "<|assistant_end|>") -> dict[str, Any]:
    """The `GET /tokenizer_info` body: what a Hugging Face tokenizer_config.json would hold, as vLLM serves it.

    Args:
        tokenizer: a `jaxchat.tokenizer.Tokenizer` with nanochat's special tokens.
        max_model_len: the model's context length in tokens (`GPTConfig.sequence_len`).
        eos_token: the token that ends a reply: "<|assistant_end|>" for chat models (default), "<|bos|>" for a base
            model (its next document).

    Returns a dict: tokenizer_class, bos_token, eos_token, model_max_length, chat_template, vocab_size,
    add_bos_token (False: the chat template writes <|bos|> itself).

    Raises:
        KeyError: eos_token is not one of the tokenizer's special tokens.
    """
    tokenizer.encode_special(eos_token)  # raises KeyError naming the known special tokens
    return {
        "tokenizer_class": "jaxchat.tokenizer.Tokenizer",
        "bos_token": tokenizer.id_to_token(tokenizer.get_bos_token_id()),
        "eos_token": eos_token,
        "model_max_length": int(max_model_len),
        "chat_template": CHAT_TEMPLATE,
        "vocab_size": tokenizer.get_vocab_size(),
        "add_bos_token": False,
    }


@functools.lru_cache(maxsize=1)
def _compiled_template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # jinja2 comes with Flask

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """`CHAT_TEMPLATE` rendered in jinja2's `ImmutableSandboxedEnvironment`, as Hugging Face and vLLM render it.

    Returns the text (special tokens by name); tokenize it with `encode_with_special_tokens`.
    """
    return _compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def encode_with_special_tokens(tokenizer, text: str) -> list[int]:
    """Ids of text in which special token names ("<|user_start|>") become their ids, as Hugging Face tokenizers
    (and so vLLM's /tokenize) encode text. Use for rendered templates and raw prompts, never for a chat message's
    own text (`Tokenizer.encode` keeps that ordinary)."""
    return tokenizer.enc.encode(text, allowed_special="all")


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizationRequestError(f"{key} must be a boolean", key)
    return value


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise TokenizationRequestError("messages must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise TokenizationRequestError(f"messages[{i}] must be an object with role one of {ROLES}", "messages")
        if m["role"] == "system" and i != 0:
            raise TokenizationRequestError(f"messages[{i}]: only the first message may have role 'system'",
                                           "messages")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") in PART_TYPES
                        and isinstance(part.get("text"), str)):
                    raise TokenizationRequestError(f"messages[{i}].content[{j}] must be {{type: one of "
                                                   f"{PART_TYPES}, text: string}}", "messages")
        elif not isinstance(content, str):
            raise TokenizationRequestError(f"messages[{i}].content must be a string or a list of parts", "messages")
    return messages


def tokenize_request(tokenizer, body: Any, max_model_len: int) -> dict[str, Any]:
    """`POST /tokenize`, as vLLM: `{"prompt": str, "add_special_tokens": bool = true}` or `{"messages": [...],
    "add_generation_prompt": bool = true, "add_special_tokens": bool = false}`.

    add_special_tokens prepends <|bos|> (the only token nanochat's tokenizer adds); a chat's template already
    starts with it, hence the chat default false. A "prompt" that is a list of {role, content} objects is taken as
    messages: lm-eval 0.4.13 sends that with --apply_chat_template and its remote tokenizer (vLLM would refuse it). Special token names in the prompt or rendered chat become their
    ids (`encode_with_special_tokens`).

    Returns {"tokens": list[int], "count": int, "max_model_len": int}.

    Raises:
        TokenizationRequestError: body not an object, neither prompt (str) nor messages (a list of {role,
            content}), a flag that is not a boolean, or add_generation_prompt with continue_final_message.
    """
    if not isinstance(body, dict):
        raise TokenizationRequestError("request body must be a JSON object")
    prompt = body.get("prompt")
    if "messages" in body or (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        # lm-eval 0.4.13 with --apply_chat_template and the remote tokenizer sends the messages as "prompt"
        messages = _check_messages(body["messages"] if "messages" in body else prompt)
        add_generation_prompt = _flag(body, "add_generation_prompt", True)
        if add_generation_prompt and _flag(body, "continue_final_message", False):
            raise TokenizationRequestError("cannot set both continue_final_message and add_generation_prompt",
                                           "continue_final_message")
        text = render_chat(messages, add_generation_prompt)
        add_special_tokens = _flag(body, "add_special_tokens", False)
    elif isinstance(prompt, str):
        text = prompt
        add_special_tokens = _flag(body, "add_special_tokens", True)
    else:
        raise TokenizationRequestError("give either prompt (a string) or messages (a list of {role, content})",
                                       "prompt")
    ids = encode_with_special_tokens(tokenizer, text)
    if add_special_tokens:
        ids = [tokenizer.get_bos_token_id()] + ids
    return {"tokens": ids, "count": len(ids), "max_model_len": int(max_model_len)}


def detokenize_request(tokenizer, body: Any) -> dict[str, str]:
    """`POST /detokenize`, as vLLM: `{"tokens": list[int]}` -> `{"prompt": str}` (special tokens by name, invalid
    UTF-8 as U+FFFD).

    Raises:
        TokenizationRequestError: tokens missing, not a list of integers, or an id outside [0, vocab_size).
    """
    if not isinstance(body, dict):
        raise TokenizationRequestError("request body must be a JSON object")
    tokens = body.get("tokens")
    vocab = tokenizer.get_vocab_size()
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise TokenizationRequestError("tokens must be a list of integer token ids", "tokens")
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise TokenizationRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": tokenizer.decode(tokens)}
