"""The model against nanochat's own outputs (tests/fixtures/nanochat-tiny, from nanochat 5019acc in float32).

Tolerances come from tests/tolerances.py: `tol(dtype, n, scale) = 2 * eps(dtype) * sqrt(n) * scale`, n the longest
reduction behind one compared value (for the forward, `gpt_reduction_len`: 1840 products per logit at T=64) and
scale the magnitude of the reference. Logits at T=64: 2 * 1.19e-7 * sqrt(1840) * 9.0 = 9.2e-5 (observed on AMD EPYC:
4.3e-6); gradients 2.7e-7 to 3.7e-6 per tensor (observed <= 1.6e-7).
"""

import dataclasses
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
from tolerances import assert_close, eps, gpt_reduction_len, sample_std_tol, tol

TINY = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
SCENARIOS = [NANOCHAT_TINY, os.path.join(NANOCHAT_TINY, "active")]
F32 = jnp.float32
N_LOGIT = gpt_reduction_len(TINY, 64)  # the io.npz inputs are (2, 64)
N_LOSS = N_LOGIT + TINY.vocab_size  # + the log-sum-exp over the vocabulary


def load_scenario(d):
    return from_nanochat(dict(np.load(os.path.join(d, "params.npz"))), TINY)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["init", "active"])
def test_logits_and_loss_match_nanochat(scenario):
    params = load_scenario(scenario)
    io = np.load(os.path.join(scenario, "io.npz"))
    logits = forward(params, TINY, jnp.asarray(io["idx"]))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 64, 256)
    assert_close(logits, io["logits"], F32, N_LOGIT)
    loss = loss_fn(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]))
    # the mean over the 128 targets adds a reduction of 128 non-negative terms of size |loss|
    assert abs(float(loss) - float(io["loss"])) < tol(F32, N_LOSS + 128, float(io["loss"]))
    per_token = loss_fn(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]), reduction="none")
    assert_close(per_token, io["loss_per_token"], F32, N_LOSS)
    assert np.all(np.asarray(per_token)[io["targets"] < 0] == 0)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["init", "active"])
def test_sliding_window_matches_nanochat(scenario):
    # With T=256 the short window (128) of layer 0 really cuts the context.
    params = load_scenario(scenario)
    io = np.load(os.path.join(scenario, "io_window.npz"))
    assert [tuple(w) for w in io["window_sizes"]] == [(w, 0) for w in TINY.window_sizes]
    logits = jax.jit(forward, static_argnums=1)(params, TINY, jnp.asarray(io["idx"]))
    n_logit = gpt_reduction_len(TINY, io["idx"].shape[1])
    assert_close(logits, io["logits"], F32, n_logit)
    loss = loss_fn(params, TINY, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]))
    n_loss = n_logit + TINY.vocab_size + io["targets"].size
    assert abs(float(loss) - float(io["loss"])) < tol(F32, n_loss, float(io["loss"]))


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
    # backward retraces the forward path and each weight's gradient sums over the B*T tokens; a scalar's (the
    # lambdas) over B*T*n_embd: n = 2 * N_LOSS + B*T*n_embd bounds them all
    n_grad = 2 * N_LOSS + io["idx"].size * TINY.n_embd
    for k in ref.files:
        assert_close(ours[k], ref[k], F32, n_grad, err_msg=k)


def test_chunked_loss_equals_full():
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    idx, tgt = jnp.asarray(io["idx"]), jnp.asarray(io["targets"])
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 4, 5))
    full, g_full = value_and_grad(params, TINY, idx, tgt, "mean", 10_000)
    chunked, g_chunk = value_and_grad(params, TINY, idx, tgt, "mean", 16)
    # only the loss's reduction is regrouped: the 128 tokens' losses (and their gradient contributions) are summed
    # chunk by chunk, and the chunks' head matmuls (n_embd) and log-sum-exps (vocab) may be blocked differently
    n_chunking = idx.size + TINY.n_embd + TINY.vocab_size
    assert abs(float(full) - float(chunked)) < tol(F32, n_chunking, float(full))
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_chunk)):
        assert_close(b, a, F32, n_chunking)


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
    assert_close(np.concatenate([np.asarray(o) for o in outs], 1), io["logits"], F32, N_LOGIT)
    assert cache["pos"].tolist() == [64, 64]


