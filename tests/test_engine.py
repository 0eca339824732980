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
from jaxchat.common import pow2_bucket
from jaxchat.engine import FORCED_SLOTS, Engine, QueueFull, attend_bucket, cache_bucket, sample, swap_matrices

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


def engine_step_logits(engine, prompt, max_tokens):
    """Greedy ids and the logits the sampler saw at each step (at the prompt's last position, then after feeding each
    emitted token: nanochat's `engine_step_logits`), from the engine's own prefill, insert and decode programs run
    one decode step at a time on a fresh state."""
    from jaxchat.engine import SMALL_TOP_K, _ctl_fields, _program, _request_fields

    spec = engine.spec
    fields = dict(_request_fields(), budget=np.int32(max_tokens))
    state = _program(spec, "insert")(_program(spec, "init")(), *engine._prefill(prompt), np.int32(0), fields)
    ids, logits = [], [np.asarray(state["logits"][0])]
    ctl = dict(_ctl_fields(spec), num_steps=np.int32(1))
    for _ in range(max_tokens):
        state, out = _program(spec, "decode", None, SMALL_TOP_K, False)(engine.decode_params, state, ctl)
        ids.append(int(out["tokens"][0, 0]))
        logits.append(np.asarray(state["logits"][0]))
    return ids, np.stack(logits)


@pytest.fixture(scope="module")
def engine(tiny_params):
    """The engine most tests share (one set of compiled programs): 4 slots of 96 positions, 8-token chunks."""
    e = Engine(tiny_params, TINY, max_batch=4, max_len=96, decode_chunk=8)
    yield e
    e.close()


def test_bucket():
    assert [pow2_bucket(n, 16) for n in (1, 15, 16, 17, 33, 100)] == [16, 16, 16, 32, 64, 128]
    assert pow2_bucket(5) == 8 and pow2_bucket(3000, 32, 2048) == 2048 and pow2_bucket(1, 32, 2048) == 32
    sizes = (1, 64, 65, 96, 97, 144, 200, 256, 2048)
    assert [cache_bucket(n) for n in sizes] == [64, 64, 96, 96, 128, 192, 256, 256, 2048]


def test_attend_bucket():
    assert [attend_bucket(n, 256) for n in (1, 64, 65, 97, 128, 129, 193, 256)] == [64, 64, 96, 128, 128, 192, None,
                                                                                     None]
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


@pytest.mark.parametrize("two_reductions", [True, False])
def test_greedy_sampling_is_argmax_with_first_index_ties(two_reductions):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32)
    logits[1, [7, 200]] = 9.0  # a tie: the first index wins, as jnp.argmax
    logits[2, :] = 0.0
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(6))
    got = sample(jnp.asarray(logits), keys, jnp.zeros(6), jnp.zeros(6, jnp.int32), jnp.ones(6),
                 two_reduction_argmax=two_reductions)
    assert got.dtype == jnp.int32
    assert got.tolist() == np.argmax(logits, axis=-1).tolist()
    assert got.tolist()[1:3] == [7, 0]


def test_greedy_matches_nanochat_reference(tiny_params, engine):
    ref = json.load(open(os.path.join(ACTIVE, "greedy.json")))
    ref_logits = np.load(os.path.join(ACTIVE, "greedy_logits.npz"))["engine_step_logits"]
    ids, logits = engine_step_logits(engine, ref["prompt"], ref["max_tokens"])
    assert ids == ref["engine"]
    assert logits.shape == ref_logits.shape == (33, 256)
    from tolerances import assert_close, gpt_reduction_len  # 2 eps sqrt(n) max|logit|; n: a sequence_len cache

    assert_close(logits, ref_logits, jnp.float32, gpt_reduction_len(TINY, TINY.sequence_len))
    seqs, masks = engine.generate_batch(ref["prompt"], max_tokens=ref["max_tokens"], temperature=0.0)
    assert seqs == [ref["prompt"] + ref["engine"]]
    assert masks == [[0] * len(ref["prompt"]) + [1] * ref["max_tokens"]]


