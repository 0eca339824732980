"""The inference engine: parity with nanochat's greedy decode, with a full-recompute decoder, sampling contracts,
and calculator tool use driven by a scripted model."""

import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import model as gpt
from jaxchat.checkpoint import from_nanochat
from jaxchat import engine as engine_mod
from jaxchat.engine import (FORCED_SLOTS, BatchEngine, Engine, attend_bucket, bucket, cache_bucket, sample_next_token,
                            sample_rows, swap_matrices)

ACTIVE = os.path.join(os.path.dirname(__file__), "fixtures", "nanochat-tiny", "active")
TINY = gpt.GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                     window_pattern="SL")


@pytest.fixture(scope="module")
def tiny_params():
    return from_nanochat(dict(np.load(os.path.join(ACTIVE, "params.npz"))), TINY)


@partial(jax.jit, static_argnums=(1,))
def _full_logits(params, config, idx):
    return gpt.forward(params, config, idx)


def naive_greedy(params, config, prompt, max_tokens, width=128):
    """Greedy decode that recomputes the whole sequence every step (no cache). The sequence is right-padded to a
    fixed width so one shape compiles; causality makes the padding invisible to the positions we read."""
    ids = list(prompt)
    for _ in range(max_tokens):
        idx = np.zeros((1, width), np.int32)
        idx[0, :len(ids)] = ids
        logits = _full_logits(params, config, jnp.asarray(idx))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_bucket():
    assert [bucket(n, 16) for n in (1, 15, 16, 17, 33, 100)] == [16, 16, 16, 32, 64, 128]
    sizes = (1, 64, 65, 96, 97, 144, 200, 256, 2048)
    assert [cache_bucket(n) for n in sizes] == [64, 64, 96, 96, 128, 192, 256, 256, 2048]


def test_attend_bucket():
    assert [attend_bucket(n, 256) for n in (1, 64, 65, 128, 129, 256)] == [64, 64, 128, 128, None, None]
    assert attend_bucket(58, 96) == 64 and attend_bucket(66, 96) is None  # the whole cache: None, one shape


def test_swap_matrices_transposes_the_linear_weights_only(tiny_params):
    swapped = swap_matrices(tiny_params)
    assert swapped["lm_head"].shape == tiny_params["lm_head"].shape[::-1]
    assert swapped["h"][0]["attn"]["c_q"].shape == tiny_params["h"][0]["attn"]["c_q"].shape[::-1]
    assert swapped["wte"].shape == tiny_params["wte"].shape  # gathered by row: stays (vocab, n_embd)
    for name, table in tiny_params["value_embeds"].items():
        assert swapped["value_embeds"][name] is table
    back = swap_matrices(swapped)  # its own inverse
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tiny_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_sampling_is_argmax_with_first_index_ties():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32)
    logits[1, [7, 200]] = 9.0  # a tie: the first index wins, as jnp.argmax
    logits[2, :] = 0.0
    got = sample_next_token(jnp.asarray(logits), jax.random.PRNGKey(0), jnp.float32(0.0), None)
    assert got.dtype == jnp.int32
    assert got.tolist() == np.argmax(logits, axis=-1).tolist()
    assert got.tolist()[1:3] == [7, 0]


def test_greedy_matches_nanochat_reference(tiny_params):
    ref = json.load(open(os.path.join(ACTIVE, "greedy.json")))
    ref_logits = np.load(os.path.join(ACTIVE, "greedy_logits.npz"))["engine_step_logits"]
    engine = Engine(tiny_params, TINY, decode_chunk=8)  # no tokenizer: a pure token decoder
    ids, logits = engine.generate_with_logits(ref["prompt"], max_tokens=ref["max_tokens"])
    assert ids == ref["engine"]
    assert logits.shape == ref_logits.shape == (33, 256)
    from tolerances import assert_close, gpt_reduction_len  # 2 eps sqrt(n) max|logit|; n: a sequence_len cache

    assert_close(logits, ref_logits, jnp.float32, gpt_reduction_len(TINY, TINY.sequence_len))
    seqs, masks = engine.generate_batch(ref["prompt"], max_tokens=ref["max_tokens"], temperature=0.0)
    assert seqs == [ref["prompt"] + ref["engine"]]
    assert masks == [[0] * len(ref["prompt"]) + [1] * ref["max_tokens"]]


