"""jaxchat.optim / jaxchat.muon against nanochat's MuonAdamW (reference outputs in tests/fixtures/nanochat-tiny).

The fixtures hold one `MuonAdamW.step()` of nanochat (compiled kernels, float32 params, bf16 Polar Express) from
`setup_optimizer(weight_decay=0.2)` for a tiny model (n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab 256), in two
scenarios: `init` (fresh init: output projections zero) and `active` (all weights non-zero). nanochat 5019acc has no
MuonEq / Muon+, so these tests build the optimizer with `muon_eq="none", muon_plus=False`; nanochat HEAD's recipe
(both on, the default) is checked against its own outputs in tests/test_parity_head.py.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxchat.model import GPTConfig, param_shapes
from jaxchat.muon import MUON_STATIC_ARGS, POLAR_EXPRESS_COEFFS, muon, muon_update_stacked, polar_express
from jaxchat.optim import (get_hparams, group_state, make_optimizer, muon_stack_paths, param_labels, set_hparams)

FIXTURES = Path(__file__).parent / "fixtures" / "nanochat-tiny"
SCENARIOS = {"init": FIXTURES, "active": FIXTURES / "active"}
CONFIG = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


# ---------------------------------------------------------------------------------------------------------------
# nanochat state_dict names <-> jaxchat params paths

def nc_name(path: str) -> str:
    """jaxchat path 'h/0/attn/c_q' -> nanochat key 'transformer.h.0.attn.c_q.weight'."""
    parts = path.split("/")
    if parts[0] == "h":
        return f"transformer.h.{parts[1]}.{parts[2]}.{parts[3]}.weight"
    if parts[0] == "value_embeds":
        return f"value_embeds.{parts[1]}.weight"
    return {"wte": "transformer.wte.weight", "lm_head": "lm_head.weight",
            "smear_gate": "smear_gate.weight"}.get(parts[0], parts[0])


def to_tree(npz) -> dict:
    """A nanochat state_dict (npz) as the jaxchat params pytree."""
    tree = {"h": [{"attn": {}, "mlp": {}} for _ in range(CONFIG.n_layer)], "value_embeds": {}}
    for key in npz.files:
        v, parts = jnp.asarray(npz[key]), key.split(".")
        if parts[:2] == ["transformer", "h"]:
            tree["h"][int(parts[2])][parts[3]][parts[4]] = v
        elif parts[0] == "value_embeds":
            tree["value_embeds"][parts[1]] = v
        else:
            tree[{"transformer.wte.weight": "wte", "lm_head.weight": "lm_head",
                  "smear_gate.weight": "smear_gate"}.get(key, key)] = v
    return tree


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load(scenario):
    d = SCENARIOS[scenario]
    return (to_tree(np.load(d / "params.npz")), to_tree(np.load(d / "grads.npz")),
            dict(np.load(d / "after_step.npz")), dict(np.load(d / "opt_state.npz")))


def cosine(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def opt():
    """The optimizer of nanochat's fixture step (setup_optimizer(weight_decay=0.2), bf16 Polar Express), its Muon
    stacks padded to 8 so they shard over 8 devices, and ONE jitted update shared by the tests (compiles once)."""
    params = load("active")[0]
    tx = make_optimizer(params, CONFIG, weight_decay=0.2, stack_multiple=8, muon_eq="none", muon_plus=False)
    return tx, jax.jit(tx.update)


@pytest.fixture(scope="module")
def steps(opt):
    """One update per scenario from fresh state with nanochat's grads: (new params, state)."""
    tx, update = opt
    out = {}
    for scenario in SCENARIOS:
        params, grads, _, _ = load(scenario)
        updates, state = update(grads, tx.init(params), params)
        out[scenario] = (optax.apply_updates(params, updates), state)
    return out


# ---------------------------------------------------------------------------------------------------------------
# parity with nanochat

