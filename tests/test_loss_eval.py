"""Bits per byte: jaxchat.loss_eval.evaluate_bpb against a direct numpy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxchat.loss_eval import evaluate_bpb
from tolerances import gpt_reduction_len, tol

V = 32


def rel_tol(n_tokens, n_logit=0):
    """Relative tolerance of bpb (tests/tolerances.py): a sum of `n_tokens` non-negative token losses, each a
    log-sum-exp over V logits, each logit behind `n_logit` accumulated products (0 for a table lookup)."""
    return tol(jnp.float32, n_tokens + V + n_logit, 1.0)


def bigram_loss_fn(params, config, idx, targets, reduction="mean"):
    """A bigram 'model' with the jaxchat.model.loss_fn signature: logits = params[idx]."""
    assert reduction == "none"
    logp = jax.nn.log_softmax(params[idx], axis=-1)
    valid = targets >= 0
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0)


def numpy_bpb(logits, targets, token_bytes):
    """sum of -log p(target) over targets >= 0 with token_bytes > 0, divided by ln2 * their bytes."""
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nats, nbytes = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = targets[b, t]
            if y >= 0 and token_bytes[y] > 0:
                nats += -logp[b, t, y]
                nbytes += token_bytes[y]
    return nats / (math.log(2) * nbytes)


def make_data(steps=3, B=8, T=16, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, V, (steps, B, T)).astype(np.int32)
    ys = rng.integers(0, V, (steps, B, T)).astype(np.int32)
    ys[:, 0, :5] = -1                   # ignored targets
    ys[:, 1, 3] = 0                     # token 0 is "special": 0 bytes
    token_bytes = rng.integers(1, 5, V).astype(np.int32)
    token_bytes[0] = 0
    return xs, ys, token_bytes


def test_bpb_matches_numpy_with_ignored_and_special_targets():
    xs, ys, tb = make_data()
    table = np.random.default_rng(1).normal(size=(V, V)).astype(np.float32)
    got = evaluate_bpb(jnp.asarray(table), None, zip(xs, ys), 3, tb, loss_fn=bigram_loss_fn)
    ref = numpy_bpb(np.concatenate([table[x] for x in xs]), np.concatenate(ys), tb)
    assert got == pytest.approx(ref, rel=rel_tol(xs.size))
    # only the first `steps` batches count
    got2 = evaluate_bpb(jnp.asarray(table), None, iter(list(zip(xs, ys))), 2, tb, loss_fn=bigram_loss_fn)
    assert got2 == pytest.approx(numpy_bpb(np.concatenate([table[x] for x in xs[:2]]),
                                           np.concatenate(ys[:2]), tb), rel=rel_tol(xs[:2].size))


def test_bpb_sharded_inputs_give_the_same_number():
    xs, ys, tb = make_data()
    table = jnp.asarray(np.random.default_rng(2).normal(size=(V, V)).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    sharded = [(jax.device_put(x, shard), jax.device_put(y, shard)) for x, y in zip(xs, ys)]
    a = evaluate_bpb(table, None, sharded, 3, tb, loss_fn=bigram_loss_fn)
    b = evaluate_bpb(table, None, zip(xs, ys), 3, tb, loss_fn=bigram_loss_fn)
    assert a == pytest.approx(b, rel=rel_tol(xs.size))


def test_bpb_errors_and_empty():
    xs, ys, tb = make_data(steps=1)
    table = jnp.zeros((V, V))
    with pytest.raises(ValueError, match="ran out after 1 of 2"):
        evaluate_bpb(table, None, zip(xs, ys), 2, tb, loss_fn=bigram_loss_fn)
    with pytest.raises(ValueError, match="steps"):
        evaluate_bpb(table, None, zip(xs, ys), 0, tb, loss_fn=bigram_loss_fn)
    assert evaluate_bpb(table, None, [(xs[0], -np.ones_like(ys[0]))], 1, tb, loss_fn=bigram_loss_fn) == float("inf")
    # uniform model: every counted token costs ln V nats
    got = evaluate_bpb(table, None, zip(xs, ys), 1, tb, loss_fn=bigram_loss_fn)
    counted = (ys[0] >= 0) & (tb[np.maximum(ys[0], 0)] > 0)
    assert got == pytest.approx(counted.sum() * math.log(V) / (math.log(2) * tb[ys[0][counted]].sum()),
                                rel=rel_tol(xs[0].size))


def test_bpb_real_model_matches_direct_computation():
    gpt = pytest.importorskip("jaxchat.model")
    config = gpt.GPTConfig(sequence_len=16, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                           window_pattern="SL")
    params = jax.jit(gpt.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
    xs, ys, tb = make_data(steps=2)
    got = evaluate_bpb(params, config, zip(xs, ys), 2, tb)
    logits = np.concatenate([np.asarray(jax.jit(gpt.forward, static_argnums=1)(params, config, jnp.asarray(x)))
                             for x in xs])
    assert got == pytest.approx(numpy_bpb(logits, np.concatenate(ys), tb),
                                rel=rel_tol(xs.size, gpt_reduction_len(config, xs.shape[-1])))