@pytest.mark.parametrize("prompt_len", [1, 16, 17, 40])  # prompt buckets 16, 16, 32, 64 around their boundaries
def test_engine_equals_full_recompute(tiny_params, prompt_len):
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(0, TINY.vocab_size, prompt_len).tolist()
    expected = naive_greedy(tiny_params, TINY, prompt, 20)
    engine = Engine(tiny_params, TINY, decode_chunk=8)  # several host round-trips, one partial chunk
    seqs, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=0.0)
    assert len(seqs) == 3
    for seq, mask in zip(seqs, masks):
        assert seq == prompt + expected
        assert mask == [0] * prompt_len + [1] * 20


def test_engine_equals_full_recompute_across_attend_buckets(tiny_params):
    # 50 + 30 positions: a 96-position cache whose first chunks attend to 64 positions, the later ones to all 96.
    rng = np.random.default_rng(50)
    prompt = rng.integers(0, TINY.vocab_size, 50).tolist()
    assert cache_bucket(80) == 96 and attend_bucket(50 + 8, 96) == 64 and attend_bucket(50 + 24, 96) is None
    engine = Engine(tiny_params, TINY, decode_chunk=8)
    seqs, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert seqs == [prompt + naive_greedy(tiny_params, TINY, prompt, 30)] * 2


def test_streaming_columns(tiny_params):
    engine = Engine(tiny_params, TINY, decode_chunk=8)
    columns = list(engine.generate([1, 2, 3], num_samples=3, max_tokens=11, temperature=0.0))
    assert len(columns) == 11
    assert all(len(toks) == 3 and masks == [1, 1, 1] for toks, masks in columns)
    assert list(engine.generate([1, 2, 3], max_tokens=0)) == []


def test_seeded_sampling_and_top_k(tiny_params):
    engine = Engine(tiny_params, TINY, decode_chunk=8)  # shapes shared with the tests above: fewer compiles
    prompt = [5, 6, 7, 8]
    kw = dict(num_samples=3, max_tokens=16, temperature=1.5)
    a, _ = engine.generate_batch(prompt, seed=1, **kw)
    b, _ = engine.generate_batch(prompt, seed=1, **kw)
    c, _ = engine.generate_batch(prompt, seed=2, **kw)
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) > 1  # rows sample independently
    # greedy ignores the seed
    g1, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0, seed=1)
    g2, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0, seed=7)
    assert g1 == g2
    # top-k: each sampled token is among the k largest logits the sampler saw at that step
    for seed in range(3):
        ids, logits = engine.generate_with_logits(prompt, max_tokens=16, temperature=2.0, top_k=3, seed=seed)
        assert len(ids) == 16
        for t, tok in enumerate(ids):
            assert tok in np.argsort(logits[t])[-3:]


def test_bad_arguments(tiny_params):
    engine = Engine(tiny_params, TINY)
    with pytest.raises(TypeError):
        list(engine.generate([]))
    with pytest.raises(ValueError, match="vocab_size"):
        list(engine.generate([300]))
    with pytest.raises(ValueError, match="temperature"):
        list(engine.generate([1], temperature=-1.0))


# ----------------------------------------------------------------------------------------------------------------
# Tool use, with a scripted model and a byte-level tokenizer.

class ByteTokenizer:
    """Bytes are tokens 0..255; nanochat's special tokens follow."""
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def encode_special(self, name):
        return 256 + self.SPECIALS.index(name)

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def encode(self, text, prepend=None):
        return ([] if prepend is None else [prepend]) + list(text.encode())

    def decode(self, ids):
        return bytes(t for t in ids if t < 256).decode(errors="replace")


