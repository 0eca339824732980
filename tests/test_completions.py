"""/v1/completions (OpenAI's Completions API as vLLM serves it), chat logprobs and vLLM's tokenizer endpoints, over
the real Engine of a tiny random model: logprobs against a direct float32 log_softmax of the model's logits, the BOS
rule, echo alignment, streaming, and 400s with their reasons."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving import random_params
from tolerances import gpt_reduction_len, tol

from jaxchat.chat_template import CHAT_TEMPLATE
from jaxchat.model import SOFTCAP, GPTConfig, forward
from serve.app import Defaults, build_engine, create_app

CONTEXT = 64
_forward = jax.jit(forward, static_argnums=1)


@pytest.fixture(scope="module")
def setup():
    from jaxchat.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. " * 20,
                                         "héllo wörld 世界 😀 " * 10], vocab_size=300)
    config = GPTConfig(sequence_len=CONTEXT, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    params = random_params(config)
    engine = build_engine(params, config, tok, 1, max_batch=2, decode_chunk=4, max_queue=2)
    app = create_app(engine, tok, Defaults(model="tiny/d1", max_context=CONTEXT, eos_token="<|bos|>"))
    yield {"tok": tok, "config": config, "params": params, "engine": engine, "client": app.test_client(), "app": app}
    engine.close()


def _logprobs(setup, ids):
    """float32 log_softmax of the logits of `ids` alone (T, V), and the tolerance of one logprob (as
    tests/test_scoring.py: each logit off by tol(f32, reduction, SOFTCAP), the logsumexp by that and its own sum)."""
    config = setup["config"]
    lp = np.asarray(jax.nn.log_softmax(_forward(setup["params"], config, jnp.asarray([ids], jnp.int32))[0], axis=-1))
    return lp, 2 * tol(jnp.float32, gpt_reduction_len(config, CONTEXT), SOFTCAP) + tol(
        jnp.float32, config.vocab_size, float(np.max(np.abs(lp))))


def _complete(setup, **body):
    r = setup["client"].post("/v1/completions", json={"model": "tiny/d1", **body})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_echo_scores_the_prompt_as_sent_after_the_bos_the_server_puts_first(setup):
    """lm-eval's loglikelihood request: ids without <|bos|>, echo, logprobs 1, max_tokens 1. One entry per prompt
    token (the first null) plus the generated one; each the model's logprob given <|bos|> and the tokens before."""
    tok = setup["tok"]
    bos = tok.get_bos_token_id()
    prompts = [tok.encode("the quick brown fox"), tok.encode("hello world")]
    out = _complete(setup, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1]
    generated = sum(c["finish_reason"] == "length" for c in out["choices"])  # a stop token is no completion token
    assert out["usage"] == {"prompt_tokens": sum(len(p) + 1 for p in prompts), "completion_tokens": generated,
                            "total_tokens": sum(len(p) + 1 for p in prompts) + generated}
    for ids, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        ref, atol = _logprobs(setup, [bos] + ids)
        (alone,) = setup["engine"].submit([bos] + ids, max_tokens=1, temperature=0.0)
        generated = alone.token
        assert generated == int(np.argmax(ref[-1]))  # greedy: the argmax after the prompt
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["tokens"] == [tok.id_to_token(t) for t in ids + [generated]]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [ref[t, ids[t]] for t in range(1, len(ids))] + [ref[-1, generated]]  # row t: after bos + ids[:t]
        np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=atol, rtol=0)
        for t in range(1, len(ids) + 1):
            top = lp["top_logprobs"][t]
            best = int(np.argmax(ref[t]))
            chosen = lp["tokens"][t]
            assert set(top) == {tok.id_to_token(best), chosen}  # the top 1 and the chosen token (vLLM's shape)
            assert (lp["token_logprobs"][t] == max(top.values())) == (chosen == tok.id_to_token(best))  # is_greedy
        assert choice["text"] == tok.decode(ids) + alone.text
        assert lp["text_offset"] == [len(tok.decode(ids[:t])) for t in range(len(ids) + 1)]  # ASCII text
        assert choice["finish_reason"] in ("length", "stop")
    # the same prompts as text, and with <|bos|> sent by the client, give the same numbers
    as_text = _complete(setup, prompt=[tok.decode(p) for p in prompts], echo=True, logprobs=1, max_tokens=1,
                        temperature=0)
    with_bos = _complete(setup, prompt=[[bos] + p for p in prompts], echo=True, logprobs=1, max_tokens=1,
                         temperature=0)
    for a, b, c in zip(out["choices"], as_text["choices"], with_bos["choices"]):
        assert a["logprobs"]["token_logprobs"] == b["logprobs"]["token_logprobs"]
        assert a["logprobs"]["token_logprobs"][1:] == c["logprobs"]["token_logprobs"][2:]  # c echoes <|bos|> too
        assert c["logprobs"]["tokens"][0] == "<|bos|>" and c["text"].startswith("<|bos|>")