@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_step_matches_nanochat(steps, scenario):
    params, _, after, _ = load(scenario)
    new = flat(steps[scenario][0])
    before = flat(params)
    labels = flat(param_labels(params))
    assert set(map(nc_name, new)) == set(after)
    n_muon = 0
    for path, p_new in new.items():
        ref, p0 = after[nc_name(path)], before[path]
        if labels[path] != "muon":
            # AdamW is float32 all the way: same numbers up to round-off. (The init scenario's round-off grads of
            # resid/x0/backout lambdas are fed identically here, so they match too.)
            np.testing.assert_allclose(p_new, ref, atol=1e-5, rtol=0, err_msg=path)
        else:
            n_muon += 1
            du, dr = p_new - p0, ref - p0
            assert np.linalg.norm(dr) > 0, path
            assert cosine(du, dr) >= 0.98, (path, cosine(du, dr))
            ratio = np.linalg.norm(du) / np.linalg.norm(dr)
            assert 0.9 <= ratio <= 1.1, (path, ratio)
    assert n_muon == 3 * 6 + 2  # 6 matrices per block plus 2 ve_gates


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_state_after_step_matches_nanochat(steps, scenario):
    params, _, _, ref = load(scenario)
    state = steps[scenario][1]
    labels = flat(param_labels(params))
    # AdamW moments
    for group in ("lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear"):
        adam = group_state(state, group)
        assert int(adam.count) == 1
        mu, nu = flat(adam.mu), flat(adam.nu)
        paths = [p for p, g in labels.items() if g == group]
        assert paths and set(paths) <= set(mu)
        for path in paths:
            name = nc_name(path)
            np.testing.assert_allclose(mu[path], ref[f"{name}.exp_avg"], rtol=1e-5, atol=1e-12, err_msg=path)
            np.testing.assert_allclose(nu[path], ref[f"{name}.exp_avg_sq"], rtol=1e-5, atol=1e-20, err_msg=path)
    # Muon buffers: map our stack order to nanochat's (listed in opt_hparams.json)
    hp = json.loads((FIXTURES / "opt_hparams.json").read_text())
    ms = group_state(state, "muon")
    stacks = muon_stack_paths(params)
    assert set(stacks) == {"2x12", "32x64", "64x64", "64x256", "256x64"} == set(ms.momentum_buffer)
    for key, paths in stacks.items():
        shape = [int(d) for d in key.split("x")]
        nc_order = next(g["params"] for g in hp["groups"] if g["kind"] == "muon" and g["shapes"][0] == shape)
        perm = [nc_order.index(nc_name(p)) for p in paths]
        ref_mb = ref[f"muon_{key}.momentum_buffer"][perm]
        ref_smb = ref[f"muon_{key}.second_momentum_buffer"][perm]
        mb, smb = np.asarray(ms.momentum_buffer[key]), np.asarray(ms.second_momentum_buffer[key])
        assert mb.shape[0] == 8 and not mb[len(paths):].any() and not smb[len(paths):].any()  # zero padding
        mb, smb = mb[:len(paths)], smb[:len(paths)]
        np.testing.assert_allclose(mb, ref_mb, rtol=1e-6, atol=1e-12)
        assert smb.shape == ref_smb.shape, key
        for k in range(len(paths)):
            if not ref_smb[k].any():  # zero grad (init scenario): nothing to normalise
                np.testing.assert_array_equal(smb[k], 0.0)
                continue
            assert cosine(smb[k], ref_smb[k]) >= 0.98, (key, k)
            assert 0.9 <= smb[k].sum() / ref_smb[k].sum() <= 1.1, (key, k)


# ---------------------------------------------------------------------------------------------------------------
# exact arithmetic: an independent float64 Muon in numpy