TOK = ByteTokenizer()
S = TOK.encode_special
SCRIPT_CONFIG = gpt.GPTConfig(sequence_len=128, vocab_size=272, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                              window_pattern="L")


def scripted_forward(params, config, idx, kv_cache=None, valid_len=None):
    """A 'model' whose prediction at absolute position p is params['script'][row][p + 1], whatever the inputs.
    Rows beyond the script's rows reuse the last one; prefill (batch 1) uses row 0."""
    B, T = idx.shape
    script = params["script"]  # (R, S) int32
    rows = jnp.minimum(jnp.arange(B), script.shape[0] - 1)
    positions = kv_cache["pos"][:, None] + jnp.arange(T)  # (B, T)
    targets = script[rows[:, None], jnp.minimum(positions + 1, script.shape[1] - 1)]
    logits = 10.0 * jax.nn.one_hot(targets, config.vocab_size)
    n = jnp.full((B,), T, jnp.int32) if valid_len is None else valid_len
    return logits, dict(kv_cache, pos=kv_cache["pos"] + n)


def make_script(*rows, length=120):
    out = np.full((len(rows), length), S("<|assistant_end|>"), np.int32)
    for r, row in enumerate(rows):
        out[r, :len(row)] = row
    return {"script": jnp.asarray(out)}


def py_block(expr):
    return [S("<|python_start|>")] + TOK.encode(expr) + [S("<|python_end|>")]


def forced_block(text):
    return [S("<|output_start|>")] + TOK.encode(text) + [S("<|output_end|>")]


PROMPT = [S("<|bos|>"), S("<|user_start|>")] + TOK.encode("hi") + [S("<|user_end|>"), S("<|assistant_start|>")]


@pytest.mark.parametrize("chunk", [4, 32])
def test_tool_use_forces_calculator_result(chunk):
    expr, result = "12*3", "36"
    filler = [ord("?")] * len(forced_block(result))  # the script's own tokens where the engine forces the result
    row0 = PROMPT + py_block(expr) + filler + TOK.encode("ok") + [S("<|assistant_end|>")]
    row1 = PROMPT + [row0[len(PROMPT)]] + TOK.encode("plain answer") + [S("<|assistant_end|>")]
    engine = Engine(make_script(row0, row1), SCRIPT_CONFIG, TOK, decode_chunk=chunk, forward_fn=scripted_forward)
    seqs, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=40, temperature=0.0)
    want0 = py_block(expr) + forced_block(result) + TOK.encode("ok")
    assert seqs[0] == PROMPT + want0
    n_py = len(py_block(expr))
    assert masks[0] == [0] * len(PROMPT) + [1] * n_py + [0] * len(forced_block(result)) + [1, 1]
    # the other row kept sampling in lockstep, untouched by row 0's tool call
    assert seqs[1] == row1[:-1]
    assert masks[1] == [0] * len(PROMPT) + [1] * (len(row1) - 1 - len(PROMPT))


def test_long_tool_result_is_fed_in_several_loads():
    expr = "123456789*987654321*123456789*987654321"
    result = str(123456789 * 987654321 * 123456789 * 987654321)
    assert len(forced_block(result)) > FORCED_SLOTS
    filler = [ord("?")] * len(forced_block(result))
    script = PROMPT + py_block(expr) + filler + [ord("!"), S("<|assistant_end|>")]
    engine = Engine(make_script(script), SCRIPT_CONFIG, TOK, decode_chunk=8, forward_fn=scripted_forward)
    seqs, masks = engine.generate_batch(PROMPT, max_tokens=100, temperature=0.0)
    assert seqs[0][len(PROMPT):] == py_block(expr) + forced_block(result) + [ord("!")]
    assert masks[0][len(PROMPT):] == [1] * len(py_block(expr)) + [0] * len(forced_block(result)) + [1]