@pytest.mark.parametrize("prompt_len", [1, 16, 17, 40])  # prompt buckets 16, 16, 32, 64 around their boundaries
def test_engine_equals_full_recompute(tiny_params, engine, prompt_len):
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(0, TINY.vocab_size, prompt_len).tolist()
    expected = naive_greedy(tiny_params, TINY, prompt, 20)
    seqs, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=0.0)  # several chunks
    assert len(seqs) == 3
    for seq, mask in zip(seqs, masks):
        assert seq == prompt + expected
        assert mask == [0] * prompt_len + [1] * 20


def test_engine_equals_full_recompute_across_attend_buckets(tiny_params, engine):
    # 50 + 30 positions of a 96-position cache: the first chunks attend to 64 positions, the later ones to all 96.
    rng = np.random.default_rng(50)
    prompt = rng.integers(0, TINY.vocab_size, 50).tolist()
    assert attend_bucket(50 + 8, 96) == 64 and attend_bucket(50 + 24, 96) is None
    seqs, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert seqs == [prompt + naive_greedy(tiny_params, TINY, prompt, 30)] * 2


def test_streaming_columns(engine):
    columns = list(engine.generate([1, 2, 3], num_samples=3, max_tokens=11, temperature=0.0))
    assert len(columns) == 11
    assert all(len(toks) == 3 and masks == [1, 1, 1] for toks, masks in columns)
    assert list(engine.generate([1, 2, 3], max_tokens=0)) == []
    (r,) = [engine.submit([1, 2, 3], max_tokens=0)]
    assert [o.finish_reason for o in r] == ["length"] and r.num_tokens == [0]


def test_seeded_sampling_and_top_k(engine):
    prompt = [5, 6, 7, 8]
    kw = dict(num_samples=3, max_tokens=16, temperature=1.5)
    a, _ = engine.generate_batch(prompt, seed=1, **kw)
    b, _ = engine.generate_batch(prompt, seed=1, **kw)
    c, _ = engine.generate_batch(prompt, seed=2, **kw)
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) > 1  # samples draw independently
    # greedy ignores the seed
    g1, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0, seed=1)
    g2, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0, seed=7)
    assert g1 == g2
    # top-k: each sampled token is among the k most likely of the distribution it was drawn from (the logprobs hook
    # reports that distribution's top k; temperature does not change the order)
    for seed in range(3):
        outs = list(engine.submit(prompt, max_tokens=16, temperature=2.0, top_k=3, seed=seed, logprobs=3))
        assert len(outs) == 16
        for o in outs:
            assert o.token in [i for i, _ in o.logprobs[1]]


def test_logprobs_are_the_models_distribution(tiny_params, engine):
    """The hook's chosen and top-N logprobs are log_softmax of the model's logits at each step (full recompute),
    before temperature, and a request's greedy tokens do not change when it asks for them."""
    prompt = [9, 8, 7, 6, 5]
    plain = [o.token for o in engine.submit(prompt, max_tokens=12, temperature=0.0)]
    outs = list(engine.submit(prompt, max_tokens=12, temperature=0.0, logprobs=5))
    assert [o.token for o in outs] == plain
    ids = prompt + plain
    full = np.asarray(jax.nn.log_softmax(_full_logits(tiny_params, TINY, jnp.asarray([ids + [0] * (128 - len(ids))])),
                                         axis=-1))[0]
    from tolerances import assert_close, gpt_reduction_len

    n = gpt_reduction_len(TINY, 96)
    for t, o in enumerate(outs):
        row = full[len(prompt) - 1 + t]
        chosen, top = o.logprobs
        assert len(top) == 5 and [i for i, _ in top] == np.argsort(-row, kind="stable")[:5].tolist()
        assert_close([chosen] + [v for _, v in top], [row[o.token]] + [row[i] for i, _ in top], jnp.float32, n,
                     scale=15.0)
    sampled = list(engine.submit(prompt, max_tokens=4, temperature=1.5, seed=3, logprobs=2))
    assert all(o.logprobs[0] <= 0 and len(o.logprobs[1]) == 2 for o in sampled)


