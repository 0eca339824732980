"""Chat server (serve/app.py, serve/loadtest.py): API contract, limits, streaming, pool, disconnects.

The engine is a fake that streams a scripted token list (byte tokens, so multi-byte characters really arrive split)
through the engine's own `Request` (tests/fake_engine.py); the tokenizer is a real one trained in a fixture. Some
tests drive the real Engine over a tiny random model.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import pytest

from serving import FakeEngine, random_params, raw_status, serve_in_thread
from serve import app as serve_app
from serve.app import Defaults, create_app
from serve.loadtest import run_loadtest


@pytest.fixture(scope="module")
def tok():
    from jaxchat.tokenizer import Tokenizer

    texts = ["hello world, the quick brown fox jumps over the lazy dog. " * 20, "héllo wörld 世界 😀 " * 10]
    t = Tokenizer.train_from_iterator(texts, vocab_size=300)
    # the fake engines below emit raw byte tokens: ids 0..255 must be the bytes themselves
    assert all(t.id_to_bytes(i) == bytes([i]) for i in range(256))
    return t


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def make(tok, script=None, n=1, max_queue=4, wait_timeout=10.0, defaults=None, **kw):
    """The app over one FakeEngine of n slots."""
    eng = FakeEngine(tok, byte_ids("Hello there!") if script is None else script, max_batch=n, max_queue=max_queue,
                     **kw)
    defaults = defaults or Defaults(model="fake/d0")
    defaults.wait_timeout = wait_timeout
    return create_app(eng, tok, defaults), eng


def free(eng):
    return eng.max_batch - eng.busy_slots


def wait_for(cond, seconds=10.0):
    t0 = time.time()
    while not cond() and time.time() - t0 < seconds:
        time.sleep(0.01)
    return cond()


def render(tok, msgs):
    return tok.render_for_completion({"messages": msgs + [{"role": "assistant", "content": ""}]})


def parse_events(data: bytes) -> list[dict]:
    out = []
    for block in data.decode("utf-8").split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(json.loads(block[6:]))
    return out


def post(client, body, **kw):
    return client.post("/chat/completions", json=body, **kw)


def user(text="Hi"):
    return {"messages": [{"role": "user", "content": text}]}


def convo(n, length=1):
    return [{"role": ("user", "assistant")[i % 2], "content": "x" * length} for i in range(n)]


# ---------------------------------------------------------------------------------------------------------- streaming

def test_stream_tokens_and_prompt_rendering(tok):
    app, eng = make(tok)
    c = app.test_client()
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"},
            {"role": "user", "content": "the fox"}]
    r = post(c, {"messages": msgs})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    evs = parse_events(r.get_data())
    assert evs[-1] == {"done": True}
    assert "".join(e["token"] for e in evs[:-1]) == "Hello there!"
    assert all(e["gpu"] == 0 for e in evs[:-1]) and len(evs) - 1 == len("Hello there!")
    s = tok.encode_special
    expected = ([tok.get_bos_token_id(), s("<|user_start|>"), *tok.encode("hello"), s("<|user_end|>"),
                 s("<|assistant_start|>"), *tok.encode("hi!"), s("<|assistant_end|>"),
                 s("<|user_start|>"), *tok.encode("the fox"), s("<|user_end|>"), s("<|assistant_start|>")])
    assert eng.calls[0]["tokens"] == expected == render(tok, msgs)
    # defaults as nanochat's chat_web: temperature 0.8, top-k 50, 512 tokens
    assert (eng.calls[0]["temperature"], eng.calls[0]["top_k"], eng.calls[0]["max_tokens"]) == (0.8, 50, 512)
    assert wait_for(lambda: free(eng) == 1)


def test_request_sampling_params_reach_engine(tok):
    app, eng = make(tok)
    c = app.test_client()
    evs = parse_events(post(c, {**user(), "temperature": 0, "top_k": 0, "max_tokens": 5}).get_data())
    assert "".join(e.get("token", "") for e in evs) == "Hello"  # cut at max_tokens
    call = eng.calls[0]
    assert call["temperature"] == 0.0 and call["top_k"] is None and call["max_tokens"] == 5  # top_k 0 = all
    assert call["n"] == 1


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_generation_stops_at_assistant_end_or_bos(tok, stop):
    script = byte_ids("ok") + [tok.encode_special(stop)] + byte_ids("LEAKED")
    app, eng = make(tok, script=script)
    evs = parse_events(post(app.test_client(), user()).get_data())
    assert "".join(e.get("token", "") for e in evs) == "ok" and evs[-1] == {"done": True}
    assert wait_for(lambda: eng.closed == 1 and free(eng) == 1)


def test_multibyte_characters_arrive_whole(tok):
    text = "héllo 😀 世界 ok"
    app, _ = make(tok, script=byte_ids(text))
    evs = parse_events(post(app.test_client(), user()).get_data())
    pieces = [e["token"] for e in evs[:-1]]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "😀" in pieces and "世" in pieces and "é" in pieces  # each sent as one event once its bytes completed
    assert len(pieces) == len(text)


def test_unicode_in_request(tok):
    app, eng = make(tok)
    r = post(app.test_client(), user("Grüße 🌍 — 你好"))
    assert r.status_code == 200
    assert tok.decode(eng.calls[0]["tokens"]).count("Grüße 🌍 — 你好") == 1


def test_engine_failure_midstream_reports_error_and_frees_worker(tok):
    app, eng = make(tok, fail_at=3)
    c = app.test_client()
    evs = parse_events(post(c, user()).get_data())
    assert "".join(e.get("token", "") for e in evs) == "Hel"
    assert "error" in evs[-2] and evs[-1] == {"done": True}
    assert wait_for(lambda: free(eng) == 1)
    eng.fail_at = None
    assert post(c, user()).status_code == 200  # still serving


# ------------------------------------------------------------------------------------------------------------ limits

LIMIT_CASES = [
    # (body changes, ok?)
    ({"messages": convo(500)}, True),
    ({"messages": convo(501)}, False),
    ({"messages": [{"role": "user", "content": "é" * 8000}]}, True),  # characters, not bytes
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, False),
    ({"messages": convo(4, 8000)}, True),  # 32000 in total
    ({"messages": convo(4, 8000) + [{"role": "user", "content": "x"}]}, False),
    ({"temperature": 0}, True), ({"temperature": 2}, True), ({"temperature": 2.0001}, False),
    ({"temperature": -0.01}, False), ({"temperature": 1.5}, True),
    ({"top_k": 0}, True), ({"top_k": 200}, True), ({"top_k": 201}, False), ({"top_k": -1}, False),
    ({"max_tokens": 1}, True), ({"max_tokens": 4096}, True), ({"max_tokens": 0}, False),
    ({"max_tokens": 4097}, False),
    ({"temperature": None, "top_k": None, "max_tokens": None}, True),  # null = server default
]


@pytest.mark.parametrize("change,ok", LIMIT_CASES,
                         ids=[f"{'ok' if ok else 'bad'}-{i}" for i, (_, ok) in enumerate(LIMIT_CASES)])
def test_limits(tok, change, ok):
    app, eng = make(tok, script=byte_ids("ok"))
    r = post(app.test_client(), {**user(), **change})
    if ok:
        assert r.status_code == 200, r.get_json()
        assert parse_events(r.get_data())[-1] == {"done": True}
    else:
        assert r.status_code == 400
        assert isinstance(r.get_json()["error"], str) and r.get_json()["error"]
        assert eng.calls == []  # refused before reaching the engine
    assert wait_for(lambda: free(eng) == 1)


MALFORMED = [
    ("not json", "invalid json {"),
    ("list body", [1, 2]),
    ("string body", "hello"),
    ("no messages", {"temperature": 0.5}),
    ("messages not list", {"messages": "hi"}),
    ("empty messages", {"messages": []}),
    ("message not object", {"messages": ["hi"]}),
    ("content int", {"messages": [{"role": "user", "content": 5}]}),
    ("content null", {"messages": [{"role": "user", "content": None}]}),
    ("content parts list", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    ("content empty", {"messages": [{"role": "user", "content": ""}]}),
    ("no role", {"messages": [{"content": "hi"}]}),
    ("system role", {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}),
    ("tool role", {"messages": [{"role": "tool", "content": "hi"}]}),
    ("starts with assistant", {"messages": [{"role": "assistant", "content": "hi"}]}),
    ("two users", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
    ("two assistants", {"messages": convo(2) + [{"role": "assistant", "content": "b"}]}),
    ("temperature string", {**user(), "temperature": "0.5"}),
    ("temperature bool", {**user(), "temperature": True}),
    ("top_k float", {**user(), "top_k": 5.5}),
    ("max_tokens string", {**user(), "max_tokens": "10"}),
]


@pytest.mark.parametrize("name,body", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_get_400_json(tok, name, body):
    app, eng = make(tok)
    c = app.test_client()
    if isinstance(body, str) and name == "not json":
        r = c.post("/chat/completions", data=body, content_type="application/json")
    else:
        r = post(c, body)
    assert r.status_code == 400 and r.is_json and r.get_json()["error"]
    assert eng.calls == []
    assert post(c, user()).status_code == 200  # the server keeps serving


def test_wrong_content_type_nan_and_lone_surrogate(tok):
    app, eng = make(tok)
    c = app.test_client()
    r = c.post("/chat/completions", data=json.dumps(user()), content_type="text/plain")
    assert r.status_code == 400 and "Content-Type" in r.get_json()["error"]
    r = c.post("/chat/completions", data='{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
               content_type="application/json")
    assert r.status_code == 400 and "temperature" in r.get_json()["error"]
    r = c.post("/chat/completions", data='{"messages":[{"role":"user","content":"a\\ud800b"}]}',
               content_type="application/json")
    assert r.status_code == 400 and "Unicode" in r.get_json()["error"]
    r = c.post("/chat/completions", data=b"x" * (serve_app.MAX_BODY_BYTES + 1), content_type="application/json")
    assert r.status_code == 413 and r.is_json
    assert c.get("/chat/completions").status_code == 405
    assert c.get("/nope").get_json()["error"]
    assert eng.calls == []
    assert app.extensions["jaxchat_stats"].snapshot()["requests_invalid"] == 4  # the 413 counts too


def test_context_limit(tok):
    app, eng = make(tok, defaults=Defaults(max_context=40))
    c = app.test_client()
    assert post(c, user("x" * 100)).status_code == 400  # 100 byte-ish tokens > 40
    r = post(c, {**user("hello"), "max_tokens": 4096})
    assert r.status_code == 200
    prompt_len = len(eng.calls[0]["tokens"])
    assert eng.calls[0]["max_tokens"] == 40 - prompt_len  # cut to the room left


# ---------------------------------------------------------------------------------------------- slots, 503, disconnect

LONG = byte_ids("a long reply " * 50)  # with delay=0.01: a stream that holds its slot for seconds


def test_full_queue_answers_503_with_retry_after(tok):
    app, eng = make(tok, script=LONG, delay=0.01, n=1, max_queue=0)
    c = app.test_client()
    first = post(c, user(), buffered=False)  # holds the only slot until its stream ends or is closed
    assert first.status_code == 200 and free(eng) == 0
    busy = post(c, user())
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5" and "busy" in busy.get_json()["error"]
    assert c.get("/stats").get_json()["requests_rejected"] == 1
    first.close()  # the client goes away: the request is cancelled and its slot freed
    assert wait_for(lambda: free(eng) == 1) and post(c, user()).status_code == 200


def test_bounded_wait_queue(tok):
    app, eng = make(tok, script=LONG, delay=0.01, n=1, max_queue=1)
    c = app.test_client()
    first = post(c, user(), buffered=False)
    results = {}
    waiter = threading.Thread(target=lambda: results.setdefault("r", post(app.test_client(), user())))
    waiter.start()
    assert wait_for(lambda: eng.queued == 1)  # the second request waits in the engine's queue
    stats = c.get("/stats").get_json()
    assert (stats["queue"], stats["slots_busy"], stats["slots_free"], stats["max_queue"]) == (1, 1, 0, 1)
    assert post(c, user()).status_code == 503  # 1 running + 1 waiting = full
    first.close()
    waiter.join(30)
    assert results["r"].status_code == 200 and parse_events(results["r"].get_data())[-1] == {"done": True}
    assert wait_for(lambda: free(eng) == 1 and eng.queued == 0)


def test_wait_timeout_gives_503(tok):
    app, eng = make(tok, script=LONG, delay=0.01, n=1, max_queue=2, wait_timeout=0.2)
    c = app.test_client()
    first = post(c, user(), buffered=False)
    r = post(c, user())
    assert r.status_code == 503 and "Retry-After" in r.headers and "no slot" in r.get_json()["error"]
    first.close()
    assert wait_for(lambda: free(eng) == 1 and eng.queued == 0)  # the timed-out request left the queue


def test_closing_stream_midway_frees_slot(tok):
    app, eng = make(tok, script=LONG, delay=0.002)
    c = app.test_client()
    r = post(c, user(), buffered=False)
    it = iter(r.response)
    first = parse_events(next(it))
    assert first[0]["token"] == "a" and free(eng) == 0
    r.close()  # what the WSGI server does when the client goes away
    assert wait_for(lambda: free(eng) == 1 and eng.closed == 1)
    s = c.get("/stats").get_json()
    assert s["client_disconnects"] == 1 and s["requests_active"] == 0 and s["requests_served"] == 0


def test_unstarted_stream_closed_frees_slot(tok):
    from werkzeug.test import EnvironBuilder

    app, eng = make(tok, script=LONG, delay=0.01)
    environ = EnvironBuilder(method="POST", path="/chat/completions", json=user()).get_environ()
    app_iter = app(environ, lambda status, headers, exc_info=None: None)  # raw WSGI: nothing iterated yet
    assert free(eng) == 0 and len(eng.calls) == 1
    app_iter.close()  # an unstarted generator skips its finally: close() itself must cancel the request
    assert wait_for(lambda: free(eng) == 1)
    assert app.extensions["jaxchat_stats"].snapshot()["requests_active"] == 0


def test_socket_disconnect_frees_slot_on_real_server(tok):
    app, eng = make(tok, script=byte_ids("z" * 3000), delay=0.003)
    server, url = serve_in_thread(app)
    try:
        port = server.port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/chat/completions", body=json.dumps(user()), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        assert free(eng) == 0
        resp.close()  # the response owns the socket (the server sends Connection: close): this hangs up
        conn.close()
        assert wait_for(lambda: free(eng) == 1, 8), "slot not released after client disconnect"
        assert eng.closed == 1 and len(eng.calls) == 1
        # it stopped early: far fewer than 3000 tokens counted
        assert wait_for(lambda: json.loads(_get(port, "/stats"))["client_disconnects"] == 1)
        assert json.loads(_get(port, "/stats"))["tokens_generated"] < 3000
    finally:
        server.stop()


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


# ------------------------------------------------------------------------------------------------ pages and counters

def test_index_health_stats(tok):
    app, _ = make(tok, n=2, num_devices=2)
    c = app.test_client()
    page = c.get("/")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and page.mimetype == "text/html"
    for needle in ('id="input"', 'id="send"', 'id="newChat"', "prefers-color-scheme", 'role="log"',
                   "/chat/completions"):
        assert needle in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # nothing external
    h = c.get("/health").get_json()
    assert h == {"status": "ok", "ready": True, "model": "fake/d0", "replicas": 2, "available": 2}
    for _ in range(3):
        post(c, user()).get_data()
    s = c.get("/stats").get_json()
    assert s["requests_served"] == 3 and s["requests_active"] == 0
    assert s["tokens_generated"] == 3 * len("Hello there!") and s["tokens_per_sec"] > 0
    assert s["queue"] == 0 and s["replicas"] == 2 and s["slots"] == 2
    assert wait_for(lambda: c.get("/stats").get_json()["slots_free"] == 2)


def test_logging_truncates_and_omits_headers(tok, caplog):
    app, _ = make(tok)
    caplog.set_level(logging.INFO, logger="jaxchat.serve")
    body = user("START" + "x" * 1000 + "TAILMARK")
    r = post(app.test_client(), body, headers={"Authorization": "Bearer sekrit-token", "Cookie": "sid=cookie-val"})
    r.get_data()
    text = caplog.text
    assert "START" in text and "TAILMARK" not in text and "more chars" in text
    assert "Hello there!" in text  # the reply is logged too
    assert "sekrit" not in text and "cookie-val" not in text


# ---------------------------------------------------------------------------------------------- concurrency, load

def test_many_concurrent_clients_on_real_server(tok):
    app, eng = make(tok, n=4, max_queue=64, script=byte_ids("concurrent reply é😀"), delay=0.001)
    server, url = serve_in_thread(app)
    try:
        summary = run_loadtest(url, concurrency=32, num_requests=64, duration=60, max_tokens=32, timeout=30)
    finally:
        server.stop()
    assert summary["errors"] == 0 and summary["ok"] == 64 and summary["requests"] == 64, summary
    assert summary["status_counts"] == {"200": 64}
    assert summary["tokens"] == 64 * len("concurrent reply é😀")
    assert summary["ttft_p50_s"] is not None and summary["ttft_p95_s"] >= summary["ttft_p50_s"]
    # the fake engine sleeps 1 ms per token; events can reach a busy client together, so only the p95 must show it
    assert 0 <= summary["itl_p50_s"] <= summary["itl_p95_s"] and summary["itl_p95_s"] >= 0.001
    assert len(eng.calls) == 64 and eng.slots_used == {0, 1, 2, 3}  # spread over the slots
    assert wait_for(lambda: free(eng) == 4)


def test_loadtest_refuses_non_loopback():
    for url in ("http://example.com:8000", "https://127.0.0.1:8000", "http://10.0.0.1"):
        with pytest.raises(ValueError, match="loopback"):
            run_loadtest(url)


# ---------------------------------------------------------------------------------------------- CLI and replicas

def test_cli_defaults_match_nanochat():
    a = serve_app.build_parser().parse_args([])
    assert (a.source, a.temperature, a.top_k, a.max_tokens, a.port, a.host, a.num_devices) == \
        ("sft", 0.8, 50, 512, 8000, "127.0.0.1", 1)
    a = serve_app.build_parser().parse_args(["-i", "base", "-t", "0.5", "-k", "10", "-m", "64", "-p", "9000",
                                             "--model-tag", "d4", "--step", "7", "--num-devices", "2"])
    assert (a.source, a.temperature, a.top_k, a.max_tokens, a.port, a.model_tag, a.step, a.num_devices) == \
        ("base", 0.5, 10, 64, 9000, "d4", 7, 2)
    with pytest.raises(SystemExit):
        serve_app.build_parser().parse_args(["-i", "mid"])


def test_build_engine_splits_slots_over_devices(tok):
    import jax

    from jaxchat.model import GPTConfig, init_params

    n = min(2, len(jax.devices()))
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    engine = serve_app.build_engine(init_params(config, jax.random.PRNGKey(0)), config, tok, n, max_batch=2)
    assert (engine.max_batch, engine.num_devices) == (2 * n, n)
    assert [engine.device_of(s) for s in range(2 * n)] == [d for d in range(n) for _ in range(2)]
    assert all(leaf.sharding.device_set == set(jax.devices()[:n]) and leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(engine.params))
    with pytest.raises(ValueError, match="--num-devices"):
        serve_app.build_engine({}, config, tok, len(jax.devices()) + 1)


def test_main_rejects_out_of_range_defaults():
    for argv in (["-t", "2.5"], ["-k", "201"], ["-m", "0"]):
        with pytest.raises(SystemExit, match="must be in"):
            serve_app.main(argv)


def test_main_serves_a_real_checkpoint(tok, tmp_path, monkeypatch):
    """`python -m serve.app` end to end minus the socket: a tiny random checkpoint saved with jaxchat.checkpoint,
    loaded through load_model_from (its newest step damaged: the step loaded, not the newest, names the model), the
    real Engine with its slots on two devices, served by serve.wsgi with threads for every slot and queue place."""
    import jax

    from jaxchat.checkpoint import save_model
    from jaxchat.model import GPTConfig, init_params
    from serve import wsgi

    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    ckpt = tmp_path / "chatsft_checkpoints" / "d1"
    for step in (3, 5):
        save_model(str(ckpt), step, init_params(config, jax.random.PRNGKey(0)), config)
    meta = ckpt / "5" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:10])  # step 5 damaged: the server falls back to step 3
    served = {}
    monkeypatch.setattr(wsgi, "serve", lambda app, host, port, **kw: served.update(host=host, port=port, app=app,
                                                                                   **kw))
    n = min(2, len(jax.devices()))
    serve_app.main(["-i", "sft", "-p", "8123", "--num-devices", str(n), "-m", "8", "--max-batch", "2",
                    "--max-queue", "5", "--idle-timeout", "30"])
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert served["threads"] == 2 * n + 5 + serve_app.EXTRA_THREADS and served["channel_timeout"] == 30
    assert served["connection_limit"] == wsgi.CONNECTION_LIMIT and served["max_request_body_size"] == \
        serve_app.MAX_BODY_BYTES
    c = served["app"].test_client()
    assert c.get("/health").get_json() == {"status": "ok", "ready": True, "model": "sft/d1@3", "replicas": n,
                                           "available": 2 * n}  # two slots per device; step 3, not the damaged 5
    for _ in range(2):
        r = post(c, {**user("hello world"), "temperature": 0.0})
        assert r.status_code == 200
        evs = parse_events(r.get_data())
        assert evs[-1] == {"done": True} and not any("error" in e for e in evs), evs
        assert all(isinstance(e["token"], str) and e["token"] and e["gpu"] == 0 for e in evs[:-1])
    assert wait_for(lambda: c.get("/stats").get_json()["slots_free"] == 2 * n)
    stats = c.get("/stats").get_json()
    assert stats["requests_served"] == 2 and stats["tokens_generated"] <= 16
    assert (stats["slots"], stats["slots_free"], stats["slots_busy"], stats["queue"]) == (2 * n, 2 * n, 0, 0)
    # all slots at once: the requests' "gpu" is the device of their slot, each device holding two
    engine = served["app"].extensions["jaxchat_engine"]
    reqs = [engine.submit([1, 2, 3], max_tokens=8, temperature=0.0) for _ in range(2 * n)]
    assert all(r.admitted.wait(30) for r in reqs)
    assert [engine.device_of(s) for r in reqs for s in r.slots] == [d for d in range(n) for _ in range(2)]
    assert post(c, user("x" * 200)).status_code == 400  # longer than the model's 64-token context


# ------------------------------------------------------------------------------------- hardening (issue 17 section 3)

def test_deeply_nested_json_is_400_not_500(tok):
    app, eng = make(tok)
    c = app.test_client()
    for path in ("/chat/completions", "/v1/chat/completions"):
        r = c.post(path, data="[" * 100_000, content_type="application/json")
        assert r.status_code == 400, r.get_data()[:200]
        message = r.get_json()["error"] if path[1] == "c" else r.get_json()["error"]["message"]
        assert "nested too deeply" in message
    assert eng.calls == []


def test_huge_integer_max_tokens_is_400_with_reason(tok):
    app, eng = make(tok)
    c = app.test_client()
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}' % ("9" * 400)
    for path in ("/chat/completions", "/v1/chat/completions"):
        r = c.post(path, data=body, content_type="application/json")
        assert r.status_code == 400
        assert "max_tokens" in json.dumps(r.get_json())
    r = c.post("/chat/completions", data=body.replace("9" * 400, "-" + "9" * 400), content_type="application/json")
    assert r.status_code == 400
    assert eng.calls == []


def test_oversized_chunked_body_is_413_on_real_server(tok):
    app, eng = make(tok)
    server, _ = serve_in_thread(app)
    try:
        for path in ("/chat/completions", "/v1/chat/completions"):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            piece = b'{"messages": [{"role": "user", "content": "' + b"x" * 65536
            chunks = [piece] + [b"x" * 65536] * (serve_app.MAX_BODY_BYTES // 65536 + 2)
            conn.request("POST", path, body=iter(chunks), encode_chunked=True,
                         headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
            resp = conn.getresponse()
            assert resp.status == 413, (resp.status, resp.read()[:200])
            resp.read()
            conn.close()
        # a small chunked body is served as usual
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/chat/completions", body=iter([json.dumps(user()).encode()]), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 200 and parse_events(resp.read())[-1] == {"done": True}
        conn.close()
    finally:
        server.stop()
    assert len(eng.calls) == 1


def test_user_content_cannot_forge_log_lines(tok, caplog):
    app, _ = make(tok)
    caplog.set_level(logging.INFO, logger="jaxchat.serve")
    forged = "hi\n2026-12-01 12:00:00 INFO jaxchat.serve: [deadbeef] [ADMIN] forged\r\u2028\x1b[31m\\n"
    post(app.test_client(), user(forged)).get_data()
    msgs = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m and "\r" not in m and "\u2028" not in m and "\x1b" not in m for m in msgs)
    line = next(m for m in msgs if "[USER]" in m)
    assert line.endswith("[USER] hi\\n2026-12-01 12:00:00 INFO jaxchat.serve: [deadbeef] [ADMIN] forged\\r\\u2028"
                         "\\u001b[31m\\\\n")


def test_main_runs_under_run_cli():
    src = open(serve_app.__file__, encoding="utf-8").read()
    assert src.rstrip().endswith("run_cli(main)")


# ------------------------------------------------------------------------------------------ OpenAI-compatible API

def test_openai_system_message_rendered_as_nanochat(tok):
    app, eng = make(tok)
    c = app.test_client()
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "the fox"}]
    r = c.post("/v1/chat/completions", json={"model": "fake/d0", "messages": msgs})
    assert r.status_code == 200
    want = tok.render_for_completion({"messages": msgs + [{"role": "assistant", "content": ""}]})
    merged = [{"role": "user", "content": "You are terse.\n\nhello"}] + msgs[2:]
    assert eng.calls[0]["tokens"] == render(tok, merged) == want
    out = r.get_json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "fake/d0"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                               "logprobs": None, "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": len(want), "completion_tokens": 12, "total_tokens": len(want) + 12}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_stop_strings_and_finish_reasons(tok, stream):
    script = byte_ids("Hello there! General") + [tok.encode_special("<|assistant_end|>")]
    app, eng = make(tok, script=script)
    c = app.test_client()

    def ask(**kw):
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": stream,
                                                  **kw})
        assert r.status_code == 200
        if not stream:
            ch = r.get_json()["choices"][0]
            return ch["message"]["content"], ch["finish_reason"]
        events = r.get_data(as_text=True).split("\n\n")
        assert events[-2] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-2]]
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        reasons = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"][0]["finish_reason"]]
        assert len(reasons) == 1
        return text, reasons[0]

    assert ask() == ("Hello there! General", "stop")  # <|assistant_end|>
    assert ask(stop="there") == ("Hello ", "stop")
    assert ask(stop=["zzz", "! G"]) == ("Hello there", "stop")  # a stop string over several tokens
    assert ask(stop=["Generalissimo"]) == ("Hello there! General", "stop")  # a held-back prefix is flushed
    assert ask(max_tokens=5) == ("Hello", "length")


OPENAI_BAD = [
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"),
    ({"n": 9}, "n"), ({"seed": "x"}, "seed"), ({"stop": ["a"] * 5}, "stop"), ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"), ({"max_completion_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "system", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
]


@pytest.mark.parametrize("change,param", OPENAI_BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(OPENAI_BAD)])
def test_openai_errors_have_openai_shape(tok, change, param):
    app, eng = make(tok)
    r = app.test_client().post("/v1/chat/completions", json={**user(), **change})
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]
    assert eng.calls == [] and free(eng) == 1


def test_openai_not_found_busy_and_models(tok):
    app, eng = make(tok, script=LONG, delay=0.01, n=1, max_queue=0)
    c = app.test_client()
    r = c.get("/v1/nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    assert c.get("/v1/models").get_json() == {"object": "list", "data": [
        {"id": "fake/d0", "object": "model", "created": int(app.extensions["jaxchat_stats"].started),
         "owned_by": "jaxchat"}]}
    assert c.get("/v1/models/other").status_code == 404
    first = c.post("/v1/chat/completions", json={**user(), "stream": True}, buffered=False)
    busy = c.post("/v1/chat/completions", json=user())
    assert busy.status_code == 503 and busy.get_json()["error"]["type"] == "server_error"
    assert busy.headers["Retry-After"] == "5"
    first.close()
    assert wait_for(lambda: free(eng) == 1)


def _tiny_real_app(tok, max_batch, max_queue=16):
    """serve.app over a real Engine: a 1-layer random model on the fixture's tokenizer (`random_params`)."""
    from jaxchat.model import GPTConfig

    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    engine = serve_app.build_engine(random_params(config), config, tok, 1, max_batch=max_batch, decode_chunk=8,
                                    max_queue=max_queue)
    return create_app(engine, tok, Defaults(model="tiny/d1", max_context=128)), engine