@pytest.mark.parametrize("expr", ["__import__('os').system('echo pwned')", "9**9**9", "().__class__", "1/0"])
def test_refused_tool_calls_force_nothing(expr):
    script = PROMPT + py_block(expr) + TOK.encode("no") + [S("<|assistant_end|>")]
    engine = Engine(make_script(script), SCRIPT_CONFIG, TOK, forward_fn=scripted_forward)
    seqs, masks = engine.generate_batch(PROMPT, max_tokens=80, temperature=0.0)
    assert seqs[0] == script[:-1]
    assert all(m == 1 for m in masks[0][len(PROMPT):])


def test_stops_at_bos_and_respects_max_tokens():
    script = PROMPT + TOK.encode("abc") + [S("<|bos|>")] + TOK.encode("zzz")
    engine = Engine(make_script(script), SCRIPT_CONFIG, TOK, forward_fn=scripted_forward)
    seqs, _ = engine.generate_batch(PROMPT, max_tokens=50, temperature=0.0)
    assert seqs == [PROMPT + TOK.encode("abc")]
    columns = list(engine.generate(PROMPT, max_tokens=50, temperature=0.0))
    assert [c[0][0] for c in columns] == TOK.encode("abc") + [S("<|bos|>")]  # the stream ends once all rows are done
    seqs, _ = engine.generate_batch(PROMPT, max_tokens=2, temperature=0.0)
    assert seqs == [PROMPT + TOK.encode("ab")]


def uniform_forward(params, config, idx, kv_cache=None, valid_len=None):
    B, T = idx.shape
    n = jnp.full((B,), T, jnp.int32) if valid_len is None else valid_len
    return jnp.zeros((B, T, config.vocab_size)), dict(kv_cache, pos=kv_cache["pos"] + n)


def test_first_token_sampled_per_row():
    """nanochat's regression: each row draws its own first token from the shared prefill logits."""
    engine = Engine({}, SCRIPT_CONFIG, TOK, forward_fn=uniform_forward)
    (first, _), = list(engine.generate(PROMPT, num_samples=16, max_tokens=1, temperature=1.0))
    assert len(first) == 16 and len(set(first)) > 1
    # and each step draws afresh (the key is folded with the step): uniform logits must not repeat one token
    row = [col[0] for col, _ in engine.generate(PROMPT, max_tokens=12, temperature=1.0)]
    assert len(set(row)) > 1


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching (BatchEngine)

