"""Hashed bigram embeddings against nanochat's bigram speedrun branch (commit 412e9a1) at bigram_embed_factor=5.

Reference: tests/fixtures/nanochat-bigram-tiny/active, copied from ../shared/reference/nanochat-bigram-tiny (PyTorch
CPU, float32): the tiny model (n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab 256, window "SL") with every weight
non-zero, including bigram_embed (1280, 64) ~ N(0, 0.5) and bigram_lambdas ~ U(0.05, 0.3). Files: the hashed ids,
logits and loss of a (2, 64) batch, the grads, one `MuonAdamW.step()` from `setup_optimizer(weight_decay=0.2,
muon_plus=True, muon_eq_axis=1)`, a greedy KV-cache decode with its per-step logits, and nanochat's checkpoint.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxchat.checkpoint import from_nanochat, to_nanochat
from jaxchat.engine import Engine
from jaxchat.model import (GPTConfig, bigram_hash, estimate_flops, forward, init_kv_cache, init_params, loss_fn,
                           num_scaling_params)
from jaxchat.optim import make_optimizer, param_labels

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-bigram-tiny" / "active"
BASE = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
CONFIG = GPTConfig(**{**BASE.to_dict(), "bigram_embed_factor": 5})
EPS32 = float(np.finfo(np.float32).eps)

# Logits: |logit| <= 15 (softcap); every value comes out of float32 matmuls reducing over n <= 256 through 3 blocks,
# each step adding ~eps32 * sqrt(n) relative error: 15 * 3 layers * 4 matmuls * eps32 * 16 ~ 1.4e-5. The brief's
# bound 2e-4 is that with a 15x margin for the different summation orders of XLA and oneDNN (AMD EPYC, Intel AMX).
LOGITS_ATOL = 2e-4
# AdamW after one step: ~ lr * few ulps (see tests/test_parity_head.py); bound 1e-5.
ADAMW_ATOL = 1e-5
# Muon with ns_dtype float32: per-matrix update cosine >= 0.999 (the brief; measured >= 0.9999999).
MUON_COS = 0.999


@pytest.fixture(scope="module")
def ref():
    params = from_nanochat(dict(np.load(FIXTURE / "params.npz")), CONFIG)
    return {"params": params, "io": dict(np.load(FIXTURE / "io.npz")),
            "greedy": json.loads((FIXTURE / "greedy.json").read_text())}


def test_hash_matches_nanochat(ref):
    io, greedy = ref["io"], ref["greedy"]
    assert int(io["bigram_vocab_size"]) == CONFIG.bigram_vocab_size == 1280
    idx = jnp.asarray(io["idx"])
    prev = jnp.concatenate([jnp.zeros_like(idx[:, :1]), idx[:, :-1]], axis=1)
    has_prev = jnp.arange(idx.shape[1])[None] > 0
    np.testing.assert_array_equal(bigram_hash(idx, prev, has_prev, 1280), io["bigram_idx"])
    seq = jnp.asarray([greedy["prompt"] + greedy["engine"]])
    prev = jnp.concatenate([jnp.zeros_like(seq[:, :1]), seq[:, :-1]], axis=1)
    got = bigram_hash(seq, prev, jnp.arange(seq.shape[1])[None] > 0, 1280)
    np.testing.assert_array_equal(got[0], greedy["bigram_idx_prompt_and_decode"])
    # int32 wrap-around and the non-negative remainder: 36313 * 60000 overflows int32 (nanochat computes in int32)
    big = jnp.asarray([[60000, 59999]], jnp.int32)
    wrap32 = lambda v: (v + 2**31) % 2**32 - 2**31  # noqa: E731
    want = (wrap32(36313 * 59999) ^ wrap32(27191 * 60000)) % 1279  # Python's % is non-negative, as torch's
    assert wrap32(36313 * 59999) != 36313 * 59999  # the product does wrap
    got = bigram_hash(big, jnp.asarray([[0, 60000]]), jnp.asarray([[False, True]]), 1280)
    assert got.tolist() == [[1279, want]]


def test_logits_loss_and_grads_match_nanochat(ref):
    io = ref["io"]
    logits = jax.jit(forward, static_argnums=1)(ref["params"], CONFIG, jnp.asarray(io["idx"]))
    np.testing.assert_allclose(np.asarray(logits), io["logits"], atol=LOGITS_ATOL, rtol=0)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(
        ref["params"], CONFIG, jnp.asarray(io["idx"]), jnp.asarray(io["targets"]))
    # the mean of 100+ per-token losses of size ~8.5: a few eps32 relative
    assert float(loss) == pytest.approx(float(io["loss"]), rel=1e-5)
    ref_grads = dict(np.load(FIXTURE / "grads.npz"))
    got = to_nanochat(grads, CONFIG)
    for key in ("bigram_embed.weight", "bigram_lambdas"):
        g, r = got[key], ref_grads[key]
        # grads are sums over the batch of products of float32 activations: relative to the largest element,
        # a few eps32 * sqrt(128 tokens) ~ 1e-5; bound 1e-4 of max |grad|
        np.testing.assert_allclose(g, r, atol=1e-4 * np.abs(r).max(), rtol=0, err_msg=key)
    # A row gets a gradient exactly when some position t looks it up and a valid target sits at t or later
    # (causal): the rest of the table, and rows seen only before ignored targets, get exactly zero.
    later_valid = np.flip(np.maximum.accumulate(np.flip(io["targets"] >= 0, axis=1), axis=1), axis=1)
    rows_live = np.unique(io["bigram_idx"][later_valid])
    has_grad = np.abs(got["bigram_embed.weight"]).sum(axis=1) > 0
    np.testing.assert_array_equal(np.flatnonzero(has_grad), rows_live)


def test_one_optimizer_step_matches_nanochat(ref):
    params = ref["params"]
    grads = from_nanochat(dict(np.load(FIXTURE / "grads.npz")), CONFIG)
    labels = jax.tree.leaves(param_labels({k: params[k] for k in ("bigram_embed", "bigram_lambdas")}))
    assert labels == ["bigram_embed", "bigram_lambdas"]
    tx = make_optimizer(params, CONFIG, weight_decay=0.2, ns_dtype=jnp.dtype(jnp.float32), muon_eq="row",
                        muon_plus=True)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = to_nanochat(optax.apply_updates(params, updates), CONFIG)
    after, before = dict(np.load(FIXTURE / "after_step.npz")), dict(np.load(FIXTURE / "params.npz"))
    assert set(new) == set(after)
    for key in after:
        if key.startswith("transformer.h."):
            du, dr = (new[key] - before[key]).astype(np.float64), (after[key] - before[key]).astype(np.float64)
            cos = (du * dr).sum() / (np.linalg.norm(du) * np.linalg.norm(dr))
            assert cos >= MUON_COS, (key, cos)
        else:  # AdamW, including the two bigram groups (lr 0.6928 / 0.01386, betas, weight decay)
            np.testing.assert_allclose(new[key], after[key], atol=ADAMW_ATOL, rtol=0, err_msg=key)
    # Step 1 of Adam: p <- p (1 - lr wd) - lr sign(g) where the grad is well above eps, so the table's rows move by
    # exactly lr = embedding_lr * (64/768)^-0.5 after the decay is taken out (wd 0.01)
    lr = 0.2 * (64 / 768) ** -0.5
    adam = new["bigram_embed.weight"] - before["bigram_embed.weight"] * (1 - lr * 0.01)
    assert np.abs(adam).max() == pytest.approx(lr, rel=1e-5)


def test_engine_greedy_decode_matches_nanochat(ref):
    """The KV-cache decode must hash each new token with the previous one from the cache: from the prefill into the
    first decode step and across decode chunks (decode_chunk=8: 4 chunks). Ignoring it changes nanochat's greedy
    ids from the 8th on (the fixtures' manifest)."""
    greedy = ref["greedy"]
    step_logits = np.load(FIXTURE / "greedy_logits.npz")["engine_step_logits"]
    from test_engine import engine_step_logits

    engine = Engine(ref["params"], CONFIG, max_len=96, decode_chunk=8)
    ids, logits = engine_step_logits(engine, greedy["prompt"], greedy["max_tokens"])
    assert ids == greedy["engine"]
    seqs, _ = engine.generate_batch(greedy["prompt"], max_tokens=greedy["max_tokens"], temperature=0.0)
    assert seqs[0][len(greedy["prompt"]):] == greedy["engine"]  # and across decode chunks (8 tokens each)
    np.testing.assert_allclose(logits, step_logits, atol=LOGITS_ATOL, rtol=0)


def test_cache_carries_prev_token_through_chunked_prefill(ref):
    """Two cached calls (40 then 24 tokens of row-dependent lengths via valid_len) equal one full forward: the
    second chunk's first token pairs with the cache's prev_token, which is the last *real* token of the first."""
    idx = jnp.asarray(ref["io"]["idx"])
    full = jax.jit(forward, static_argnums=1)(ref["params"], CONFIG, idx)
    step = jax.jit(forward, static_argnums=1)
    cache = init_kv_cache(CONFIG, 2, 64)
    assert cache["prev_token"].shape == (2,) and cache["prev_token"].dtype == jnp.int32
    lens = jnp.asarray([40, 33], jnp.int32)
    first = jnp.where(jnp.arange(40)[None] < lens[:, None], idx[:, :40], 0)  # row 1 right-padded after 33
    l1, cache = step(ref["params"], CONFIG, first, kv_cache=cache, valid_len=lens)
    np.testing.assert_array_equal(cache["prev_token"], [idx[0, 39], idx[1, 32]])
    rest = jnp.stack([idx[0, 40:64], idx[1, 33:57]])
    l2, cache = step(ref["params"], CONFIG, rest, kv_cache=cache)
    np.testing.assert_allclose(l1[0], full[0, :40], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(l2[0], full[0, 40:], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(l2[1], full[1, 33:57], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_array_equal(cache["prev_token"], [idx[0, 63], idx[1, 56]])


def test_init_counts_and_flops():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    assert params["bigram_embed"].shape == (1280, 64) and not np.asarray(params["bigram_embed"]).any()
    np.testing.assert_array_equal(params["bigram_lambdas"], np.full(3, 0.05, np.float32))
    assert "bigram_embed" not in init_params(BASE, jax.random.PRNGKey(0))
    counts, ref_sd = num_scaling_params(CONFIG), np.load(FIXTURE / "params.npz")
    assert counts["total"] == sum(ref_sd[k].size for k in ref_sd.files)
    assert counts["bigram_embed"] == 1280 * 64 and num_scaling_params(BASE)["bigram_embed"] == 0
    assert counts["scalars"] == num_scaling_params(BASE)["scalars"] + 3  # bigram_lambdas count as scalars
    assert estimate_flops(CONFIG) == estimate_flops(BASE)  # a lookup and a scaled add: no matmul FLOPs
    with pytest.raises(ValueError, match="bigram_embed_factor"):
        GPTConfig(**{**BASE.to_dict(), "bigram_embed_factor": -1})


def test_nanochat_checkpoint_converts_both_ways(tmp_path, ref):
    torch = pytest.importorskip("torch")
    from jaxchat.convert import read_nanochat, write_nanochat
    src = FIXTURE / "base_checkpoints" / "d3"
    config, params, meta, step = read_nanochat(str(src))
    assert config == CONFIG and step == 0
    for key, value in to_nanochat(params, config).items():
        np.testing.assert_array_equal(value, np.load(FIXTURE / "params.npz")[key], err_msg=key)
    write_nanochat(str(tmp_path), step, params, config, meta)
    a = torch.load(src / "model_000000.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "model_000000.pt", map_location="cpu", weights_only=True)
    assert set(a) == set(b) and "bigram_embed.weight" in b and "bigram_lambdas" in b
    for key in a:
        assert torch.equal(a[key].float(), b[key]), key
    model_config = json.loads((tmp_path / "meta_000000.json").read_text())["model_config"]
    assert model_config["bigram_embed_factor"] == 5 and model_config["bigram_lambda_init"] == 0.05


def test_bigram_table_and_its_moments_are_sharded_like_wte():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from jax.sharding import PartitionSpec as P
    from jaxchat import sharding as shd
    from jaxchat.model import param_shapes
    from jaxchat.optim import group_state
    mesh = shd.make_mesh(fsdp=8)
    shapes = param_shapes(CONFIG)
    specs = shd.param_shardings(shapes, mesh)
    assert specs["bigram_embed"].spec == specs["wte"].spec == P("fsdp")  # 1280 rows split over 8
    assert specs["bigram_lambdas"].spec == P()
    tx = make_optimizer(shapes, CONFIG, stack_multiple=mesh.size, muon_update_fn=shd.sharded_muon_update(mesh))
    state = jax.eval_shape(tx.init, shapes)
    adam = group_state(shd.opt_state_shardings(state, mesh), "bigram_embed")
    assert adam.mu["bigram_embed"].spec == P(("data", "fsdp"))