def test_real_engine_queue_bound_gives_503_with_retry_after(tok):
    """The engine's queue is the server's only one: its bound answers 503 + Retry-After, for both APIs."""
    app, engine = _tiny_real_app(tok, max_batch=1, max_queue=1)
    c = app.test_client()
    running = engine.submit([1, 2, 3], max_tokens=120, temperature=0.0)  # holds the only slot
    waiting = engine.submit([1, 2, 3], max_tokens=120, temperature=0.0)  # and the one place in the queue
    for path in ("/chat/completions", "/v1/chat/completions"):
        r = c.post(path, json=user())
        assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.get_data()
        assert "max_queue=1" in json.dumps(r.get_json())
    assert c.get("/stats").get_json()["requests_rejected"] == 2
    running.cancel()
    waiting.cancel()
    assert wait_for(lambda: engine.busy_slots == 0 and engine.queued == 0)
    r = post(c, {**user("hello"), "temperature": 0.0, "max_tokens": 4})
    assert r.status_code == 200 and parse_events(r.get_data())[-1] == {"done": True}
    engine.close()


def test_official_openai_client_against_live_server(tok):
    openai = pytest.importorskip("openai", reason="pip install openai (a dev dependency)")
    app, engine = _tiny_real_app(tok, max_batch=4)
    server, url = serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["tiny/d1"]
        msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello world"}]
        kw = dict(model="tiny/d1", messages=msgs, temperature=0, max_tokens=12)
        full = client.chat.completions.create(**kw)
        assert full.object == "chat.completion" and full.model == "tiny/d1" and full.id.startswith("chatcmpl-")
        (choice,) = full.choices
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        merged = [{"role": "user", "content": "Answer briefly.\n\nhello world"}]
        assert full.usage.prompt_tokens == len(render(tok, merged))
        assert 0 <= full.usage.completion_tokens <= 12
        assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == choice.message.content  # streamed == non-streamed at temperature 0
        reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert reasons == [choice.finish_reason]
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

        many = client.chat.completions.create(**kw, n=3)  # three slots, greedy: three equal choices
        assert [c.index for c in many.choices] == [0, 1, 2]
        assert all(c.message.content == choice.message.content for c in many.choices)
        sampled = client.chat.completions.create(model="tiny/d1", messages=msgs, temperature=1.5, n=2, seed=3,
                                                 max_tokens=12, stream=True)
        per_choice = {}
        for ch in sampled:
            for c in ch.choices:
                per_choice.setdefault(c.index, []).append(c.delta.content or "")
        assert set(per_choice) == {0, 1}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny/d1", messages=msgs, temperature=5)
        assert e.value.status_code == 400 and "temperature" in str(e.value)
        for _ in range(200):  # the last stream's server side ends just after the client read [DONE]
            stats = json.loads(_get(server.port, "/stats"))
            if stats["requests_served"] == 4:
                break
            time.sleep(0.02)
        assert stats["slots"] == 4 and stats["slots_free"] == 4 and stats["requests_served"] == 4, stats
        assert stats["tokens_per_sec_recent"] >= 0
    finally:
        server.stop()


