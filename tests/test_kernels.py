"""jaxchat.kernels against plain references written out here: the FP8 matmul and its VJP, attention (full-sequence
with its hand-written backward, the cuDNN dispatch's fallback, and attention over a KV cache), and the chunked
softcapped cross-entropy. Tolerances from tests/tolerances.py; all float32 on the CPU, a few small eager shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import backend, kernels

from tolerances import assert_close, rounded_product_rel_tol, tol

F32 = jnp.float32
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------------------------
# FP8 matmul


def _dequantised(a, dtype):
    """a rounded to `dtype` under one float32 scale that maps max |a| to the format's max, back in float32."""
    big = float(jnp.finfo(dtype).max)
    scale = jnp.max(jnp.abs(a)) / big
    return jnp.clip(a / scale, -big, big).astype(dtype).astype(F32) * scale


def test_fp8_quantisation_is_tensorwise_and_saturating():
    x = jnp.array([[0.5, -2.0], [1.0, 0.0]], jnp.float32)
    q, scale = kernels._to_fp8(x, E4M3)
    assert q.dtype == E4M3 and float(scale) == pytest.approx(2.0 / 448.0)
    assert float(q.astype(jnp.float32)[0, 1]) == -448.0  # the amax maps to the format's max
    np.testing.assert_allclose(np.asarray(q.astype(jnp.float32)) * float(scale), np.asarray(x), rtol=2 ** -4)
    assert kernels.fp8_eligible((256, 128)) and not kernels.fp8_eligible((2, 12))
    assert not kernels.fp8_eligible((96, 72))


def test_fp8_matmul_and_its_vjp_against_float_references():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    N, n_in, n_out = 32, 128, 256
    x = jax.random.normal(kx, (N, n_in), F32)
    w = jax.random.normal(kw, (n_out, n_in), F32) * 0.05
    g = jax.random.normal(kg, (N, n_out), F32)

    @jax.jit  # one program instead of dozens of eagerly compiled ops
    def products(x, w, g):
        y, vjp = jax.vjp(kernels.fp8_matmul, x, w)
        xq, wq, gq = _dequantised(x, E4M3), _dequantised(w, E4M3), _dequantised(g, E5M2)
        return (y, *vjp(g)), (xq @ wq.T, gq @ wq, gq.T @ xq), (x @ w.T, g @ w, g.T @ x)

    (y, dx, dw), quantised, exact = products(x, w, g)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == jnp.float32
    assert y.shape == (N, n_out) and dx.shape == x.shape and dw.shape == w.shape
    # 1. Exactly the float32 products of the quantised operands (e4m3 forward, the e5m2 gradient backward): only
    # float32 rounding differs, over each GEMM's contraction plus the scale multiplications.
    for name, got, want, n in zip(("y", "dx", "dw"), (y, dx, dw), quantised, (n_in, n_out, N)):
        assert_close(got, want, F32, n + 3, err_msg=name)
    # 2. Against the unquantised float32 matmul and its gradients: within the operands' fp8 rounding.
    assert _rel(y, exact[0]) <= rounded_product_rel_tol(E4M3, E4M3)
    assert _rel(dx, exact[1]) <= rounded_product_rel_tol(E5M2, E4M3)
    assert _rel(dw, exact[2]) <= rounded_product_rel_tol(E5M2, E4M3)


def test_linear_uses_fp8_only_on_eligible_weights():
    x = jax.random.normal(jax.random.key(1), (2, 16, 128), F32)
    w_big, w_small = jnp.ones((128, 128), F32) * 0.01, jnp.ones((24, 128), F32) * 0.01
    np.testing.assert_array_equal(kernels.linear(x, w_small, fp8=True), kernels.linear(x, w_small))
    got = kernels.linear(x, w_big, fp8=True)
    assert got.shape == (2, 16, 128)
    np.testing.assert_array_equal(got.reshape(32, 128), kernels.fp8_matmul(x.reshape(32, 128), w_big))


# ----------------------------------------------------------------------------------------------------------------
# Attention