def test_batched_greedy_equals_solo_greedy(tiny_params):
    """Prompts of different lengths (prompt buckets 16, 32, 64) join the running loop at different times, one
    waiting for a free slot: each one's greedy output is token-for-token its solo output (and the full recompute)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (40, 3, 17, 9)]
    budgets = [20, 12, 24, 16]
    engine = Engine(tiny_params, TINY, decode_chunk=8)
    solo = [engine.generate_batch(p, max_tokens=m, temperature=0.0)[0][0][len(p):] for p, m in zip(prompts, budgets)]
    assert solo[0] == naive_greedy(tiny_params, TINY, prompts[0], 20)
    batch = BatchEngine(engine, max_batch=3, max_len=96)
    first = batch.submit(prompts[0], max_tokens=budgets[0], temperature=0.0)
    it = iter(first)
    got0 = [next(it)[0] for _ in range(8)]  # the first chunk is out: the others join a running loop
    later = [batch.submit(p, max_tokens=m, temperature=0.0) for p, m in zip(prompts[1:], budgets[1:])]
    got0 += [t for t, _ in it]
    outs = [got0] + [[t for t, _ in r] for r in later]  # the 4th request waited for a slot
    assert outs == solo
    assert [r.finish_reason for r in [first] + later] == ["length"] * 4
    assert batch.busy_slots == 0


def test_batch_engine_compiles_nothing_after_warmup(tiny_params):
    batch = BatchEngine(Engine(tiny_params, TINY, decode_chunk=8), max_batch=2, max_len=64)  # few shapes to warm
    batch.warmup()
    sizes = (engine_mod._prefill_slot._cache_size(), engine_mod._slot_decode_chunk._cache_size())
    rng = np.random.default_rng(3)
    reqs = [batch.submit(rng.integers(0, 256, n).tolist(), max_tokens=m, temperature=t, top_k=k, top_p=p, seed=n)
            for n, m, t, k, p in ((5, 30, 0.0, 0, 1.0), (33, 40, 1.0, 5, 1.0), (50, 20, 0.7, 0, 0.9))]
    assert all(len(list(r)) > 0 for r in reqs)
    assert (engine_mod._prefill_slot._cache_size(), engine_mod._slot_decode_chunk._cache_size()) == sizes


def test_slot_sampling_per_row_settings():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 300)).astype(np.float32))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4))
    temp = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    top_k = jnp.asarray([0, 3, 0, 0], jnp.int32)
    top_p = jnp.asarray([1.0, 1.0, 1e-6, 1.0], jnp.float32)
    order = np.argsort(-np.asarray(logits), axis=-1)
    draw = jax.jit(lambda step: sample_rows(logits, jax.vmap(jax.random.fold_in)(keys, jnp.full((4,), step)), temp,
                                            top_k, top_p))  # one compile, not one per eager op and step
    for step in range(20):
        got = np.asarray(draw(step))
        assert got[0] == order[0, 0]  # greedy row
        assert got[1] in order[1, :3]  # top-k 3 row
        assert got[2] == order[2, 0]  # a tiny nucleus keeps only the most likely token


def test_batch_engine_seeds_cancel_and_stop_reason(tiny_params):
    batch = BatchEngine(Engine(tiny_params, TINY, decode_chunk=8), max_batch=2, max_len=96)
    run = lambda seed: [t for t, _ in batch.submit([1, 2, 3], max_tokens=16, temperature=1.0, seed=seed)]  # noqa
    assert run(5) == run(5) and run(5) != run(6)
    cols = list(batch.generate([1, 2, 3], num_samples=2, max_tokens=10, temperature=1.0, seed=5))
    assert len(cols) == 10 and len({tuple(c[0]) for c in cols}) > 1 or cols[0][0][0] != cols[0][0][1]
    long = batch.submit([4, 5], max_tokens=80, temperature=0.0)
    it = iter(long)
    next(it)
    long.cancel()  # frees the slot at the next chunk boundary
    rest = list(it)
    assert len(rest) < 79 and long.finish_reason is None
    for _ in range(100):
        if batch.busy_slots == 0:
            break
        time.sleep(0.01)
    assert batch.busy_slots == 0


def test_batch_engine_tool_use_and_stop_per_slot():
    """The calculator runs per slot: one slot's tool call forces its result while the other slot samples on."""
    expr, result = "12*3", "36"
    filler = [ord("?")] * len(forced_block(result))
    row0 = PROMPT + py_block(expr) + filler + TOK.encode("ok") + [S("<|assistant_end|>")]
    row1 = PROMPT + [row0[len(PROMPT)]] + TOK.encode("plain answer") + [S("<|assistant_end|>")]
    engine = Engine(make_script(row0, row1), SCRIPT_CONFIG, TOK, decode_chunk=4, forward_fn=scripted_forward)
    batch = BatchEngine(engine, max_batch=2)
    cols = list(batch.generate(PROMPT, num_samples=2, max_tokens=40, temperature=0.0))
    out0 = [c[0][0] for c in cols]
    want0 = py_block(expr) + forced_block(result) + TOK.encode("ok") + [S("<|assistant_end|>")]
    assert out0[:len(want0)] == want0
    assert [c[1][0] for c in cols][:len(want0)] == [1] * len(py_block(expr)) + [0] * len(forced_block(result)) + [1] * 3
    req = batch.submit(PROMPT, max_tokens=40, temperature=0.0, sample_index=1)  # slot rows follow the script row
    list(req)
    assert req.finish_reason in ("stop", "length")


