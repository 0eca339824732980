"""The model against nanochat's own outputs (tests/fixtures/nanochat-tiny, from nanochat 5019acc in float32).

Tolerance: logits, per-token losses and the loss to 1e-4 absolute in float32 on CPU (observed: ~4e-6); gradients
to 1e-5 (observed ~1e-7).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.checkpoint import from_nanochat, to_nanochat
from jaxchat.model import (GPTConfig, estimate_flops, forward, init_kv_cache, init_params, loss_fn,
                           num_scaling_params, param_shapes)

from conftest import NANOCHAT_TINY

TINY = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
SCENARIOS = [NANOCHAT_TINY, os.path.join(NANOCHAT_TINY, "active")]
TOL = 1e-4


def load_scenario(d):
    return from_nanochat(dict(np.load(os.path.join(d, "params.npz"))), TINY)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["init", "active"])
def test_logits_and_loss_match_nanochat(scenario):
    params = load_scenario(scenario)
    io = np.load(os.path.join(scenario, "io.npz"))
    logits = forward(params, TINY, jnp.asarray(io["idx"]))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 64, 256)
    np.testing.assert_allclose(np.asarray(logits), io["logits"], atol=TOL, rtol=0)
    loss = loss_fn(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]))
    assert abs(float(loss) - float(io["loss"])) < TOL
    per_token = loss_fn(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]), reduction="none")
    np.testing.assert_allclose(np.asarray(per_token), io["loss_per_token"], atol=TOL, rtol=0)
    assert np.all(np.asarray(per_token)[io["targets"] < 0] == 0)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["init", "active"])
def test_sliding_window_matches_nanochat(scenario):
    # With T=256 the short window (128) of layer 0 really cuts the context.
    params = load_scenario(scenario)
    io = np.load(os.path.join(scenario, "io_window.npz"))
    assert [tuple(w) for w in io["window_sizes"]] == [(w, 0) for w in TINY.window_sizes]
    logits = jax.jit(forward, static_argnums=1)(params, TINY, jnp.asarray(io["idx"]))
    np.testing.assert_allclose(np.asarray(logits), io["logits"], atol=TOL, rtol=0)
    loss = loss_fn(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]))
    assert abs(float(loss) - float(io["loss"])) < TOL


def test_window_actually_matters():
    # The same weights with an all-long pattern must give different logits on the T=256 input.
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io_window.npz"))
    long_cfg = GPTConfig(**{**TINY.to_dict(), "window_pattern": "L"})
    diff = np.abs(np.asarray(forward(params, long_cfg, jnp.asarray(io["idx"]))) - io["logits"]).max()
    assert diff > 1e-2


def test_grads_match_nanochat_under_jit():
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    grads = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]))
    ref = np.load(os.path.join(d, "grads.npz"))
    ours = to_nanochat(grads, TINY)
    assert set(ours) == set(ref.files)
    for k in ref.files:
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_chunked_loss_equals_full():
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    idx, tgt = jnp.asarray(io["idx"]), jnp.asarray(io["targets"])
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 4, 5))
    full, g_full = value_and_grad(params, TINY, idx, tgt, "mean", 10_000)
    chunked, g_chunk = value_and_grad(params, TINY, idx, tgt, "mean", 16)
    assert abs(float(full) - float(chunked)) < 1e-6
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_chunk)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_kv_cache_prefill_and_decode_match_full_forward():
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    idx = jnp.asarray(io["idx"])
    cache = init_kv_cache(TINY, 2, 64)
    step = jax.jit(forward, static_argnums=1)
    logits, cache = step(params, TINY, idx[:, :40], cache)
    outs = [logits]
    for t in range(40, 64):
        logits, cache = step(params, TINY, idx[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs], 1), io["logits"], atol=TOL, rtol=0)
    assert cache["pos"].tolist() == [64, 64]


def test_kv_cache_attend_len_reads_only_the_filled_positions():
    # Decoding into a 128-position cache while attending to its first 32 or 64 positions gives the nanochat logits
    # of the full forward, and the same cache: attend_len only narrows what attention reads.
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    idx = jnp.asarray(io["idx"])
    step = jax.jit(forward, static_argnums=(1, 5))
    logits, cache = step(params, TINY, idx[:, :24], init_kv_cache(TINY, 2, 128), None, 32)
    outs, ref_cache = [logits], step(params, TINY, idx[:, :24], init_kv_cache(TINY, 2, 128), None, None)[1]
    for t in range(24, 40):
        logits, cache = step(params, TINY, idx[:, t:t + 1], cache, None, 32 if t < 32 else 64)
        ref_cache = step(params, TINY, idx[:, t:t + 1], ref_cache, None, None)[1]
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs], 1), io["logits"][:, :40], atol=TOL,
                               rtol=0)
    for key in ("k", "v", "pos", "prev_embd"):
        np.testing.assert_allclose(np.asarray(cache[key]), np.asarray(ref_cache[key]), atol=1e-6, rtol=0)


def test_kv_cache_right_padded_prefill():
    # A right-padded prefill with valid_len must leave the cache as if only the real tokens had been fed.
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    idx = jnp.asarray(io["idx"][:1])
    n = 11
    padded = jnp.concatenate([idx[:, :n], jnp.zeros((1, 16 - n), jnp.int32)], axis=1)
    step = jax.jit(forward, static_argnums=1)
    cache = init_kv_cache(TINY, 1, 64)
    logits, cache = step(params, TINY, padded, cache, jnp.array([n]))
    assert int(cache["pos"][0]) == n
    outs = [logits[:, :n]]
    for t in range(n, 30):
        logits, cache = step(params, TINY, idx[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs], 1), io["logits"][:1, :30], atol=TOL)


def test_init_statistics_match_nanochat_d12():
    # nanochat init_weights() at d12 width (n_embd 768, 12 layers; a small vocab keeps it fast): std and range per tensor.
    cfg = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=12, n_head=6, n_kv_head=6, n_embd=768)
    params = init_params(cfg, jax.random.PRNGKey(0))
    s = math.sqrt(3) / math.sqrt(768)
    std = lambda a: float(jnp.std(a))  # noqa: E731
    assert abs(std(params["wte"]) - 0.8) < 0.01
    assert abs(std(params["lm_head"]) - 0.001) < 1e-4
    for block in params["h"]:
        for name in ("c_q", "c_k", "c_v"):
            w = block["attn"][name]
            assert abs(std(w) - 768 ** -0.5) < 1e-3 and float(jnp.abs(w).max()) <= s * (1 + 1e-6)
        assert abs(std(block["mlp"]["c_fc"]) - 0.4 * 768 ** -0.5) < 1e-3
        assert float(jnp.abs(block["mlp"]["c_fc"]).max()) <= 0.4 * s * (1 + 1e-6)
        assert not jnp.any(block["attn"]["c_proj"]) and not jnp.any(block["mlp"]["c_proj"])
        if "ve_gate" in block["attn"]:
            g = block["attn"]["ve_gate"]
            assert float(g.min()) >= 0 and float(g.max()) <= 0.02
    assert sorted(params["value_embeds"], key=int) == [str(i) for i in range(1, 12, 2)]  # alternating, last layer included
    for ve in params["value_embeds"].values():
        assert abs(std(ve) - 768 ** -0.5) < 1e-3
    np.testing.assert_allclose(np.asarray(params["resid_lambdas"])[[0, -1]], [1.15, 1.05], atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["x0_lambdas"])[[0, -1]], [0.20, 0.05], atol=1e-6)
    assert float(params["smear_lambda"][0]) == 0.0 and abs(float(params["backout_lambda"][0]) - 0.2) < 1e-7
    assert 0 <= float(params["smear_gate"].min()) and float(params["smear_gate"].max()) <= 0.02
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes == jax.tree_util.tree_map(lambda s: s.shape, param_shapes(cfg))


def test_counts_and_flops_match_nanochat_formulas():
    # The reference d3 model: nanochat's num_scaling_params on the same config, counted from its state_dict.
    ref = np.load(os.path.join(NANOCHAT_TINY, "params.npz"))
    counts = num_scaling_params(TINY)
    assert counts["total"] == sum(ref[k].size for k in ref.files)
    assert counts["transformer_matrices"] == sum(ref[k].size for k in ref.files if k.startswith("transformer.h."))
    assert counts["scalars"] == 3 + 3 + 24 + 1 + 1
    # estimate_flops by hand: 6 * (matmul weights incl. lm_head) + 12*h*q*min(window, seq) per layer.
    matmul = counts["transformer_matrices"] + counts["lm_head"]
    attn = 12 * 4 * 16 * (128 + 256 + 256)
    assert estimate_flops(TINY) == 6 * matmul + attn


def test_bfloat16_forward_close_to_float32(monkeypatch):
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    monkeypatch.setenv("JAXCHAT_DTYPE", "bfloat16")
    logits = jax.jit(forward, static_argnums=1)(params, TINY, jnp.asarray(io["idx"]))
    assert logits.dtype == jnp.float32  # logits stay float32 whatever the compute dtype
    err = np.abs(np.asarray(logits) - io["logits"])
    assert err.mean() < 0.1 and np.isfinite(err).all()


@pytest.mark.parametrize("field,kwargs", [
    ("n_embd", dict(n_embd=65, n_head=4)),
    ("n_kv_head", dict(n_head=4, n_kv_head=3)),
    ("window_pattern", dict(window_pattern="SLX")),
    ("n_layer", dict(n_layer=0)),
])
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY.to_dict(), **kwargs})


def test_sequence_too_long_raises():
    cfg = GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32, window_pattern="L")
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sequence_len"):
        forward(params, cfg, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
def test_attention_backward_equals_autodiff(window):
    # softmax_attention's hand-written backward against JAX differentiating its own XLA attention (GQA: 4 q heads
    # on 2 kv heads).
    from jaxchat.model import softmax_attention
    kq, kk, kv, kr = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, 24, 4, 8))
    k, v = jax.random.normal(kk, (2, 24, 2, 8)), jax.random.normal(kv, (2, 24, 2, 8))
    r = jax.random.normal(kr, (2, 24, 4, 8))
    local = None if window is None else (window, 0)
    ref = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local) * r)
    ours = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, window) * r)
    np.testing.assert_allclose(float(ours(q, k, v)), float(ref(q, k, v)), rtol=1e-5)
    for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(ref, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("n_chunks", [1, 4])
def test_fused_cross_entropy_equals_autodiff(n_chunks):
    # The fused head + loss (gradients computed in the forward pass) against autodiff of the plain per-token loss,
    # with a padded vocabulary (the padded head rows must get zero gradient) and ignored targets.
    from jaxchat.model import _token_losses, softcap_cross_entropy_sum
    cfg = GPTConfig(sequence_len=32, vocab_size=100, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    assert cfg.padded_vocab_size > cfg.vocab_size
    kx, kw, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 32, 32))
    w = jax.random.normal(kw, (cfg.padded_vocab_size, 32)) * 0.5  # large enough that the softcap bends
    targets = jax.random.randint(kt, (2, 32), 0, cfg.vocab_size).at[0, :7].set(-1)
    ref = lambda x, w: jnp.sum(_token_losses({"lm_head": w}, cfg, x, targets))
    ours = lambda x, w: softcap_cross_entropy_sum(x, w, targets, cfg.vocab_size, n_chunks)
    np.testing.assert_allclose(float(ours(x, w)), float(ref(x, w)), rtol=1e-6)
    (gx, gw), (rx, rw) = jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), atol=1e-5)
    assert not np.asarray(gw[cfg.vocab_size:]).any()
    assert not np.asarray(gx[0, :7]).any()  # ignored positions get no gradient


def test_loss_chunks_divide_the_sequence():
    from jaxchat.model import _loss_chunks
    assert _loss_chunks(TINY, 4, 64, None) == 1  # small: one chunk
    assert _loss_chunks(TINY, 4, 64, 64) == 4  # 256 tokens in chunks of <= 64 tokens: 4 slices of T
    assert _loss_chunks(TINY, 4, 60, 64) == 4  # 240 tokens: 4 divides 60
    assert _loss_chunks(TINY, 4, 7, 5) == 7  # no divisor of 7 between 6 and 7 but 7 itself
    assert _loss_chunks(TINY, 4, 8, 1) == 8  # at most one position per chunk