def test_num_samples_via_insert_equal_separate_prefills(engine):
    """n samples share one prefill, copied into n slots: each equals the same sample prefilled on its own."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    one = list(engine.submit(prompt, max_tokens=10, temperature=0.0, logprobs=1))
    three = list(engine.submit(prompt, n=3, max_tokens=10, temperature=0.0, logprobs=1))
    for i in range(3):
        mine = [o for o in three if o.index == i]
        assert [o.token for o in mine] == [o.token for o in one]
        np.testing.assert_allclose([o.logprobs[0] for o in mine], [o.logprobs[0] for o in one], rtol=0, atol=1e-6)
    seeded = lambda n: [o.token for o in engine.submit(prompt, n=n, max_tokens=10, temperature=1.0,  # noqa: E731
                                                       seed=11) if o.index == 0]
    assert seeded(3) == seeded(1)  # sample 0's key is the seed's, whatever n


def test_bad_arguments(tiny_params, engine):
    with pytest.raises(TypeError):
        list(engine.generate([]))
    with pytest.raises(ValueError, match="vocab_size"):
        list(engine.generate([300]))
    with pytest.raises(ValueError, match="temperature"):
        list(engine.generate([1], temperature=-1.0))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1], top_p=0.0)
    with pytest.raises(ValueError, match="no room"):
        engine.submit([1] * 96)
    with pytest.raises(ValueError, match="multiple"):
        Engine(tiny_params, TINY, max_batch=3, devices=jax.devices()[:2]) if len(jax.devices()) > 1 else \
            Engine(tiny_params, TINY, max_batch=0)


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
    engine = Engine(make_script(row0, row1), SCRIPT_CONFIG, TOK, max_batch=2, decode_chunk=chunk,
                    forward_fn=scripted_forward)  # sample i decodes in slot i, which follows script row i
    seqs, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=40, temperature=0.0)
    want0 = py_block(expr) + forced_block(result) + TOK.encode("ok")
    assert seqs[0] == PROMPT + want0
    n_py = len(py_block(expr))
    assert masks[0] == [0] * len(PROMPT) + [1] * n_py + [0] * len(forced_block(result)) + [1, 1]
    # the other slot kept sampling, untouched by slot 0's tool call
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
    engine = Engine({}, SCRIPT_CONFIG, TOK, max_batch=16, forward_fn=uniform_forward)
    (first, _), = list(engine.generate(PROMPT, num_samples=16, max_tokens=1, temperature=1.0))
    assert len(first) == 16 and len(set(first)) > 1
    # and each step draws afresh (the key is folded with the step): uniform logits must not repeat one token
    row = [col[0] for col, _ in engine.generate(PROMPT, max_tokens=12, temperature=1.0)]
    assert len(set(row)) > 1


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching: requests join and leave the running slots

def test_batched_greedy_equals_solo_greedy(tiny_params, engine):
    """Prompts of different lengths (prompt buckets 16, 32, 64) join the running slots at different times, one
    waiting for a free slot: each one's greedy output is token-for-token its solo output (and the full recompute)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (40, 3, 17, 9, 22)]
    budgets = [20, 12, 24, 16, 10]
    solo = [engine.generate_batch(p, max_tokens=m, temperature=0.0)[0][0][len(p):] for p, m in zip(prompts, budgets)]
    assert solo[0] == naive_greedy(tiny_params, TINY, prompts[0], 20)
    first = engine.submit(prompts[0], max_tokens=budgets[0], temperature=0.0)
    it = iter(first)
    got0 = [next(it).token for _ in range(8)]  # the first chunks are out: the others join running slots
    later = [engine.submit(p, max_tokens=m, temperature=0.0) for p, m in zip(prompts[1:], budgets[1:])]
    got0 += [o.token for o in it]
    outs = [got0] + [[o.token for o in r] for r in later]  # the 5th request waited for a slot
    assert outs == solo
    assert [r.finish_reasons for r in [first] + later] == [["length"]] * 5
    _wait(lambda: engine.busy_slots == 0)


def _wait(cond, seconds=20.0):
    t0 = time.time()
    while not cond() and time.time() - t0 < seconds:
        time.sleep(0.01)
    assert cond()


