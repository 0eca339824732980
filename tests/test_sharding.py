"""Mesh, rule tables, sharded Muon, and the sharded train step equal to the one-device one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxchat import model as gpt
from jaxchat import sharding as shd
from jaxchat import trainer as tl
from jaxchat.muon import muon_update_stacked
from jaxchat.optim import make_optimizer

CONFIG = gpt.GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="SL")


def test_make_mesh_spans_all_devices_and_checks_fsdp():
    mesh = shd.make_mesh(2)
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2}
    with pytest.raises(ValueError, match="--fsdp=3"):
        shd.make_mesh(3)


def test_param_rules_shard_big_tables_and_replicate_scalars():
    mesh = shd.make_mesh(2)
    specs = jax.tree.map(lambda s: s.spec, shd.param_shardings(gpt.param_shapes(CONFIG), mesh))
    assert specs["wte"] == P("fsdp") and specs["lm_head"] == P("fsdp")
    assert specs["h"][0]["mlp"]["c_fc"] == P("fsdp")
    assert specs["h"][2]["attn"]["ve_gate"] == P()  # tiny gate: replicated
    assert specs["resid_lambdas"] == P() and specs["smear_lambda"] == P()


def test_spec_for_replicates_dims_the_axes_do_not_divide():
    mesh = shd.make_mesh(1)
    n = mesh.size
    assert shd.spec_for("a/mu/wte", (8 * n, 4), shd.OPT_STATE_RULES, mesh) == P(shd.ZERO_AXES)
    assert shd.spec_for("a/mu/wte", (8 * n + 1, 4), shd.OPT_STATE_RULES, mesh) == P()
    with pytest.raises(ValueError, match="no sharding rule"):
        shd.spec_for("x", (2,), [("^y$", P())], mesh)


def test_opt_state_rules_are_zero1():
    mesh = shd.make_mesh(1)
    abstract = gpt.param_shapes(CONFIG)
    tx = make_optimizer(abstract, CONFIG, stack_multiple=mesh.size)
    sh = shd.opt_state_shardings(jax.eval_shape(tx.init, abstract), mesh)
    flat = {shd.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    muon = [v for k, v in flat.items() if "momentum_buffer" in k]
    assert muon and all(v == P(shd.ZERO_AXES) for v in muon)
    assert flat["inner_state/inner_states/wte/inner_state/0/mu/wte"] == P(shd.ZERO_AXES)
    assert flat["hyperparams/lrm"] == P()


def test_sharded_muon_update_equals_unsharded():
    mesh = shd.make_mesh(1)
    k = mesh.size
    keys = jax.random.split(jax.random.key(0), 3)
    g = jax.random.normal(keys[0], (k, 16, 24))
    p = jax.random.normal(keys[1], (k, 16, 24))
    mb = 0.1 * jax.random.normal(keys[2], (k, 16, 24))
    smb = jnp.full((k, 1, 24), 0.01)
    kw = dict(learning_rate=0.02, momentum=0.9, weight_decay=0.1, beta2=0.9, ns_dtype=jnp.float32)
    want = muon_update_stacked(g, p, mb, smb, **kw)
    got = jax.jit(lambda *a: shd.sharded_muon_update(mesh)(*a, **kw))(g, p, mb, smb)
    assert got[0].addressable_shards[0].data.shape[0] == 1  # each device computed one matrix of the stack
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="stack_multiple"):
        shd.sharded_muon_update(mesh)(g[:k - 1], p[:k - 1], mb[:k - 1], smb[:k - 1], **kw)


def _init(key):
    """nanochat's init with the zero output projections made random: at the exact init many gradients are pure
    rounding noise (~1e-11) that AdamW's eps=1e-10 turns into +-lr steps, which no two reduction orders agree on."""
    params = gpt.init_params(CONFIG, key)
    for i, block in enumerate(params["h"]):
        for j, sub in enumerate(("attn", "mlp")):
            w = block[sub]["c_proj"]
            block[sub]["c_proj"] = 0.05 * jax.random.normal(jax.random.fold_in(key, 2 * i + j), w.shape)
    return params


def _run(devices, fsdp: int, micro_steps: int, rows: int, sharded: bool, steps: int = 2):
    """`steps` train steps of the real optimizer on a mesh of `devices`; returns (losses, params as numpy)."""
    mesh = shd.make_mesh(fsdp, devices)
    abstract = gpt.param_shapes(CONFIG)
    p_sh = shd.param_shardings(abstract, mesh)
    kw = dict(stack_multiple=mesh.size, muon_update_fn=shd.sharded_muon_update(mesh)) if sharded else {}
    tx = make_optimizer(abstract, CONFIG, unembedding_lr=0.004, embedding_lr=0.003, matrix_lr=0.05, weight_decay=0.1,
                        ns_dtype=jnp.float32, **kw)
    o_sh = shd.opt_state_shardings(jax.eval_shape(tx.init, abstract), mesh)
    b_sh = shd.batch_sharding(mesh, 3)
    params = jax.jit(_init, out_shardings=p_sh)(jax.random.key(0))
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    rep = shd.replicated(mesh)
    step = jax.jit(functools.partial(tl.train_step, config=CONFIG, optimizer=tx, loss_fn=gpt.loss_fn, weighted=False),
                   in_shardings=(p_sh, o_sh, {"inputs": b_sh, "targets": b_sh}, rep), out_shardings=(p_sh, o_sh, rep),
                   donate_argnums=(0, 1))
    loader = tl.SyntheticLoader(2 * rows, CONFIG.sequence_len, CONFIG.vocab_size, seed=3)
    losses = []
    for i in range(steps):
        x, y = next(loader)  # the same 2*rows rows per step in every layout
        x = x.reshape(micro_steps, -1, x.shape[-1])
        y = y.reshape(micro_steps, -1, y.shape[-1])
        hp = tl.hparams_array(1.0 - 0.1 * i, 0.9, 0.1)
        batch = {"inputs": jax.device_put(x, b_sh), "targets": jax.device_put(y, b_sh)}
        params, opt_state, loss = step(params, opt_state, batch, hp)
        losses.append(float(loss))
    if sharded:
        mb = next(v for p, v in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                  if "momentum_buffer" in shd.path_str(p))
        assert mb.addressable_shards[0].data.shape[0] == mb.shape[0] // mesh.size  # ZeRO-1: 1/N each
    return losses, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def reference():
    """One device, one micro-batch of 16 rows per step, unsharded Muon."""
    return _run(jax.devices()[:1], 1, 1, 8, sharded=False)


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_sharded_steps_equal_one_device(reference):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    _assert_same(_run(jax.devices(), 1, 1, 8, sharded=True), reference)


def test_sharded_fsdp_steps_with_grad_accumulation_equal_one_device(reference):
    # 2 micro-batches of 8 rows on a (4 data x 2 fsdp) mesh == one batch of 16 rows on one device
    out = _run(jax.devices(), 2, 2, 8, sharded=True)
    _assert_same(out, reference)
    assert reference[0][1] < reference[0][0]  # the steps did train
