"""jaxchat's default Muon (MuonEq row + Muon+) against nanochat HEAD's own optimizer step.

Reference: tests/fixtures/nanochat-head-tiny/active, copied from ../shared/reference/nanochat-head-tiny (nanochat
commit 92d63d4, PyTorch CPU, float32, compiled kernels): one `MuonAdamW.step()` from
`setup_optimizer(weight_decay=0.2)` for the tiny model (n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab 256), all
weights non-zero. In float32 nanochat runs Polar Express in float32, so jaxchat runs it with ns_dtype=float32 here.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxchat.checkpoint import from_nanochat, to_nanochat
from jaxchat.model import GPTConfig
from jaxchat.optim import make_optimizer

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-head-tiny" / "active"
CONFIG = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
EPS32 = float(np.finfo(np.float32).eps)

# AdamW: float32 end to end on both sides. At step 1 each element moves by lr * m_hat / (sqrt(v_hat) + eps), about
# lr <= 0.7 (wte), computed from the same grads in a handful of float32 ops: the two sides differ by a few ulps of
# lr, ~1e-7. The brief's bound 1e-5 leaves two orders of magnitude for the compiled-vs-eager kernel differences.
ADAMW_ATOL = 1e-5
# Muon: five float32 Polar Express iterations, each a matmul chain reducing over n <= 256 and scaled by |a| <= 8.2,
# then NorMuon: relative error of the update ~ 5 iterations * 8.2 * eps32 * sqrt(256) ~ 8e-5; bound 1e-4. The
# direction: cosine >= 0.999 (the brief). Without MuonEq and Muon+ the update is 6-21% off (README of the fixtures),
# which the negative control below checks.
MUON_REL = 1e-4
MUON_COS = 0.999


def _load():
    params = from_nanochat(dict(np.load(FIXTURE / "params.npz")), CONFIG)
    grads = from_nanochat(dict(np.load(FIXTURE / "grads.npz")), CONFIG)
    return params, grads, dict(np.load(FIXTURE / "after_step.npz")), dict(np.load(FIXTURE / "params.npz"))


def _step(params, grads, **kw):
    tx = make_optimizer(params, CONFIG, weight_decay=0.2, ns_dtype=jnp.dtype(jnp.float32), **kw)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return to_nanochat(optax.apply_updates(params, updates), CONFIG)


def _muon_errors(new, after, before, wd=0.2, lr=0.02):
    """Per Muon matrix: (relative difference of the update, cosine of the updates, mask flips).

    A mask flip: where the orthogonalised update X is ~0, the sign test of cautious weight decay (X * p >= 0) is
    decided by round-off and the element then differs by exactly lr_eff * wd * |p| (one such element in this fixture,
    see the fixtures' README). Those elements are counted and left out of the comparison."""
    out = {}
    for key in after:
        if key.startswith("transformer.h."):
            rows, cols = after[key].shape
            lr_eff = lr * max(1.0, rows / cols) ** 0.5
            du, dr = (new[key] - before[key]).astype(np.float64), (after[key] - before[key]).astype(np.float64)
            flip = np.abs(np.abs(du - dr) - lr_eff * wd * np.abs(before[key])) <= 1e-6
            flip &= np.abs(du - dr) > 1e-6
            du = np.where(flip, dr, du)
            out[key] = (np.linalg.norm(du - dr) / np.linalg.norm(dr),
                        float((du * dr).sum() / (np.linalg.norm(du) * np.linalg.norm(dr))), int(flip.sum()))
    return out


def test_default_muon_step_matches_nanochat_head():
    params, grads, after, before = _load()
    new = _step(params, grads)  # defaults: muon_eq="row", muon_plus=True
    assert set(new) == set(after)
    errs = _muon_errors(new, after, before)
    assert len(errs) == 3 * 6 + 2  # 6 matrices per block plus 2 ve_gates
    for key, (rel, cos, flips) in errs.items():
        assert rel <= MUON_REL and cos >= MUON_COS and flips <= 2, (key, rel, cos, flips)
    for key in after:
        if key not in errs:
            np.testing.assert_allclose(new[key], after[key], atol=ADAMW_ATOL, rtol=0, err_msg=key)


def test_5019acc_muon_is_measurably_different_from_head():
    """Negative control: the same step without MuonEq and Muon+ fails the bound above on every matrix."""
    params, grads, after, before = _load()
    errs = _muon_errors(_step(params, grads, muon_eq="none", muon_plus=False), after, before)
    assert min(rel for rel, _, _ in errs.values()) > 100 * MUON_REL, errs


def test_bad_muon_eq_is_rejected():
    params, _, _, _ = _load()
    with pytest.raises(ValueError, match="muon-eq"):
        make_optimizer(params, CONFIG, muon_eq="diag")