def numpy_muon_step(g, p, buf, smb, lr, momentum, wd, beta2, ns_steps=5, eq="none", plus=False):
    """nanochat's Muon step for one (R, C) matrix in float64 (written from the algorithm, for reference); eq / plus
    add MuonEq (row or column) and Muon+ as nanochat HEAD."""
    rows, cols = g.shape
    buf = buf + (1 - momentum) * (g - buf)
    g = g + momentum * (buf - g)
    if eq != "none":
        axis, n = (1, rows) if eq == "row" else (0, cols)
        g = g * (np.linalg.norm(g) / np.sqrt(n)) / np.maximum(np.linalg.norm(g, axis=axis, keepdims=True), 1e-6)
    x = g / (np.linalg.norm(g) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:  # X -> a X + (b A + c A^2) X, A = X X^T, same for tall
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if plus:
        x = x * np.sqrt(min(rows, cols)) / max(np.linalg.norm(x), 1e-6)
    axis = 1 if rows >= cols else 0
    v = (x ** 2).mean(axis=axis, keepdims=True)
    smb = smb + (1 - beta2) * (v - smb)
    scaled = x / np.sqrt(np.maximum(smb, 1e-10))
    u = scaled * (np.linalg.norm(x) / np.linalg.norm(scaled))
    lr = lr * max(1.0, rows / cols) ** 0.5
    return p - lr * u - lr * wd * p * ((u * p) >= 0), buf, smb


@pytest.mark.parametrize("eq, plus", [("none", False), ("row", True), ("col", False)])
def test_muon_float32_matches_float64_reference_and_beats_bf16(eq, plus):
    """Two steps (so momentum and second moment carry over) on the active fixture's matrices with changed
    hyperparameters in between: float32 Polar Express equals the float64 math; bf16 is clearly further off. For
    5019acc's Muon, HEAD's (MuonEq row + Muon+) and the column variant of MuonEq."""
    params, grads, _, _ = load("active")
    rng = np.random.default_rng(0)
    update = jax.jit(muon_update_stacked, static_argnames=("ns_steps", "ns_dtype", "muon_eq", "muon_plus"))
    for path in ("h/0/mlp/c_fc", "h/1/mlp/c_proj"):  # tall (R > C) and wide: both Gram forms, both NorMuon axes
        p = np.asarray(flat(params)[path], np.float64)[None]
        gs = [np.asarray(flat(grads)[path], np.float64)[None]]
        gs.append(gs[0] + 0.5 * np.abs(gs[0]).mean() * rng.normal(size=gs[0].shape))
        hps = [(0.02, 0.95, 0.2), (0.01, 0.85, 0.1)]
        rows, cols = p.shape[1:]
        smb_shape = (1, rows, 1) if rows >= cols else (1, 1, cols)
        ref_p, ref_buf, ref_smb = p[0], np.zeros(p.shape[1:]), np.zeros(smb_shape[1:])
        for g, (lr, mom, wd) in zip(gs, hps):
            ref_p, ref_buf, ref_smb = numpy_muon_step(g[0], ref_p, ref_buf, ref_smb, lr, mom, wd, 0.9, eq=eq, plus=plus)
        errs = {}
        for dtype in (jnp.float32, jnp.bfloat16):
            cur, buf, smb = (jnp.asarray(p, jnp.float32), jnp.zeros(p.shape, jnp.float32),
                             jnp.zeros(smb_shape, jnp.float32))
            for g, (lr, mom, wd) in zip(gs, hps):
                u, buf, smb = update(jnp.asarray(g, jnp.float32), cur, buf, smb, learning_rate=lr, momentum=mom,
                                     weight_decay=wd, beta2=0.9, ns_dtype=dtype, muon_eq=eq, muon_plus=plus)
                cur = cur + u
            delta, ref_delta = np.asarray(cur[0], np.float64) - p[0], ref_p - p[0]
            errs[dtype] = np.linalg.norm(delta - ref_delta) / np.linalg.norm(ref_delta)
            if dtype == jnp.float32:
                np.testing.assert_allclose(np.asarray(buf[0]), ref_buf, rtol=1e-5, atol=1e-9)
                np.testing.assert_allclose(np.asarray(smb[0]), ref_smb, rtol=1e-3, atol=1e-9)
        assert errs[jnp.float32] < 1e-4, (path, errs)
        assert errs[jnp.float32] * 20 < errs[jnp.bfloat16] < 0.1, (path, errs)


# ---------------------------------------------------------------------------------------------------------------
# Polar Express

def _with_singular_values(rng, rows, cols, s):
    u, _ = np.linalg.qr(rng.normal(size=(rows, len(s))))
    v, _ = np.linalg.qr(rng.normal(size=(cols, len(s))))
    return (u * s) @ v.T


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_polar_express_singular_values_in_band(shape, dtype):
    """5 Polar Express steps put every singular value in ~[0.86, 1.14] (they do not converge to exactly 1) for
    matrices conditioned up to 100; tall uses X^T X, wide X X^T."""
    rng = np.random.default_rng(1)
    n = min(shape)
    s = np.exp(rng.uniform(np.log(1e-2), 0, n))
    g = np.stack([_with_singular_values(rng, *shape, s), rng.normal(size=shape)])
    if shape[0] == shape[1]:
        g = g[:1]  # a Gaussian square matrix has singular values near 0, which no polynomial lifts
    x = polar_express(jnp.asarray(g, jnp.float32), 5, dtype)
    assert x.dtype == dtype and x.shape == g.shape
    sv = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    assert sv.min() >= 0.84 and sv.max() <= 1.16, (sv.min(), sv.max())
    # and the singular vectors are the input's: x is close to U V^T
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    assert cosine(np.asarray(x, np.float64), u @ vt) > 0.99


def test_polar_express_tall_is_transpose_of_wide():
    g = jax.random.normal(jax.random.key(0), (2, 48, 16))
    tall = polar_express(g, 5, jnp.float32)
    wide = polar_express(jnp.swapaxes(g, -1, -2), 5, jnp.float32)
    np.testing.assert_allclose(np.asarray(tall), np.swapaxes(np.asarray(wide), -1, -2), atol=1e-5)
    with pytest.raises(ValueError, match="ns_steps"):
        polar_express(g, 6)


# ---------------------------------------------------------------------------------------------------------------
# grouping

def test_groups_of_model_params():
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=4, n_head=2, n_kv_head=1, n_embd=32)
    params = param_shapes(cfg)  # ShapeDtypeStructs: grouping and state layout need no arrays
    labels = flat(param_labels(params))
    for path, label in labels.items():
        top = path.split("/")[0]
        expected = {"h": "muon", "smear_gate": "smear", "smear_lambda": "smear", "backout_lambda": "smear"}.get(top, top)
        assert label == expected, path
    stacks = muon_stack_paths(params)
    assert sorted(p for ps in stacks.values() for p in ps) == sorted(p for p in labels if p.startswith("h/"))
    tx = make_optimizer(params, cfg, stack_multiple=4)
    state = jax.eval_shape(tx.init, params)
    ms = group_state(state, "muon")
    for key, paths in stacks.items():
        rows, cols = (int(d) for d in key.split("x"))
        k = -(-len(paths) // 4) * 4
        assert ms.momentum_buffer[key].shape == (k, rows, cols)
        assert ms.second_momentum_buffer[key].shape == ((k, rows, 1) if rows >= cols else (k, 1, cols))
    assert {k: (v.shape, v.dtype) for k, v in get_hparams(state).items()} == {
        k: ((), jnp.float32) for k in ("lrm", "momentum", "weight_decay")}
    with pytest.raises(ValueError, match="extra"):
        make_optimizer({**params, "extra": jnp.zeros(3)}, cfg)
    with pytest.raises(ValueError, match="2-D"):
        bad = jax.tree.map(lambda x: x, params)
        bad["h"][0]["attn"]["c_q"] = jnp.zeros((2, 3, 4))
        make_optimizer(bad, cfg)
    with pytest.raises(KeyError):
        group_state(state, "nope")


def test_standalone_muon_with_injected_hyperparams():
    params = {"a": jnp.ones((8, 4)) * 0.1, "b": jnp.ones((8, 4)) * -0.1, "c": jnp.eye(4)}
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
    tx = optax.inject_hyperparams(muon, static_args=MUON_STATIC_ARGS)(learning_rate=0.02, weight_decay=0.1)
    state = tx.init(params)
    assert set(state.inner_state.momentum_buffer) == {"8x4", "4x4"}
    assert state.inner_state.momentum_buffer["8x4"].shape == (2, 8, 4)
    update = jax.jit(tx.update)
    u1, _ = update(grads, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)  # same aval: no recompile
    state.hyperparams["weight_decay"] = jnp.asarray(0.0, jnp.float32)
    u2, _ = update(grads, state, params)
    assert update._cache_size() == 1
    assert not np.allclose(np.asarray(u1["a"]), 2 * np.asarray(u2["a"]))  # wd part dropped as well
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, state)