def _plain_attention(q, k, v, window):
    """softmax(q k^T / sqrt(D) + causal (sliding-window) mask) v, each kv head repeated for its query heads."""
    T, H, D = q.shape[1:]
    k, v = jnp.repeat(k, H // k.shape[2], axis=2), jnp.repeat(v, H // v.shape[2], axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(D)
    delta = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    mask = (delta >= 0) if window is None else (delta >= 0) & (delta <= window)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1), v)


def _qkv(seed=0):
    # GQA: 4 query heads on 2 kv heads
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (2, 24, 4, 8)), jax.random.normal(kk, (2, 24, 2, 8)),
            jax.random.normal(kv, (2, 24, 2, 8)))


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
def test_attention_backward_equals_autodiff(window):
    # softmax_attention's hand-written backward against JAX differentiating the plain softmax attention above and
    # its own XLA attention.
    q, k, v = _qkv()
    r = jax.random.normal(jax.random.key(9), q.shape)
    local = None if window is None else (window, 0)
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)  # noqa: E731
    plain = lambda q, k, v: _plain_attention(q, k, v, window)  # noqa: E731
    ours = lambda q, k, v: kernels.softmax_attention(q, k, v, window)  # noqa: E731

    @jax.jit
    def out_and_grads(q, k, v):
        return {name: (f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * r), argnums=(0, 1, 2))(q, k, v))
                for name, f in (("ours", ours), ("plain", plain), ("jax.nn", xla))}

    results = out_and_grads(q, k, v)
    out, grads = results.pop("ours")
    assert out.shape == q.shape and out.dtype == q.dtype
    T, head_dim = q.shape[1], q.shape[-1]
    n_fwd = 2 * T + head_dim  # q.k over head_dim, softmax sum and weighted sum over T
    # the gradients retrace the forward and add the softmax backward's sum over T, dP.V over head_dim and the GQA
    # sum over the 2 query heads of a kv head
    n_bwd = 2 * n_fwd + 2
    for ref_name, (ref_out, ref_grads) in results.items():
        assert_close(out, ref_out, F32, n_fwd, err_msg=ref_name)
        for name, a, b in zip("qkv", grads, ref_grads):
            assert_close(a, b, F32, n_bwd, err_msg=f"{ref_name} d{name}")


def test_causal_attention_falls_back_when_cudnn_refuses():
    # Traced for a GPU in bfloat16 the dispatch picks cuDNN, which this CPU-only process refuses: the XLA kernel
    # must run instead (the same numbers as calling it directly).
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv())
    with backend.use("gpu"):
        assert backend.attention_impl(q.dtype) == "cudnn"
        got = kernels.causal_attention(q, k, v, (5, 0))
    np.testing.assert_array_equal(got, kernels.softmax_attention(q, k, v, 5))
    np.testing.assert_array_equal(kernels.causal_attention(*_qkv(), None), kernels.softmax_attention(*_qkv(), None))


@pytest.mark.parametrize("window", [5, 24])
def test_cached_attention_matches_full_sequence_attention(window):
    # A prefill from position 0 over a cache holding exactly the sequence, and single-token decodes at positions
    # 7 and 23 of it, give the rows of full-sequence attention.
    q, k, v = _qkv(1)

    @jax.jit
    def prefill_and_decodes(q, k, v):
        pos = lambda t: jnp.full((2,), t, jnp.int32)  # noqa: E731
        kc, vc = (a.swapaxes(1, 2).reshape(-1, a.shape[1], a.shape[3]) for a in (k, v))  # the cache's (B*K, S, D)
        return (_plain_attention(q, k, v, window), kernels.cached_attention(q, kc, vc, pos(0), window),
                [kernels.cached_attention(q[:, t:t + 1], kc, vc, pos(t), window) for t in (7, 23)])

    full, prefill, decodes = prefill_and_decodes(q, k, v)
    n = 2 * q.shape[1] + q.shape[-1]
    assert_close(prefill, full, F32, n, err_msg="prefill")
    for t, got in zip((7, 23), decodes):
        assert_close(got, full[:, t:t + 1], F32, n, err_msg=f"decode at {t}")


# ----------------------------------------------------------------------------------------------------------------
# Chunked softcapped cross-entropy

VOCAB, PADDED_VOCAB, N_EMBD, CAP = 100, 128, 32, 15.0