def test_slot_insert_follows_the_cache_layout_contract(tiny_params, monkeypatch):
    """Contract 4: every cache key is written into its slot along its batch axis (k/v: axis 1, others: axis 0),
    including keys the engine does not know (a bigram model's 'prev_token')."""
    real_init = gpt.init_kv_cache

    def init_with_extra(config, batch_size, max_len, dtype=None):  # a key the engine has never heard of
        return dict(real_init(config, batch_size, max_len, dtype), extra=jnp.zeros((batch_size, 2), jnp.int32))

    def forward_keeping_extra(params, config, idx, kv_cache=None, valid_len=None, **kw):
        kv_cache = dict(kv_cache)
        extra = kv_cache.pop("extra")
        assert extra.shape == (idx.shape[0], 2)
        logits, cache = gpt.forward(params, config, idx, kv_cache=kv_cache, valid_len=valid_len, **kw)
        return logits, dict(cache, extra=extra + 1)

    monkeypatch.setattr(gpt, "init_kv_cache", init_with_extra)
    batch = BatchEngine(Engine(tiny_params, TINY, decode_chunk=8, forward_fn=forward_keeping_extra), max_batch=3,
                        max_len=64)
    a = batch.submit([9, 8, 7], max_tokens=20, temperature=0.0)  # still running when b joins: b takes slot 1
    b = batch.submit([1, 2, 3, 4, 5], max_tokens=5, temperature=0.0)
    ta, tb = [t for t, _ in a], [t for t, _ in b]
    cache = batch._state["cache"]
    # each slot's prev_token is the last token it fed (every emitted token is fed back), 'pos' what it holds;
    # the third slot was never used
    assert np.asarray(cache["prev_token"]).tolist() == [ta[-1], tb[-1], 0]
    assert np.asarray(cache["pos"]).tolist() == [3 + 20, 5 + 5, 0]
    extra = np.asarray(cache["extra"])  # the unknown key went through prefill and decode, slot by slot
    assert extra.shape == (3, 2) and (extra[:2] > 0).all() and (extra[2] == 0).all()
    assert ta == naive_greedy(tiny_params, TINY, [9, 8, 7], 20)


def test_failing_prefill_ends_the_request_with_the_error(tiny_params):
    """An engine failure while a request is being admitted reaches that request (and the queue): no hang."""
    def broken_forward(params, config, idx, kv_cache=None, valid_len=None, **kw):
        raise KeyError("no such cache key")

    batch = BatchEngine(Engine(tiny_params, TINY, decode_chunk=8, forward_fn=broken_forward), max_batch=2,
                        max_len=64)
    a = batch.submit([9, 8, 7], max_tokens=4, temperature=0.0)
    with pytest.raises(KeyError):
        list(a)


def test_infer_bench_prints_sweep_json(capsys):
    from evals import infer_bench
    payload = infer_bench.main(["--random-init", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32",
                                "--vocab-size", "256", "--max-seq-len", "64", "--window-pattern", "L",
                                "--prompt-len", "8", "--decode-tokens", "6", "--batch-sizes", "1,2", "--repeats", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(payload))
    assert [r["batch_size"] for r in last["sweep"]] == [1, 2]
    for row in last["sweep"]:
        assert set(row) == {"batch_size", "ttft_sec", "tpot_sec", "tok_per_sec", "mbu_percent", "mfu_percent",
                            "peak_memory_bytes", "decode_steps", "prefill_tok_per_sec", "ms_per_token", "mbu"}
        assert row["tok_per_sec"] > 0 and row["prefill_tok_per_sec"] > 0 and row["decode_steps"] == 6
        assert row["tok_per_sec"] == pytest.approx(row["batch_size"] / row["tpot_sec"], rel=1e-2)
        assert row["mbu"] is None and row["mbu_percent"] is None and row["mfu_percent"] is None  # CPU: peaks unknown
        assert row["peak_memory_bytes"] > 0
    assert last["prefill"]["tok_per_sec"] > 0 and last["decode_flops_per_token"] > 0

