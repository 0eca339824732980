"""CORE metric: prompt rendering, answer spans, batched scoring with scripted models, centering, the bundle download.

The scripted models are bigram tables over a byte tokenizer (token = byte, BOS = 256), so every expected choice and
loss below is worked out by hand from the fixture items in tests/fixtures/evals/eval_bundle.
"""

import http.server
import math
import os
import shutil
import threading
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from evals import core

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "evals", "eval_bundle")
V = 257
BOS = 256
L = 5.0  # the scripted models' preferred-token logit


class ByteTokenizer:
    """One token per UTF-8 byte, BOS = 256: token spans can be read straight off the strings."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))


def bigram_forward(table):
    table = jnp.asarray(table, jnp.float32)
    return lambda idx: table[idx]


def x_lover_table():
    """Prefers 'x' after every token, except after 'o' where it prefers ' '."""
    t = np.zeros((V, V), np.float32)
    t[:, ord("x")] = L
    t[ord("o")] = 0.0
    t[ord("o"), ord(" ")] = L
    return t


HIT = math.log(math.exp(L) + V - 1) - L   # loss of the preferred token
MISS = math.log(math.exp(L) + V - 1)      # loss of any other token under a row with a preference


# ------------------------------------------------------------------------------------------------ rendering

def test_render_mc_matches_dclm_format():
    fewshot = [{"query": "Sky is", "choices": ["green", "blue"], "gold": 1},
               {"query": "Grass is", "choices": ["green", "red"], "gold": 0}]
    item = {"query": "Snow is", "choices": ["white", "black"], "gold": 0}
    assert core.render_prompts_mc(item, " ", fewshot) == [
        "Sky is blue\n\nGrass is green\n\nSnow is white",
        "Sky is blue\n\nGrass is green\n\nSnow is black",
    ]
    assert core.render_prompts_mc(item, ": ") == ["Snow is: white", "Snow is: black"]


def test_render_schema_matches_dclm_format():
    fewshot = [{"context_options": ["Tom ate", "The cake ate"], "continuation": "it.", "gold": 0}]
    item = {"context_options": ["Ann called Bob", "The phone called Bob"], "continuation": "later.", "gold": 0}
    assert core.render_prompts_schema(item, " ", fewshot) == [
        "Tom ate it.\n\nAnn called Bob later.",
        "Tom ate it.\n\nThe phone called Bob later.",
    ]


def test_render_lm_trims_contexts_and_strips_prefix():
    fewshot = [{"context": "  One two  ", "continuation": "three"}]
    item = {"context": "Four five ", "continuation": "six"}
    without, with_ = core.render_prompts_lm(item, " ", fewshot)
    assert with_ == "One two three\n\nFour five six"
    assert without == "One two three\n\nFour five"
    assert core.render_prompts_lm({"context": " a ", "continuation": "b"}, "") == ["a", "ab"]


def test_fewshot_sampling_is_nanochats():
    data = [{"i": i} for i in range(10)]
    # random.Random(1234 + index).sample(all indices but index, k), the same draw nanochat makes
    assert [d["i"] for d in core.sample_fewshot(data, 3, 3)] == [2, 7, 9]
    assert [d["i"] for d in core.sample_fewshot(data, 0, 2)] == [8, 2]
    assert all(d["i"] != 5 for d in core.sample_fewshot(data, 5, 9))
    assert core.sample_fewshot(data, 3, 0) == []


def test_example_rows_spans():
    tok = ByteTokenizer()
    mc = {"task_type": "multiple_choice", "continuation_delimiter": " "}
    rows, s, e = core.example_rows({"query": "Q3:", "choices": ["xq", "xx"], "gold": 0}, mc, [], tok)
    assert rows[0] == [BOS] + list(b"Q3: xq")
    assert s == [6, 6] and e == [7, 7]  # the shared 'x' is context, only the last byte is scored
    schema = {"task_type": "schema", "continuation_delimiter": " "}
    rows, s, e = core.example_rows({"context_options": ["go", "gab"], "continuation": "ran", "gold": 0},
                                   schema, [], tok)
    assert (s, e) == ([3, 4], [7, 8])  # common suffix " ran"
    lm = {"task_type": "language_modeling", "continuation_delimiter": " "}
    rows, s, e = core.example_rows({"context": "hello  ", "continuation": "xxx"}, lm, [], tok)
    assert rows == [[BOS] + list(b"hello xxx")] and (s, e) == ([6], [10])
    with pytest.raises(ValueError, match="task type"):
        core.example_rows({}, {"task_type": "cloze", "continuation_delimiter": " "}, [], tok)


# -------------------------------------------------------------------------------------------------- scoring

def test_scorer_mean_losses_by_hand():
    scorer = core.CoreScorer(bigram_forward(x_lover_table()), pad_id=BOS, min_len=8)
    tok = ByteTokenizer()
    rows = tok.encode(["Q1: ab", "Q1: xx", "Q1: xa", "hello xxx", "hello xxy"], prepend=BOS)
    starts, ends = [5, 5, 5, 6, 6], [7, 7, 7, 10, 10]
    loss, hit = scorer.score_rows(rows, starts, ends)
    from tolerances import tol  # 2 eps sqrt(n) |loss|: a log-sum-exp over V, a mean over <= 4 span tokens

    np.testing.assert_allclose(loss, [MISS, HIT, (HIT + MISS) / 2, HIT, (3 * HIT + MISS) / 4],
                               rtol=tol(np.float32, V + 4, 1))
    assert hit.tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="span"):
        scorer.score_rows([[BOS, 1, 2]], [0], [2])


def test_scorer_crops_long_rows_from_the_left():
    scorer = core.CoreScorer(bigram_forward(x_lover_table()), pad_id=BOS, min_len=4, max_seq_len=8)
    row = [BOS] + list(b"abcdefghij xx")  # 14 tokens, the last 8 kept; the span keeps pointing at "xx"
    loss, hit = scorer.score_rows([row], [12], [14])
    from tolerances import tol  # as in test_scorer_mean_losses_by_hand

    np.testing.assert_allclose(loss, [HIT], rtol=tol(np.float32, V + 4, 1))
    assert hit.tolist() == [True]


def _evaluate(forward_fn, tasks=None):
    scorer = core.CoreScorer(forward_fn, pad_id=BOS, min_len=16)
    return core.evaluate_core(scorer, ByteTokenizer(), bundle_dir=FIXTURE, tasks=tasks)


def test_core_fixture_hand_computed():
    out = _evaluate(bigram_forward(x_lover_table()))
    # tiny_mc: Q1 right, Q2 wrong (picks "xb"), Q3 wrong (shared 'x' leaves "q" vs "x"), Q4 right
    # tiny_schema: "go ran" wins via o->' ' (right); "zo zz" beats "za zz" (wrong)
    # tiny_lm: "hello xxx" and "foo xx" reproduced greedily; "xxy" and "bar xx" not
    assert out["results"] == {"tiny_mc": 0.5, "tiny_mc_balanced": 1.0, "tiny_schema": 0.5, "tiny_lm": 0.5}
    expected_centered = {"tiny_mc": 1 / 3, "tiny_mc_balanced": 1.0, "tiny_schema": 0.0, "tiny_lm": 0.5}
    for k, v in expected_centered.items():
        assert out["centered_results"][k] == pytest.approx(v)
    assert out["core_metric"] == pytest.approx((1 / 3 + 1 + 0 + 0.5) / 4)


def test_uniform_model_gets_random_baseline():
    out = _evaluate(lambda idx: jnp.zeros(idx.shape + (V,)), tasks=["tiny_mc_balanced"])
    # every choice ties, the first wins: right on the 2 of 8 items whose gold is 0 = the 25% baseline
    assert out["results"]["tiny_mc_balanced"] == 0.25
    assert out["centered_results"]["tiny_mc_balanced"] == pytest.approx(0.0)


def test_centered_accuracy_and_config():
    assert core.centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert core.centered_accuracy(0.0, 0) == 0.0
    tasks, baselines = core.load_core_config(FIXTURE)
    assert [t["label"] for t in tasks] == ["tiny_mc", "tiny_mc_balanced", "tiny_schema", "tiny_lm"]
    assert tasks[0]["continuation_delimiter"] == " " and tasks[3]["num_fewshot"] == 0
    assert baselines["tiny_schema"] == 50.0


def test_core_with_real_model_matches_unbatched_forward():
    """Padding, bucketing and sharding do not change the per-row losses of the real jaxchat model."""
    gpt = pytest.importorskip("jaxchat.model")
    import jax
    config = gpt.GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                           window_pattern="SL")
    params = jax.jit(gpt.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    # make the output path non-trivial (the init zeroes output projections); numpy, as eager jax ops are slow here
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(np.float32), params)
    scorer = core.CoreScorer(params=params, config=config, pad_id=BOS, min_len=16)
    tok = ByteTokenizer()
    items = core.load_task_data(FIXTURE, "tiny_mc.jsonl")
    meta = {"task_type": "multiple_choice", "continuation_delimiter": " ", "num_fewshot": 0}
    rows, starts, ends = [], [], []
    for it in items:
        r, s, e = core.example_rows(it, meta, [], tok)
        rows, starts, ends = rows + r, starts + s, ends + e
    loss, _ = scorer.score_rows(rows, starts, ends)
    from tolerances import gpt_reduction_len, tol

    forward = jax.jit(gpt.forward, static_argnums=1)  # one compile per distinct unpadded length (6 or 7)
    for i, (r, s, e) in enumerate(zip(rows, starts, ends)):
        logits = forward(params, config, jnp.asarray([r], jnp.int32))[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ref = -np.mean([float(logp[t - 1, r[t]]) for t in range(s, e)])
        # tests/tolerances.py: the forward's reduction (padding only adds masked terms) + the log-softmax over V
        assert abs(loss[i] - ref) < tol(np.float32, gpt_reduction_len(config, config.sequence_len) + V, ref)


def test_long_prompts_are_scored_whole_as_nanochat():
    """A few-shot prompt longer than sequence_len: nanochat's model scores it uncropped (core_eval.py crops only
    models with `max_seq_len`; its rotary table covers 10 x sequence_len), its "long" layers attending over a
    window of sequence_len keys. The reference here is jaxchat's KV-cache path, a separate implementation of the
    positions, rotary angles and window mask (delta <= window over the cache), prefilling each whole row."""
    gpt = pytest.importorskip("jaxchat.model")
    import jax
    config = gpt.GPTConfig(sequence_len=16, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                           window_pattern="SL")  # windows 128 / 16: the last layer slides over 16 keys
    params = jax.jit(gpt.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
    item = {"query": "The quick brown fox jumps over the lazy dog, and then it", "choices": ["runs", "sleeps"],
            "gold": 0}
    meta = {"task_type": "multiple_choice", "continuation_delimiter": " ", "num_fewshot": 0}
    rows, starts, ends = core.example_rows(item, meta, [], ByteTokenizer())
    assert min(len(r) for r in rows) > 3 * config.sequence_len
    scorer = core.CoreScorer(params=params, config=config, pad_id=BOS, min_len=16)
    assert scorer.max_seq_len == 10 * config.sequence_len
    loss, _ = scorer.score_rows(rows, starts, ends)
    prefill = jax.jit(gpt.forward, static_argnums=1)
    for i, (r, s, e) in enumerate(zip(rows, starts, ends)):
        logits, _ = prefill(params, config, jnp.asarray([r], jnp.int32), kv_cache=gpt.init_kv_cache(config, 1, len(r)))
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        ref = -np.mean([float(logp[t - 1, r[t]]) for t in range(s, e)])
        # float32 logits of a 2-layer model over <= 64 positions: agree to ~1e-6 relative; bound 1e-4
        assert loss[i] == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # cropping to sequence_len (jaxchat's old behaviour) scores these rows differently
    cropped, _ = core.CoreScorer(params=params, config=config, pad_id=BOS, min_len=16,
                                 max_seq_len=config.sequence_len).score_rows(rows, starts, ends)
    assert np.abs(cropped - loss).max() > 1e-3


# --------------------------------------------------------------------------------------------------- bundle

def _zip_bundle(path):
    with zipfile.ZipFile(path, "w") as zf:
        for root, _, files in os.walk(FIXTURE):
            for f in files:
                full = os.path.join(root, f)
                zf.write(full, os.path.join("eval_bundle", os.path.relpath(full, FIXTURE)))


def test_bundle_download_from_local_http(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("JAXCHAT_EVAL_BUNDLE", raising=False)
    serve_dir = tmp_path / "www"
    serve_dir.mkdir()
    _zip_bundle(serve_dir / "eval_bundle.zip")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(serve_dir), **k)

        def log_message(self, *a):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    try:
        d = core.ensure_eval_bundle(url)
        assert d == str(tmp_path / "base" / "eval_bundle")
        assert core.load_core_config(d)[1]["tiny_lm"] == 0.0
        assert core.ensure_eval_bundle(url) == d  # already there: no second request
        assert requests == ["/eval_bundle.zip"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(OSError, match="127.0.0.1"):
        monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base2"))
        core.ensure_eval_bundle(url)  # server gone: the error names the URL


def test_bundle_from_zip_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("JAXCHAT_EVAL_BUNDLE", raising=False)
    assert core.ensure_eval_bundle(FIXTURE) == FIXTURE  # a directory is used in place
    _zip_bundle(tmp_path / "b.zip")
    d = core.ensure_eval_bundle(str(tmp_path / "b.zip"))
    assert os.path.isfile(os.path.join(d, "eval_data", "tiny_mc.jsonl"))
    with pytest.raises(ValueError, match="core.yaml"):
        core.ensure_eval_bundle(str(tmp_path))
    shutil.rmtree(d)
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        core.ensure_eval_bundle(str(tmp_path / "nope.zip"))