def _reference_losses(x, w, targets):
    """Per-token cross-entropy of 15 tanh(z / 15) over the unpadded vocabulary, unchunked; 0 where target == -1."""
    logits = CAP * jnp.tanh(jnp.einsum("btc,vc->btv", x, w[:VOCAB]) / CAP)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets < 0, 0.0, jax.nn.logsumexp(logits, axis=-1) - picked)


def _ce_inputs():
    kx, kw, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 32, N_EMBD))
    w = jax.random.normal(kw, (PADDED_VOCAB, N_EMBD)) * 0.5  # large enough that the softcap bends
    targets = jax.random.randint(kt, (2, 32), 0, VOCAB).at[0, :7].set(-1)
    return x, w, targets


# the loss sums 57 non-negative token losses (so its size is the scale), each a log-sum-exp over the padded
# vocabulary of logits that are dot products over n_embd; dx sums over the vocabulary, dw over the tokens
N_CE = 2 * 32 + PADDED_VOCAB + N_EMBD


@pytest.mark.parametrize("n_chunks", [1, 4])
def test_fused_cross_entropy_equals_autodiff(n_chunks):
    # The fused head + loss (gradients computed in the forward pass) against autodiff of the plain unchunked loss,
    # with a padded vocabulary (the padded head rows must get zero gradient) and ignored targets.
    x, w, targets = _ce_inputs()
    ref = lambda x, w: jnp.sum(_reference_losses(x, w, targets))  # noqa: E731
    ours = lambda x, w: kernels.softcap_cross_entropy_sum(x, w, targets, VOCAB, CAP, n_chunks)  # noqa: E731
    (loss, (gx, gw)), (ref_loss, (rx, rw)) = jax.jit(
        lambda x, w: [jax.value_and_grad(f, argnums=(0, 1))(x, w) for f in (ours, ref)])(x, w)
    assert abs(float(loss) - float(ref_loss)) < tol(F32, N_CE, float(ref_loss))
    assert_close(gx, rx, F32, N_CE, err_msg="dx")
    assert_close(gw, rw, F32, N_CE, err_msg="dw")
    assert not np.asarray(gw[VOCAB:]).any()
    assert not np.asarray(gx[0, :7]).any()  # ignored positions get no gradient


def test_per_token_cross_entropy_chunked_equals_unchunked():
    # reduction='none''s kernel over 4 checkpointed chunks: the same per-token losses and (weighted) gradients.
    x, w, targets = _ce_inputs()
    r = jax.random.uniform(jax.random.key(2), targets.shape)
    ours = lambda x, w: kernels.softcap_cross_entropy(x, w, targets, VOCAB, CAP, 4)  # noqa: E731
    ref = lambda x, w: _reference_losses(x, w, targets)  # noqa: E731

    @jax.jit
    def losses_and_grads(x, w):
        return [(f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * r), argnums=(0, 1))(x, w)) for f in (ours, ref)]

    (got, got_grads), (want, want_grads) = losses_and_grads(x, w)
    assert got.shape == targets.shape and got.dtype == jnp.float32
    assert_close(got, want, F32, N_CE)
    assert not np.asarray(got[0, :7]).any()
    for name, a, b in zip(("dx", "dw"), got_grads, want_grads):
        assert_close(a, b, F32, N_CE, err_msg=name)


def test_loss_chunks_divide_the_sequence():
    V = 256  # at the default, a (4, 64) batch's logits are far below LOSS_CHUNK_ELEMENTS
    assert kernels.loss_chunks(4, 64, V, None) == 1  # small: one chunk
    assert kernels.loss_chunks(4, 64, V, 64) == 4  # 256 tokens in chunks of <= 64 tokens: 4 slices of T
    assert kernels.loss_chunks(4, 60, V, 64) == 4  # 240 tokens: 4 divides 60
    assert kernels.loss_chunks(4, 7, V, 5) == 7  # no divisor of 7 between 6 and 7 but 7 itself
    assert kernels.loss_chunks(4, 8, V, 1) == 8  # at most one position per chunk
    # the default follows the vocabulary and the device count: 2^28 logits of 2^20 entries per device = 256 tokens
    with backend.use(jax.devices()[:1]):
        assert kernels.loss_chunks(4, 128, 1 << 20) == 2
