"""The Jinja chat template and the vLLM-style /tokenizer_info, /tokenize, /detokenize bodies (jaxchat/chat_template.py).

The template must give, once its text is tokenized, exactly the ids of `Tokenizer.render_conversation` /
`render_for_completion`, in each Jinja environment that renders it: Hugging Face's and vLLM's sandbox
(ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks), lm-evaluation-harness's plain Environment with
StrictUndefined, and a default sandbox. The tokenizer is nanochat's own tokenizer.pkl (tests/fixtures).
"""

import copy
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxchat.chat_template import (CHAT_TEMPLATE, TokenizationRequestError, detokenize_request,
                                   encode_with_special_tokens, render_chat, tokenize_request, tokenizer_info)
from jaxchat.tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_directory(str(FIXTURE))


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _environments():
    hf = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    hf.globals["raise_exception"] = _raise
    lm_eval = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined,
                                 keep_trailing_newline=True)
    return {"hf/vllm sandbox": hf, "lm-eval": lm_eval, "default sandbox": ImmutableSandboxedEnvironment()}


TOOL_REPLY = [{"type": "text", "text": "Computing."}, {"type": "python", "text": "print(6*7)"},
              {"type": "python_output", "text": "42\n"}, {"type": "text", "text": "It is 42."}]

# Conversations that end with a user turn; each is also checked with an assistant reply appended.
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello there!"}],
    "system merged": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}],
    "multi turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Count: 1, 22, 333, 4444."}],
    "whitespace and unicode": [
        {"role": "system", "content": "  leading and trailing  \n"},
        {"role": "user", "content": "\n\n你好世界 🌍🚀👍🏽  café\ttabs\r\nCRLF   "},
        {"role": "assistant", "content": "  spaced reply \n\n"}, {"role": "user", "content": " "}],
    "tool call": [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": TOOL_REPLY},
                  {"role": "user", "content": "Thanks"}],
    "empty assistant": [{"role": "user", "content": "Say nothing"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "ok"}],
    "jinja-looking text": [{"role": "user", "content": "{{ messages }} {% if x %}{# c #}\\n '\" <|bos"}],
}


def _expected(tok, messages, generation_prompt):
    conversation = {"messages": copy.deepcopy(messages)}
    if generation_prompt:
        conversation["messages"].append({"role": "assistant", "content": "placeholder"})
        return tok.render_for_completion(conversation)
    return tok.render_conversation(conversation)[0]


@pytest.mark.parametrize("env_name", list(_environments()))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_template_renders_the_ids_of_render_conversation(tok, name, env_name):
    template = _environments()[env_name].from_string(CHAT_TEMPLATE)
    messages = CONVERSATIONS[name]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert encode_with_special_tokens(tok, text) == _expected(tok, messages, True)
    assert text.endswith("<|user_end|><|assistant_start|>")
    replied = messages + [{"role": "assistant", "content": "The answer: 42.\n"}]
    text = template.render(messages=replied, add_generation_prompt=False)
    assert encode_with_special_tokens(tok, text) == _expected(tok, replied, False)
    assert text.endswith("<|assistant_end|>")
    assert render_chat(replied, add_generation_prompt=False) == text


def test_system_message_is_merged_as_nanochat_does(tok):
    text = render_chat(CONVERSATIONS["system merged"])
    assert text == "<|bos|><|user_start|>Be brief.\n\nWhat is 6*7?<|user_end|><|assistant_start|>"


def test_openai_text_parts_are_joined_as_the_server_joins_them(tok):
    """OpenAI content parts [{"type": "text"}, ...] render as their texts joined, which is what the server's
    /v1/chat/completions does with them before rendering."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "Hello world"}]
    assert render_chat(parts) == render_chat(joined)
    assert encode_with_special_tokens(tok, render_chat(parts)) == _expected(tok, joined, True)


def test_adjacent_text_parts_keep_the_text_and_may_merge_tokens(tok):
    """The documented difference: two text parts in a row are one string in the template; render_conversation
    encodes them separately. The decoded text is the same."""
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]}]
    ids = encode_with_special_tokens(tok, render_chat(messages, add_generation_prompt=False))
    assert tok.decode(ids) == tok.decode(_expected(tok, messages, False))


def test_generation_prompt_flag_is_optional_under_strict_undefined():
    """Hugging Face passes add_generation_prompt always, lm-eval too; a caller that omits it gets no prompt."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    text = env.from_string(CHAT_TEMPLATE).render(messages=[{"role": "user", "content": "x"}])
    assert text == "<|bos|><|user_start|>x<|user_end|>"