def test_engine_compiles_nothing_after_warmup(tiny_params):
    """After warmup(), mixed prompt lengths, n, sampling settings, logprobs, tool use and cancellations compile
    nothing (jax's compile events, counted)."""
    compiles = []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    expr, result = "12*3", "36"
    script = PROMPT + py_block(expr) + [ord("?")] * len(forced_block(result)) + TOK.encode("ok!") * 8
    tool = Engine(make_script(script), SCRIPT_CONFIG, TOK, max_batch=2, max_len=64, decode_chunk=8,
                  forward_fn=scripted_forward)
    real = Engine(tiny_params, TINY, max_batch=2, max_len=96, decode_chunk=8)
    tool.warmup()
    real.warmup()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        rng = np.random.default_rng(3)
        reqs = [real.submit(rng.integers(0, 256, n).tolist(), n=k, max_tokens=m, temperature=t, top_k=tk, top_p=p,
                            seed=n, logprobs=lp)
                for n, k, m, t, tk, p, lp in ((5, 1, 30, 0.0, 0, 1.0, None), (33, 2, 40, 1.0, 5, 1.0, 2),
                                              (50, 1, 20, 0.7, 0, 0.9, None), (70, 1, 20, 1.0, 150, 1.0, None),
                                              (2, 3, 60, 1.0, 0, 1.0, 20))]
        cancelled = real.submit([1, 2, 3], max_tokens=80, temperature=0.0)
        next(iter(cancelled))
        cancelled.cancel()
        assert all(len(list(r)) > 0 for r in reqs)
        seqs, masks = tool.generate_batch(PROMPT, num_samples=3, max_tokens=40, temperature=0.0)
        assert seqs[0][len(PROMPT):len(PROMPT) + len(py_block(expr)) + len(forced_block(result))] == \
            py_block(expr) + forced_block(result)
        _wait(lambda: real.busy_slots == 0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        real.close()
    assert compiles == []


def test_slot_sampling_per_row_settings():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 300)).astype(np.float32))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4))
    temp = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    top_k = jnp.asarray([0, 3, 0, 0], jnp.int32)
    top_p = jnp.asarray([1.0, 1.0, 1e-6, 1.0], jnp.float32)
    order = np.argsort(-np.asarray(logits), axis=-1)
    draw = jax.jit(lambda step: sample(logits, jax.vmap(jax.random.fold_in)(keys, jnp.full((4,), step)), temp,
                                       top_k, top_p))  # one compile, not one per eager op and step
    for step in range(20):
        got = np.asarray(draw(step))
        assert got[0] == order[0, 0]  # greedy row
        assert got[1] in order[1, :3]  # top-k 3 row
        assert got[2] == order[2, 0]  # a tiny nucleus keeps only the most likely token


def test_seeds_cancel_queue_bound_and_stop_reason(tiny_params, engine):
    run = lambda seed: [o.token for o in engine.submit([1, 2, 3], max_tokens=16, temperature=1.0, seed=seed)]  # noqa
    assert run(5) == run(5) and run(5) != run(6)
    long = engine.submit([4, 5], max_tokens=80, temperature=0.0)
    it = iter(long)
    next(it)
    long.cancel()  # frees the slot at the next chunk boundary
    rest = list(it)
    assert len(rest) < 79 and long.finish_reasons == [None]
    _wait(lambda: engine.busy_slots == 0)
    # the queue's bound: 4 slots + max_queue samples; more is refused at once, with the counts
    bounded = Engine(tiny_params, TINY, max_batch=4, max_len=96, decode_chunk=8, max_queue=2)
    bounded.start()  # the scheduler thread: requests run while nobody iterates them
    reqs = [bounded.submit([1, 2], n=3, max_tokens=60, temperature=0.0) for _ in range(2)]
    with pytest.raises(QueueFull, match="max_queue=2"):
        bounded.submit([1, 2], max_tokens=60)
    for r in reqs:
        r.cancel()
    _wait(lambda: bounded.busy_slots == 0 and bounded.queued == 0)
    assert len(list(bounded.submit([1, 2], n=3, max_tokens=4, temperature=0.0))) == 12
    bounded.close()