def test_add_special_tokens_false_scores_without_bos_and_max_tokens_0_only_scores(setup):
    tok, engine = setup["tok"], setup["engine"]
    ids = tok.encode("lazy dog jumps")
    out = _complete(setup, prompt=ids, echo=True, logprobs=3, max_tokens=0, add_special_tokens=False)
    (choice,) = out["choices"]
    ref, atol = _logprobs(setup, ids)
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], [ref[t - 1, ids[t]] for t in
                                                                         range(1, len(ids))], atol=atol, rtol=0)
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["finish_reason"] == "length"
    for t, top in enumerate(choice["logprobs"]["top_logprobs"][1:], 1):  # the top 3 and the chosen token; pieces of
        assert tok.id_to_token(ids[t]) in top and len(top) <= 4  # characters share the text U+FFFD: one key
    assert choice["text"] == tok.decode(ids) and out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert engine.busy_slots == 0 and engine.queued == 0
    plain = _complete(setup, prompt="lazy dog", max_tokens=0)  # no echo, nothing generated
    assert plain["choices"][0]["text"] == "" and plain["choices"][0]["logprobs"] is None


def test_generation_is_the_engines_with_n_and_stop_and_stream_equals_non_stream(setup):
    tok, engine = setup["tok"], setup["engine"]
    bos = tok.get_bos_token_id()
    prompts = ["the quick", "hello"]
    body = dict(prompt=prompts, max_tokens=12, temperature=0, n=2, logprobs=2)
    out = _complete(setup, **body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]  # prompt i's sample j is choice 2 i + j
    for i, text in enumerate(prompts):
        want = [o for o in engine.submit([bos] + tok.encode(text), max_tokens=12, temperature=0.0, logprobs=2)]
        for choice in out["choices"][2 * i:2 * i + 2]:
            assert choice["text"] == "".join(o.text for o in want)  # greedy: both samples the engine's text
            assert choice["logprobs"]["tokens"] == [tok.id_to_token(o.token) for o in want]
            assert choice["logprobs"]["token_logprobs"] == [o.logprobs[0] for o in want]
    # a stop token (the only way to "stop" here) has a logprob but is no completion token
    assert out["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) - (c["finish_reason"] == "stop")
                                                    for c in out["choices"])
    r = setup["client"].post("/v1/completions", json={**body, "stream": True, "echo": True,
                                                      "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    blocks = [b[6:] for b in r.get_data(as_text=True).split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    events = [json.loads(b) for b in blocks[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == out["usage"]
    texts, tokens, reasons = {}, {}, {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"])
        reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    for k, choice in enumerate(out["choices"]):
        text = prompts[k // 2]
        assert texts[k] == text + choice["text"] and reasons[k] == choice["finish_reason"]
        assert tokens[k] == [tok.id_to_token(t) for t in tok.encode(text)] + choice["logprobs"]["tokens"]
    full = out["choices"][0]["text"]
    stop = full[3:5]
    assert len(stop) == 2
    stopped = _complete(setup, prompt=prompts[0], max_tokens=12, temperature=0, stop=["never", stop])
    assert stopped["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None,
                                     "finish_reason": "stop"}


def test_chat_logprobs_have_openais_shape(setup):
    tok, client = setup["tok"], setup["client"]
    body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    out = client.post("/v1/chat/completions", json=body).get_json()
    (choice,) = out["choices"]
    content = choice["logprobs"]["content"]
    prompt = tok.render_for_completion({"messages": body["messages"] + [{"role": "assistant", "content": ""}]})
    ids = prompt + [tok.encode_special(e["token"]) if e["token"].startswith("<|") else
                    _id_of(tok, bytes(e["bytes"])) for e in content]
    ref, atol = _logprobs(setup, ids[:-1])
    for t, e in enumerate(content):
        row = ref[len(prompt) - 1 + t]
        assert abs(e["logprob"] - row[ids[len(prompt) + t]]) <= atol
        assert [x["token"] for x in e["top_logprobs"]] == [tok.id_to_token(i) for i in np.argsort(-row)[:2]]
        assert all(set(x) == {"token", "logprob", "bytes"} for x in e["top_logprobs"])
    text_bytes = b"".join(bytes(e["bytes"]) for e in content if not e["token"].startswith("<|"))
    # the bytes rebuild the reply (whose text drops an unfinished character at its end)
    assert text_bytes.decode("utf-8", "replace").rstrip("\ufffd") == choice["message"]["content"].rstrip("\ufffd")
    stream = client.post("/v1/chat/completions", json={**body, "stream": True}).get_data(as_text=True)
    streamed = [e for b in stream.split("\n\n") if b and b != "data: [DONE]"
                for c in json.loads(b[6:])["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert streamed == content
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": None, "top_logprobs": None}).get_json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == choice["message"]
    bad = client.post("/v1/chat/completions", json={**body, "logprobs": False})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "top_logprobs"


def _id_of(tok, raw: bytes) -> int:
    return next(i for i in range(tok.get_vocab_size()) if tok.id_to_bytes(i) == raw)


@pytest.mark.parametrize("change, param, needle", [
    ({"prompt": None}, "prompt", "prompt must be"),
    ({"prompt": ["a", [1, 2]]}, "prompt", "prompt must be"),
    ({"prompt": [[1, True]]}, "prompt", "prompt must be"),
    ({"prompt": [[1, 10_000]]}, "prompt", "outside"),
    ({"prompt": [], "add_special_tokens": False}, "prompt", "prompt must be"),
    ({"prompt": "", "add_special_tokens": False}, "prompt", "empty"),
    ({"prompt": ["x"] * 300}, "prompt", "at most 256"),
    ({"prompt": "x " * 80}, "prompt", "with the <|bos|> the server puts first; the model's context is 64"),
    ({"prompt": [1] * 64, "add_special_tokens": False}, "prompt", "needs room for one more"),
    ({"prompt": ["x"] * 3, "n": 2}, "prompt", "2 slots and 2 queue places"),
    ({"logprobs": 21}, "logprobs", "between"),
    ({"logprobs": True}, "logprobs", "integer"),
    ({"max_tokens": -1}, "max_tokens", "between"),
    ({"echo": "yes"}, "echo", "boolean"),
    ({"add_special_tokens": 1}, "add_special_tokens", "boolean"),
    ({"temperature": 3}, "temperature", "between"),
    ({"stop": [""]}, "stop", "stop must be"),
])
def test_bad_completion_requests_are_400_with_the_field(setup, change, param, needle):
    body = {"prompt": "hello", "max_tokens": 2, **change}
    r = setup["client"].post("/v1/completions", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.get_data()
    err = r.get_json()["error"]
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error"


def test_a_prompt_filling_the_context_is_scored_with_max_tokens_0(setup):
    tok = setup["tok"]
    ids = (tok.encode("the quick brown fox jumps over the lazy dog ") * 8)[:CONTEXT - 1]
    out = _complete(setup, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == CONTEXT - 1  # with <|bos|>: the whole context
    assert all(len(top) == 1 for top in out["choices"][0]["logprobs"]["top_logprobs"][1:])  # logprobs 0: the chosen


def test_tokenizer_endpoints_are_vllms(setup):
    tok, client = setup["tok"], setup["client"]
    info = client.get("/tokenizer_info").get_json()
    assert info["eos_token"] == "<|bos|>" and info["bos_token"] == "<|bos|>" and info["model_max_length"] == CONTEXT
    assert info["chat_template"] == CHAT_TEMPLATE
    bos = tok.get_bos_token_id()
    r = client.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).get_json()
    assert r == {"tokens": tok.encode("hello world"), "count": len(tok.encode("hello world")), "max_model_len": CONTEXT}
    assert client.post("/tokenize", json={"prompt": "<|bos|>"}).get_json()["tokens"] == [bos, bos]
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": msgs}).get_json()["tokens"]
    assert chat == tok.render_for_completion({"messages": msgs + [{"role": "assistant", "content": ""}]})
    assert client.post("/detokenize", json={"tokens": chat}).get_json()["prompt"] == tok.decode(chat)
    for path, body, needle in (("/tokenize", {"prompt": 5}, "give either prompt"),
                               ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "boolean"),
                               ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
                               ("/detokenize", {"tokens": [1, -1]}, "outside the vocabulary"),
                               ("/detokenize", {"tokens": "abc"}, "list of integer")):
        r = client.post(path, json=body)
        assert r.status_code == 400 and needle in r.get_json()["error"]["message"], (path, body, r.get_json())
    r = client.post("/tokenize", data="{", content_type="application/json")
    assert r.status_code == 400 and "not valid JSON" in r.get_json()["error"]["message"]