# ------------------------------------------------------------------------ the production WSGI server (issue 23 §4)

def test_first_event_arrives_while_the_reply_is_still_decoded(tok):
    """On serve.wsgi (waitress, as `python -m serve.app` runs): each API's first event reaches the client while the
    engine is still producing the reply (its slot busy), and the response names no development server."""
    app, eng = make(tok, script=byte_ids("y" * 40), delay=0.03)
    server, _ = serve_in_thread(app)
    try:
        for path, body in (("/chat/completions", user()), ("/v1/chat/completions", {**user(), "stream": True})):
            closed = eng.closed
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Server") == "jaxchat"
            assert resp.readline().startswith(b"data: ")
            assert free(eng) == 0 and eng.closed == closed  # 40 tokens at 30 ms: ~1.2 s still to go
            rest = resp.read()
            assert rest.endswith(b"data: {\"done\": true}\n\n" if path[1] == "c" else b"data: [DONE]\n\n")
            conn.close()
            assert wait_for(lambda: eng.closed == closed + 1)
    finally:
        server.stop()


CHUNKED_HEAD = "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("body, half_close", [(b"zz\r\n{}\r\n0\r\n\r\n", False),  # not a chunk size
                                              (b"40\r\n{\"messages\": [", True),  # truncated, client closes
                                              (b"40\r\n{\"messages\": [", False)])  # truncated, client goes idle