def test_stop_strings_cut_the_text_and_free_the_slot():
    script = PROMPT + TOK.encode("Hello there! General Kenobi") + [S("<|assistant_end|>")]
    engine = Engine(make_script(script), SCRIPT_CONFIG, TOK, max_batch=2, decode_chunk=4, forward_fn=scripted_forward)
    outs = list(engine.submit(PROMPT, max_tokens=60, temperature=0.0, stop=["zzz", "! G"]))
    assert "".join(o.text for o in outs) == "Hello there" and outs[-1].finish_reason == "stop"
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1) and outs[-1].token == ord("G")
    outs = list(engine.submit(PROMPT, max_tokens=60, temperature=0.0, stop=["Kenobi!!"]))
    assert "".join(o.text for o in outs) == "Hello there! General Kenobi"  # a held-back prefix is flushed
    assert outs[-1].token == S("<|assistant_end|>") and outs[-1].finish_reason == "stop"
    r = engine.submit(PROMPT, max_tokens=5, temperature=0.0)
    assert "".join(o.text for o in r) == "Hello" and r.finish_reasons == ["length"] and r.num_tokens == [5]
    _wait(lambda: engine.busy_slots == 0)
    engine.close()


def test_tool_use_and_stop_per_slot():
    """The calculator runs per slot: one slot's tool call forces its result while the other slot samples on."""
    expr, result = "12*3", "36"
    filler = [ord("?")] * len(forced_block(result))
    row0 = PROMPT + py_block(expr) + filler + TOK.encode("ok") + [S("<|assistant_end|>")]
    row1 = PROMPT + [row0[len(PROMPT)]] + TOK.encode("plain answer") + [S("<|assistant_end|>")]
    engine = Engine(make_script(row0, row1), SCRIPT_CONFIG, TOK, max_batch=2, decode_chunk=4,
                    forward_fn=scripted_forward)
    cols = list(engine.generate(PROMPT, num_samples=2, max_tokens=40, temperature=0.0))
    out0 = [c[0][0] for c in cols]
    want0 = py_block(expr) + forced_block(result) + TOK.encode("ok") + [S("<|assistant_end|>")]
    assert out0[:len(want0)] == want0
    assert [c[1][0] for c in cols][:len(want0)] == [1] * len(py_block(expr)) + [0] * len(forced_block(result)) + [1] * 3
    req = engine.submit(PROMPT, n=2, max_tokens=40, temperature=0.0)
    texts = ["", ""]
    for o in req:
        texts[o.index] += o.text
    assert req.finish_reasons == ["stop", "stop"]
    assert texts == [TOK.decode(want0), TOK.decode(row1[len(PROMPT):-1])]
    engine.close()


def test_slot_insert_follows_the_cache_layout(tiny_params, monkeypatch):
    """Every cache entry is written into its slot along its batch axis (`jaxchat.model.init_kv_cache`: the first),
    including entries the engine does not know (a bigram model's 'prev_token')."""
    real_init = gpt.init_kv_cache

    def init_with_extra(config, batch_size, max_len, dtype=None):  # an entry the engine has never heard of
        return dict(real_init(config, batch_size, max_len, dtype), extra=jnp.zeros((batch_size, 2), jnp.int32))

    def forward_keeping_extra(params, config, idx, kv_cache=None, valid_len=None, **kw):
        kv_cache = dict(kv_cache)
        extra = kv_cache.pop("extra")
        assert extra.shape == (idx.shape[0], 2)
        logits, cache = gpt.forward(params, config, idx, kv_cache=kv_cache, valid_len=valid_len, **kw)
        return logits, dict(cache, extra=extra + 1)

    monkeypatch.setattr(gpt, "init_kv_cache", init_with_extra)
    engine = Engine(tiny_params, TINY, max_batch=3, max_len=64, decode_chunk=8, forward_fn=forward_keeping_extra)
    engine.start()  # the scheduler settles (no chunk in flight) once both are done
    a = engine.submit([9, 8, 7], max_tokens=20, temperature=0.0)  # still running when b joins: b takes slot 1
    b = engine.submit([1, 2, 3, 4, 5], max_tokens=5, temperature=0.0)
    ta, tb = [o.token for o in a], [o.token for o in b]
    _wait(lambda: engine.busy_slots == 0 and engine._inflight is None)
    cache = engine._state["cache"]
    # each slot's prev_token is the last token it fed (every emitted token is fed back), 'pos' what it holds;
    # the third slot was never used
    assert np.asarray(cache["prev_token"]).tolist() == [ta[-1], tb[-1], 0]
    assert np.asarray(cache["pos"]).tolist() == [3 + 20, 5 + 5, 0]
    extra = np.asarray(cache["extra"])  # the unknown entry went through prefill and decode, slot by slot
    assert extra.shape == (3, 2) and (extra[:2] > 0).all() and (extra[2] == 0).all()
    assert ta == naive_greedy(tiny_params, TINY, [9, 8, 7], 20)
    engine.close()