def test_kv_cache_cut_to_the_filled_positions():
    # Decoding with the k, v of a 128-position cache cut to their first 32 or 64 positions (as the engine's decode
    # chunks carry them), each result written back, gives the nanochat logits of the full forward and the same
    # cache: the cut only narrows what attention reads.
    d = SCENARIOS[1]
    params = load_scenario(d)
    io = np.load(os.path.join(d, "io.npz"))
    idx = jnp.asarray(io["idx"])
    step = jax.jit(forward, static_argnums=1)

    def cut(cache, n):
        return dict(cache, k=[c[:, :n] for c in cache["k"]], v=[c[:, :n] for c in cache["v"]])

    def write_back(cache, part):
        put = lambda c, p: c.at[:, :p.shape[1]].set(p)  # noqa: E731
        return dict(part, k=list(map(put, cache["k"], part["k"])), v=list(map(put, cache["v"], part["v"])))

    cache = init_kv_cache(TINY, 2, 128)
    logits, part = step(params, TINY, idx[:, :24], cut(cache, 32))
    cache = write_back(cache, part)
    outs, ref_cache = [logits], step(params, TINY, idx[:, :24], init_kv_cache(TINY, 2, 128))[1]
    for t in range(24, 40):
        logits, part = step(params, TINY, idx[:, t:t + 1], cut(cache, 32 if t < 32 else 64))
        assert part["k"][0].shape[1] == (32 if t < 32 else 64)
        cache = write_back(cache, part)
        ref_cache = step(params, TINY, idx[:, t:t + 1], ref_cache)[1]
        outs.append(logits)
    # attending to 32 or 64 instead of 128 positions only shortens the softmax sums over masked (zero) terms
    assert_close(np.concatenate([np.asarray(o) for o in outs], 1), io["logits"][:, :40], F32,
                 gpt_reduction_len(TINY, 128))
    # k and v of layer l come out of the l blocks before it (and the c_k/c_v projection); the deepest is the last
    n_kv = gpt_reduction_len(dataclasses.replace(TINY, n_layer=TINY.n_layer - 1), 128)
    for key in ("k", "v"):
        assert_close(cache[key], ref_cache[key], F32, n_kv, err_msg=key)
    assert cache["pos"].tolist() == ref_cache["pos"].tolist() == [40, 40]
    assert_close(cache["prev_embd"], ref_cache["prev_embd"], F32, TINY.n_embd)  # an embedding and its RMS norm


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
    assert_close(np.concatenate([np.asarray(o) for o in outs], 1), io["logits"][:1, :30], F32, N_LOGIT)


def test_init_statistics_match_nanochat_d12():
    # nanochat init_weights() at d12 width (n_embd 768, 12 layers; a small vocab keeps it fast): std and range per tensor.
    cfg = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=12, n_head=6, n_kv_head=6, n_embd=768)
    params = init_params(cfg, jax.random.PRNGKey(0))
    s = math.sqrt(3) / math.sqrt(768)
    std = lambda a: float(np.std(np.asarray(a, np.float64)))  # noqa: E731  (float64: no rounding in the statistic)

    def std_ok(a, sigma):  # within 6 standard errors of the sample std of a.size draws
        return abs(std(a) - sigma) < sample_std_tol(sigma, a.size)

    in_range = 1 + 2 * eps(F32)  # U(-b, b) drawn in float32 may land one rounding past b
    assert std_ok(params["wte"], 0.8)
    assert std_ok(params["lm_head"], 0.001)
    for block in params["h"]:
        for name in ("c_q", "c_k", "c_v"):
            w = block["attn"][name]
            assert std_ok(w, 768 ** -0.5) and float(jnp.abs(w).max()) <= s * in_range
        assert std_ok(block["mlp"]["c_fc"], 0.4 * 768 ** -0.5)
        assert float(jnp.abs(block["mlp"]["c_fc"]).max()) <= 0.4 * s * in_range
        assert not jnp.any(block["attn"]["c_proj"]) and not jnp.any(block["mlp"]["c_proj"])
        if "ve_gate" in block["attn"]:
            g = block["attn"]["ve_gate"]
            assert float(g.min()) >= 0 and float(g.max()) <= 0.02
    assert sorted(params["value_embeds"], key=int) == [str(i) for i in range(1, 12, 2)]  # alternating, last layer included
    for ve in params["value_embeds"].values():
        assert std_ok(ve, 768 ** -0.5)
    # a + b * frac in float32: two roundings of values <= 1.15
    np.testing.assert_allclose(np.asarray(params["resid_lambdas"])[[0, -1]], [1.15, 1.05], atol=tol(F32, 2, 1.15))
    np.testing.assert_allclose(np.asarray(params["x0_lambdas"])[[0, -1]], [0.20, 0.05], atol=tol(F32, 2, 0.20))
    assert float(params["smear_lambda"][0]) == 0.0 and abs(float(params["backout_lambda"][0]) - 0.2) < tol(F32, 1, 0.2)
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
    # bfloat16 operands, float32 accumulation: the error comes from rounding activations and weights to bfloat16,
    # about 6 roundings per block (x before q/k/v, attention output, x before c_fc, the MLP hidden, ...) + the head's
    # input; measured: mean 0.018 against tol 0.13; a negated lm_head gives 3.8
    n_roundings = 6 * TINY.n_layer + 1
    assert err.mean() < tol(jnp.bfloat16, n_roundings, np.abs(io["logits"]).mean()) and np.isfinite(err).all()


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