def test_malformed_or_truncated_chunked_bodies_are_400_on_the_real_app(tok, body, half_close):
    app, eng = make(tok)
    server, _ = serve_in_thread(app, channel_timeout=1)
    try:
        for path in ("/chat/completions", "/v1/chat/completions"):
            status, data = raw_status(server.port, CHUNKED_HEAD.format(path).encode() + body, half_close=half_close)
            assert status == 400, data
        assert eng.calls == []
        r = json.loads(_get(server.port, "/stats"))  # the server serves on
        assert r["requests_served"] == 0 and r["requests_active"] == 0
    finally:
        server.stop()


def test_idle_and_slowloris_connections_do_not_stop_a_chat(tok):
    """100 idle and 100 slowloris connections (headers trickling in) to the real app on 4 threads: a chat request is
    still answered at once."""
    import socket

    app, _ = make(tok)
    server, _ = serve_in_thread(app, threads=4)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(100)]
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(100)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")
        t0 = time.monotonic()
        for s in slow:
            s.sendall(b"X-Slower: 1\r\n")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(user()),
                      headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["message"]["content"] == "Hello there!"
        assert time.monotonic() - t0 < 5
        conn.close()
    finally:
        for s in idle + slow:
            s.close()
        server.stop()


def test_sigterm_ends_the_stream_cleanly_and_the_server_exits(tok, tmp_path):
    """The real `python -m serve.app` on a tiny checkpoint (lm_head zero: greedy token 0 forever, a long reply):
    SIGTERM during a stream ends it cleanly after its current chunk (chunked terminator, no done event), and the
    process exits 0; waitress serves (Server: jaxchat), no development-server warning."""
    import os
    import signal
    import subprocess
    import sys

    import jax
    import jax.numpy as jnp

    from jaxchat.checkpoint import save_model
    from jaxchat.model import GPTConfig, init_params

    tok.save(str(tmp_path / "tokenizer"))
    config = GPTConfig(sequence_len=512, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    params = init_params(config, jax.random.PRNGKey(0))
    params["lm_head"] = jnp.zeros_like(params["lm_head"])
    save_model(str(tmp_path / "chatsft_checkpoints" / "d1"), 1, params, config)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path), JAXCHAT_NO_REEXEC="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-m", "serve.app", "-i", "sft", "-p", "0", "--max-batch", "2",
                              "--decode-chunk", "4", "-m", "4096"], env=env, cwd=root, stderr=subprocess.PIPE,
                             text=True)
    log = []
    try:
        port = None
        while port is None:
            line = child.stderr.readline()
            assert line, "".join(log)
            log.append(line)
            if "serving on http://" in line:
                port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/chat/completions", body=json.dumps({**user(), "temperature": 0.0}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Server") == "jaxchat"
        assert resp.readline() == b'data: {"token": "\\u0000", "gpu": 0}\n'
        child.send_signal(signal.SIGTERM)
        rest = resp.read()  # ends with the chunked terminator: a clean end, no IncompleteRead
        assert b'"done"' not in rest and rest.count(b"data: ") < 400  # cut short of the ~500-token reply
        assert child.wait(60) == 0
        log.append(child.stderr.read())
        text = "".join(log)
        assert "SIGTERM: stopping" in text and "stopped" in text.splitlines()[-1], text[-3000:]
        assert "development server" not in text and "Traceback" not in text, text[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