# ---------------------------------------------------------------------------------------------------------------
# jit: hyperparameters without recompiling, sharding

def test_hparams_change_without_recompiling(opt, steps):
    tx, update = opt
    params, grads, _, _ = load("active")
    state0 = tx.init(params)
    assert {k: float(v) for k, v in get_hparams(state0).items()} == pytest.approx(
        {"lrm": 1.0, "momentum": 0.95, "weight_decay": 0.2})
    base, _ = update(grads, state0, params)
    compiled = update._cache_size()
    half, _ = update(grads, set_hparams(state0, lrm=0.5), params)
    zero, _ = update(grads, set_hparams(state0, lrm=0.0, momentum=0.85, weight_decay=0.0), params)
    other, _ = update(grads, set_hparams(state0, momentum=0.85, weight_decay=0.05), params)
    assert update._cache_size() == compiled  # three new hyperparameter sets, no new compilation
    for b, h, z in zip(jax.tree.leaves(base), jax.tree.leaves(half), jax.tree.leaves(zero)):
        np.testing.assert_allclose(np.asarray(h), 0.5 * np.asarray(b), rtol=1e-5, atol=1e-9)
        assert not np.asarray(z).any()
    fb, fo = flat(base), flat(other)
    assert np.array_equal(fb["wte"], fo["wte"])  # momentum / wd are Muon's only
    assert not np.allclose(fb["h/0/attn/c_q"], fo["h/0/attn/c_q"])
    # set inside jit from traced scalars: still one compilation
    traced = jax.jit(lambda s, lrm: set_hparams(s, lrm=lrm))
    traced(state0, 0.3), traced(state0, 0.7)
    assert traced._cache_size() == 1
    with pytest.raises(TypeError):
        set_hparams({"not": "a state"}, lrm=1.0)


def test_sharded_update_equals_single_device(opt, steps):
    """Params, grads and optimizer state sharded over 8 devices (first axis where it divides, so every Muon stack
    is split along K): the jitted update gives the single-device numbers."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    tx, update = opt
    params, grads, _, _ = load("active")
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

    def shard(x):
        spec = P("data") if x.ndim and x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sp, sg, ss = (jax.tree.map(shard, t) for t in (params, grads, tx.init(params)))
    assert group_state(ss, "muon").momentum_buffer["64x64"].sharding.spec == P("data")
    sharded_u, sharded_s = update(sg, ss, sp)
    single_p, single_s = steps["active"]
    for a, b in zip(jax.tree.leaves(single_p), jax.tree.leaves(optax.apply_updates(params, sharded_u))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(single_s), jax.tree.leaves(sharded_s)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-9)