def test_tokenizer_info_has_what_lm_eval_and_vllm_clients_read(tok):
    info = tokenizer_info(tok, max_model_len=256)
    assert info["bos_token"] == "<|bos|>" and info["eos_token"] == "<|assistant_end|>"
    assert info["model_max_length"] == 256 and info["chat_template"] == CHAT_TEMPLATE
    assert info["vocab_size"] == tok.get_vocab_size() and isinstance(info["tokenizer_class"], str)
    # lm-eval's RemoteTokenizer: eos_token_id = /tokenize({"prompt": eos, "add_special_tokens": False})[0]
    for name in ("eos_token", "bos_token"):
        tokens = tokenize_request(tok, {"prompt": info[name], "add_special_tokens": False}, 256)["tokens"]
        assert tokens == [tok.encode_special(info[name])]
    assert tokenizer_info(tok, 256, eos_token="<|bos|>")["eos_token"] == "<|bos|>"
    with pytest.raises(KeyError, match="not a special token"):
        tokenizer_info(tok, 256, eos_token="</s>")


def test_tokenize_prompt_and_messages_as_vllm(tok):
    text = "Hello world, 1234!"
    out = tokenize_request(tok, {"prompt": text}, 256)  # vLLM's default for a prompt: add_special_tokens true
    assert out == {"tokens": [tok.get_bos_token_id()] + tok.encode(text), "count": len(tok.encode(text)) + 1,
                   "max_model_len": 256}
    assert tokenize_request(tok, {"prompt": text, "add_special_tokens": False}, 256)["tokens"] == tok.encode(text)
    assert tokenize_request(tok, {"prompt": "<|user_start|>hi"}, 256)["tokens"] == [
        tok.get_bos_token_id(), tok.encode_special("<|user_start|>")] + tok.encode("hi")
    messages = CONVERSATIONS["tool call"]
    out = tokenize_request(tok, {"messages": messages}, 256)  # chat defaults: generation prompt, no extra bos
    assert out["tokens"] == _expected(tok, messages, True) and out["count"] == len(out["tokens"])
    out = tokenize_request(tok, {"messages": messages, "add_generation_prompt": False}, 256)
    assert out["tokens"] == _expected(tok, messages, True)[:-1]
    # lm-eval 0.4.13 (--apply_chat_template, remote tokenizer) puts the messages in "prompt"
    out = tokenize_request(tok, {"prompt": messages, "add_special_tokens": False}, 256)
    assert out["tokens"] == _expected(tok, messages, True)


@pytest.mark.parametrize("body, param", [
    ([1, 2], None), ({}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": "x", "add_special_tokens": "yes"},
                                                                 "add_special_tokens"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}], "continue_final_message": True}, "continue_final_message"),
    ({"prompt": [1, 2]}, "prompt"), ({"prompt": [{"role": "user"}]}, "messages"),
])
def test_bad_tokenize_bodies_name_the_field(tok, body, param):
    with pytest.raises(TokenizationRequestError) as e:
        tokenize_request(tok, body, 256)
    assert e.value.param == param and "\n" not in str(e.value)


def test_detokenize_round_trips_and_rejects_bad_ids(tok):
    ids = tokenize_request(tok, {"prompt": "Emoji 🌍 <|assistant_end|>"}, 256)["tokens"]
    assert detokenize_request(tok, {"tokens": ids}) == {"prompt": "<|bos|>Emoji 🌍 <|assistant_end|>"}
    for body in ({"tokens": [1, "2"]}, {"tokens": [True]}, {"tokens": [tok.get_vocab_size()]}, {"tokens": [-1]},
                 {"prompt": [1]}, [1]):
        with pytest.raises(TokenizationRequestError):
            detokenize_request(tok, body)
