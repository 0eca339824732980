"""Prompt scoring (`jaxchat/scoring.py`, run as the engine's "score" program by `Engine.score`): per-token
log-probabilities and top-N in one padded forward, against a direct float32 log_softmax of the model's logits for
each sequence alone (nanochat-tiny's active weights, so every part of the model moves the logits)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import scoring
from jaxchat.checkpoint import from_nanochat
from jaxchat.engine import TOP_LOGPROBS, Engine, _program
from jaxchat.model import SOFTCAP, GPTConfig, forward
from jaxchat.scoring import MIN_LEN, bucket_shape

from conftest import NANOCHAT_TINY
from tolerances import gpt_reduction_len, tol

_forward = jax.jit(forward, static_argnums=1)
TINY = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


@pytest.fixture(scope="module")
def params():
    return from_nanochat(dict(np.load(os.path.join(NANOCHAT_TINY, "active", "params.npz"))), TINY)


@pytest.fixture(scope="module")
def engine(params):
    e = Engine(params, TINY, max_batch=4, max_len=96)
    yield e
    e.close()


def _direct_logprobs(params, seq):
    """float32 log_softmax of the logits of this sequence alone, unpadded: (T, V)."""
    logits = _forward(params, TINY, jnp.asarray([seq], jnp.int32))[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def _tolerance(seq_len, logprobs):
    """A logprob is logit - logsumexp(logits). The padded batch and the lone sequence differ only in rounding: each
    logit by at most tol(f32, gpt_reduction_len, |logit| <= SOFTCAP), the logsumexp by at most the largest logit
    change (its gradient, the softmax, sums to 1) plus its own sum of vocab_size exps, scaled by |logsumexp|."""
    lse = float(np.max(np.abs(logprobs)))  # |logit - lse| <= SOFTCAP + |lse|: a safe scale for the lse term
    return 2 * tol(jnp.float32, gpt_reduction_len(TINY, seq_len), SOFTCAP) + tol(jnp.float32, TINY.vocab_size, lse)


def test_bucket_shapes_are_powers_of_two_within_the_context():
    assert bucket_shape(1, 1, 256) == (1, MIN_LEN)
    assert bucket_shape(3, 17, 256) == (4, 32)
    assert bucket_shape(8, 64, 256) == (8, 64)
    assert bucket_shape(5, 200, 256) == (8, 256)
    assert bucket_shape(2, 200, 200) == (2, 200)  # a context that is not a power of two caps the bucket
    assert bucket_shape(3, 17, 256, multiple=8) == (8, 32) and bucket_shape(9, 17, 256, multiple=6) == (18, 32)
    for bad in ((0, 5, 256), (2, 0, 256), (2, 257, 256)):
        with pytest.raises(ValueError):
            bucket_shape(*bad)


def test_logprobs_and_top_match_a_direct_log_softmax(params, engine):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (1, 9, 70)]  # bucket (4, 128)
    top_n = 5
    scored = engine.score(sequences, top_n=top_n)
    assert len(scored) == len(sequences)
    for seq, s in zip(sequences, scored):
        ref = _direct_logprobs(params, seq)  # (T, V)
        atol = _tolerance(len(seq), ref)
        n = len(seq)
        assert len(s.token_logprobs) == len(s.top) == n and s.token_logprobs[0] is None and s.top[0] is None
        want = [ref[t - 1, seq[t]] for t in range(1, n)]
        np.testing.assert_allclose(s.token_logprobs[1:], want, atol=atol, rtol=0)
        for t in range(1, n + 1):
            got = s.top[t] if t < n else s.next_top
            order = np.argsort(-ref[t - 1], kind="stable")[:top_n]
            assert [i for i, _ in got] == order.tolist()
            np.testing.assert_allclose([v for _, v in got], ref[t - 1, order], atol=atol, rtol=0)
            assert all(a >= b for (_, a), (_, b) in zip(got, got[1:]))


def test_greedy_token_logprob_equals_its_top_value_exactly(engine):
    """lm-eval's is_greedy is `token_logprob == max(top_logprobs.values())`: the two must be the same float."""
    seq = [7, 42, 100, 3]
    for _ in range(6):  # extend greedily: every appended token is the argmax at its position
        seq.append(engine.score([seq], top_n=1)[0].next_top[0][0])
    s = engine.score([seq, [1, 2, 3]], top_n=1)[0]
    for t in range(4, len(seq)):
        assert s.top[t][0][0] == seq[t] and s.token_logprobs[t] == s.top[t][0][1]


def test_one_compiled_program_per_bucket_and_top_n_zero(engine):
    program = _program(engine.spec, "score")
    program.clear_cache()
    engine.score([[1, 2, 3], [4, 5]], top_n=0)
    out = engine.score([[9] * 14, [4, 5, 6]], top_n=0)  # same (2, 16) bucket, same program
    assert program._cache_size() == 1
    assert out[0].top[1] == [] and out[0].next_top == [] and len(out[0].token_logprobs) == 14
    engine.score([[1] * 17], top_n=0)  # (1, 32): a new bucket
    assert program._cache_size() == 2


def test_rows_past_the_cache_budget_split_into_several_forwards(params, engine, monkeypatch):
    """At most max_batch x max_len positions per forward (4 x 96 here: 6 rows of 64), the results as one forward."""
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (40, 64, 40, 40, 40, 40, 40, 64)]
    calls, real_pack = [], scoring.pack

    def pack(part, shape):
        calls.append(shape)
        return real_pack(part, shape)

    monkeypatch.setattr(scoring, "pack", pack)
    scored = engine.score(sequences, top_n=2)
    assert calls == [(8, 64), (2, 64)]  # groups of 6 and 2 rows, each padded to a power of two
    for seq, s in zip(sequences, scored):
        ref = _direct_logprobs(params, seq)
        np.testing.assert_allclose(s.token_logprobs[1:], [ref[t - 1, seq[t]] for t in range(1, len(seq))],
                                   atol=_tolerance(len(seq), ref), rtol=0)


def test_rows_split_over_8_devices_equal_one_device(params, engine):
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    sharded = Engine(params, TINY, max_batch=8, max_len=96, devices=jax.devices()[:8])
    rng = np.random.default_rng(2)
    sequences = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (5, 30, 12)]  # rows padded 4 -> 8
    one, eight = engine.score(sequences, top_n=3), sharded.score(sequences, top_n=3)
    atol = _tolerance(32, _direct_logprobs(params, sequences[1]))
    for a, b in zip(one, eight):
        np.testing.assert_allclose(a.token_logprobs[1:], b.token_logprobs[1:], atol=atol, rtol=0)
        assert [i for i, _ in a.next_top] == [i for i, _ in b.next_top]


@pytest.mark.parametrize("sequences, top_n, match", [
    ([[1, 2]], TOP_LOGPROBS + 1, "top_n"), ([[1, 2]], -1, "top_n"), ([], 1, "at least one"),
    ([[1], []], 1, "at least one token"), ([[1] * 257], 1, "longer than"), ([[1, 256]], 1, "vocab_size"),
    ([[-1]], 1, "vocab_size"),
])
def test_bad_input_is_a_value_error(engine, sequences, top_n, match):
    with pytest.raises(ValueError, match=match):
        engine.score(sequences, top_n=top_n)