def test_failing_prefill_ends_the_request_with_the_error(tiny_params):
    """An engine failure while a request is being admitted reaches that request (and the queue): no hang."""
    def broken_forward(params, config, idx, kv_cache=None, valid_len=None, **kw):
        raise KeyError("no such cache key")

    engine = Engine(tiny_params, TINY, max_batch=2, max_len=64, decode_chunk=8, forward_fn=broken_forward)
    a = engine.submit([9, 8, 7], max_tokens=4, temperature=0.0)
    with pytest.raises(KeyError):
        list(a)
    with pytest.raises(KeyError):
        engine.generate_batch([1, 2], max_tokens=4)  # the synchronous path raises it too


def test_sharded_engine_equals_single_device(tiny_params):
    """One engine whose slots are split over 8 devices (params replicated) gives the single-device greedy ids."""
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 17, 40, 9, 25, 5, 30, 12, 8, 50)]
    outs = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        engine = Engine(tiny_params, TINY, max_batch=8, max_len=96, decode_chunk=8, devices=devices)
        reqs = [engine.submit(p, max_tokens=20, temperature=0.0) for p in prompts]  # two wait for a slot
        outs.append([[o.token for o in r] for r in reqs])
        assert all(len(k.sharding.device_set) == len(devices) for k in engine._state["cache"]["k"])
        engine.close()
    assert outs[0] == outs[1]
    assert outs[0][2] == naive_greedy(tiny_params, TINY, prompts[2], 20)
    # engine_programs: the engine's own jitted programs, lowered and compiled from shapes alone (params, state and
    # requests as ShapeDtypeStructs carrying the mesh's shardings), as --compile-for does for described GPUs
    from jaxchat.engine import SMALL_TOP_K, _program, engine_programs

    progs = engine_programs(TINY, engine.spec.mesh, 8, 96, prompt_len=20, decode_chunk=8)
    assert progs["decode"][0] is _program(engine.spec, "decode", None, SMALL_TOP_K, False)
    assert progs["prefill"][1][1].shape == (1, 32)  # the prompt's bucket
    state = progs["insert"][1][0]
    assert all(k.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")) for k in state["cache"]["k"])
    for name, (fn, args) in progs.items():
        assert fn.lower(*args).compile() is not None, name


def test_infer_bench_prints_sweep_json(capsys):
    from evals import infer_bench
    payload = infer_bench.main(["--random-init", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32",
                                "--vocab-size", "256", "--max-seq-len", "64", "--window-pattern", "L",
                                "--prompt-len", "8", "--decode-tokens", "6", "--batch-sizes", "1,2", "--repeats", "1",
                                "--decode-chunk", "2"])  # several chunks: tokens arrive over time
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(payload))
    assert [r["batch_size"] for r in last["sweep"]] == [1, 2]
    assert last["sweep"][0]["step_vs_batch1"] == 1.0 and last["sweep"][1]["step_vs_batch1"] > 0
    for row in last["sweep"]:
        assert set(row) == {"batch_size", "ttft_sec", "tpot_sec", "tok_per_sec", "step_vs_batch1",
                            "mbu_percent", "mfu_percent", "peak_memory_bytes", "decode_steps", "prefill_tok_per_sec",
                            "ms_per_token", "mbu"}
        assert row["tok_per_sec"] > 0 and row["prefill_tok_per_sec"] > 0 and row["decode_steps"] == 6
        assert row["tok_per_sec"] == pytest.approx(row["batch_size"] / row["tpot_sec"], rel=1e-2)
        assert row["mbu"] is None and row["mbu_percent"] is None and row["mfu_percent"] is None  # CPU: peaks unknown
        assert row["peak_memory_bytes"] > 0
    assert last["prefill"]["tok_per_sec"] > 0 and last["decode_flops_per_token"] > 0

