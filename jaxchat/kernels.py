"""The compute kernels under the GPT (`jaxchat.model`): matmuls (plain or FP8), attention, and the fused head + loss.

Each is a pure function of arrays with a hand-written gradient where autodiff would keep too much or run slowly:

- `linear` / `fp8_matmul`: x @ w.T in the compute dtype, or tensorwise-scaled float8 (nanochat `--fp8`).
- `causal_attention`: cuDNN flash attention on GPU, else `softmax_attention` (XLA, hand-written backward);
  `cached_attention`: new queries against a KV cache (prefill and decode).
- `softcap_cross_entropy_sum` / `softcap_cross_entropy`: head, softcap and cross-entropy over chunks of the
  sequence, so the (tokens, vocab) logits never exist all at once; `loss_chunks` picks the chunk count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

from jaxchat import backend

# ----------------------------------------------------------------------------------------------------------------
# Matmuls


def linear(x: jax.Array, w: jax.Array, fp8: bool = False) -> jax.Array:
    """x @ w.T with w (out, in) cast to x's dtype (master weights stay float32).

    x: (..., in) in the compute dtype; returns (..., out) in x's dtype.
    fp8: run it as `fp8_matmul` when w is FP8-eligible (`fp8_eligible`), else as above.
    """
    if fp8 and fp8_eligible(w.shape):
        return fp8_matmul(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.shape[0],))
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))


def fp8_eligible(shape: tuple[int, ...]) -> bool:
    """nanochat's FP8 filter (nanochat/fp8.py): a matrix whose dims are both multiples of 16 (the FP8 GEMM's
    requirement) and at least 128."""
    return len(shape) == 2 and all(d % 16 == 0 for d in shape) and min(shape) >= 128


FP8_EPS = 1e-12  # amax floor: an all-zero tensor (the zero-initialised projections) gets a finite scale


def _to_fp8(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Tensorwise dynamic quantisation: (q in `dtype`, float32 scale) with x ~= q * scale, amax mapped to the
    format's max (saturating). Source: nanochat/fp8.py `_to_fp8`."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.maximum(amax, FP8_EPS) / float(jnp.finfo(dtype).max)
    return fp8_ops.quantize(x.astype(jnp.float32), dtype, scale, jnp.float32), scale


def _fp8_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], scale: jax.Array, out_dtype) -> jax.Array:
    """Dequantised product of two float8 matrices contracting a's axis contract[0] with b's contract[1]."""
    y = jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)
    return (y * scale).astype(out_dtype)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w.T with both operands quantised to float8_e4m3fn (one scale per tensor, `_to_fp8`); the backward GEMMs
    take the output gradient in float8_e5m2 (the wider range gradients need) against the saved e4m3 operands.
    Products accumulate in float32.

    Args:
        x: (N, in) in the compute dtype.
        w: (out, in) float32 master weight.
    Returns:
        (N, out) in x's dtype; under differentiation x's gradient has x's dtype and w's is float32.
    Source: nanochat/fp8.py `_Float8Matmul` (the "tensorwise" recipe).
    """
    return _fp8_matmul_fwd(x, w)[0]


def _fp8_matmul_fwd(x, w):
    xq, xs = _to_fp8(x, jnp.float8_e4m3fn)
    wq, ws = _to_fp8(w, jnp.float8_e4m3fn)
    return _fp8_dot(xq, wq, (1, 1), xs * ws, x.dtype), (xq, xs, wq, ws)


def _fp8_matmul_bwd(residuals, g):
    xq, xs, wq, ws = residuals
    gq, gs = _to_fp8(g, jnp.float8_e5m2)
    dx = _fp8_dot(gq, wq, (1, 0), gs * ws, g.dtype)  # (N, out) . (out, in); g has x's dtype
    dw = _fp8_dot(gq, xq, (0, 0), gs * xs, jnp.float32)  # (N, out)^T . (N, in)
    return dx, dw


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Attention


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, local_window: tuple[int, int] | None) -> jax.Array:
    """Causal (optionally sliding-window) attention over a full sequence, softmax scale 1/sqrt(D).

    cuDNN's flash attention (`jax.nn.dot_product_attention`, which supports GQA and the causal sliding window) on
    GPU in bfloat16/float16, as `jaxchat.backend.attention_impl` says for the platform of the mesh being traced for
    (not `jax.default_backend()`); elsewhere, or wherever cuDNN refuses the shape or version (it says so while
    tracing), `softmax_attention`. Source: nanochat/flash_attention.py (FA3 with an SDPA fallback).

    Args:
        q: (B, T, H, D); k, v: (B, T, K, D) with K dividing H, all one float dtype.
        local_window: (left, 0) lets position t see keys t-left .. t; None: all keys up to t.
    Returns:
        (B, T, H, D) in q's dtype.
    """
    if backend.attention_impl(q.dtype) == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local_window,
                                                implementation="cudnn")
        except Exception:  # noqa: BLE001 - any refusal falls back to the same computation in XLA
            pass
    return softmax_attention(q, k, v, None if local_window is None else local_window[0])


def _attention_mask(T: int, window: int | None) -> jax.Array:
    """(T, T) bool: query t sees key s when s <= t (and t - s <= window)."""
    delta = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    return (delta >= 0) if window is None else (delta >= 0) & (delta <= window)


def _attention_fwd(q, k, v, window):
    B, T, H, D = q.shape
    K = k.shape[2]
    qh = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D): heads sharing a kv head
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, D)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32) * D ** -0.5
    probs = jax.nn.softmax(jnp.where(_attention_mask(T, window), scores, -jnp.inf), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, vh)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D), (qh, kh, vh, out, probs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D) + causal mask) v in XLA einsums, what `jax.nn.dot_product_attention(is_causal=True)`
    computes, with the attention backward pass written out (dP = dO V^T, dS = P * (dP - rowsum(dO * O)), then dQ,
    dK, dV): it keeps only the probabilities for the backward pass instead of autodiff's masked scores and softmax
    intermediates.

    Args:
        q: (B, T, H, D); k, v: (B, T, K, D) with K dividing H (grouped-query attention). Any float dtype; scores
            and the softmax are float32.
        window: static; None for plain causal attention, else query t sees keys t-window .. t.
    Returns:
        (B, T, H, D) in q's dtype.
    Source: the attention backward of FlashAttention (Dao et al. 2022, arXiv:2205.14135, appendix B), untiled.
    """
    return _attention_fwd(q, k, v, window)[0]


def _attention_bwd(window, residuals, d_out):
    qh, kh, vh, out, probs = residuals
    B, K, G, T, D = qh.shape
    f32 = jnp.float32
    do = d_out.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs, do)
    dp = jnp.einsum("bkgtd,bksd->bkgts", do, vh, preferred_element_type=f32)
    delta = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    ds = (probs.astype(f32) * (dp - delta) * D ** -0.5).astype(qh.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, kh).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, qh)
    return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, window: int) -> jax.Array:
    """Attention of T new queries per row over the S positions of a layer's KV cache (prefill and decode).

    Einsums batched over (row, kv head) pairs on the cache's own (B*K, S, D) layout (`jaxchat.model.init_kv_cache`),
    so XLA reads it in place; `jax.nn.dot_product_attention` wants (B, S, K, D) and would transpose the cache on
    every decode step. Forward only (inference).

    Args:
        q: (B, T, H, D); k, v: (B*K, S, D) with K dividing H (row b's heads at b*K .. b*K+K-1), in q's dtype,
            already holding the new keys/values.
        pos: int32 (B,): the position of each row's first query; query t of row b sits at pos[b] + t.
        window: a query at position p sees the keys at positions p-window .. p.
    Returns:
        (B, T, H, D) in q's dtype.
    """
    B, T, H, D = q.shape
    N, S = k.shape[0], k.shape[1]
    K, G = N // B, H // (N // B)
    delta = (pos[:, None] + jnp.arange(T))[:, :, None] - jnp.arange(S)[None, None, :]  # (B, T, S)
    mask = (delta >= 0) & (delta <= window)
    qn = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(N, G * T, D)  # a bitcast when T == 1
    scores = jnp.einsum("nqd,nsd->nqs", qn, k, preferred_element_type=jnp.float32) * D ** -0.5
    scores = jnp.where(mask[:, None, None], scores.reshape(B, K, G, T, S), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(N, G * T, S)
    out = jnp.einsum("nqs,nsd->nqd", probs, v).reshape(B, K, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


# ----------------------------------------------------------------------------------------------------------------
# Head + softcapped cross-entropy, chunked over the sequence


def softcap(z: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(z / cap): z squashed smoothly into (-cap, cap), in z's dtype."""
    return cap * jnp.tanh(z / cap)


def softcap_logits(x: jax.Array, w: jax.Array, vocab_size: int, cap: float) -> jax.Array:
    """float32 logits softcap((x @ w.T)[..., :vocab_size], cap): x (..., C) in the compute dtype, w (Vp, C) the
    head with Vp >= vocab_size (rows past vocab_size are padding). Returns (..., vocab_size) float32."""
    return softcap(linear(x, w)[..., :vocab_size].astype(jnp.float32), cap)


# Logits (float32) per loss chunk and device: 2^28 elements = 1 GiB. One chunk on small models; a handful at d20+.
LOSS_CHUNK_ELEMENTS = 1 << 28


def loss_chunks(B: int, T: int, padded_vocab: int, chunk_tokens: int | None = None) -> int:
    """How many slices of T the head and loss of a (B, T) batch run in: the fewest that divide T and keep a chunk
    within `chunk_tokens` tokens of the whole batch (default: LOSS_CHUNK_ELEMENTS logits of `padded_vocab` per
    device, the batch split over `jaxchat.backend.device_count()` devices). At most T (one position per chunk)."""
    if chunk_tokens is None:
        chunk_tokens = max(1, LOSS_CHUNK_ELEMENTS * backend.device_count() // padded_vocab)
    want = -(-B * T // chunk_tokens)
    return next(n for n in range(max(1, want), T + 1) if T % n == 0) if want < T else T


def _chunked(fn, x: jax.Array, targets: jax.Array, n_chunks: int, init):
    """Scan `fn(carry, (x_chunk, t_chunk)) -> (carry, out_chunk)` over n_chunks slices of the T axis of x (B, T, C)
    and targets (B, T); returns (carry, outs re-joined along T)."""
    B, T = targets.shape
    if n_chunks == 1:
        return fn(init, (x, targets))
    tc = T // n_chunks
    xs = (jnp.swapaxes(x.reshape(B, n_chunks, tc, -1), 0, 1), jnp.swapaxes(targets.reshape(B, n_chunks, tc), 0, 1))
    carry, outs = jax.lax.scan(fn, init, xs)
    if outs is None:
        return carry, None
    return carry, jnp.swapaxes(outs, 0, 1).reshape((B, T) + outs.shape[3:])


def _token_ce(logits: jax.Array, targets: jax.Array):
    """(per-token cross-entropy, 0 where target < 0; logsumexp; targets with -1 replaced by 0; valid mask)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = targets >= 0
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - picked, 0.0), lse, safe, valid


def softcap_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, vocab_size: int, cap: float,
                          n_chunks: int = 1) -> jax.Array:
    """Per-token cross-entropy of `softcap_logits(x, w, vocab_size, cap)`, chunk by chunk along T; with several
    chunks each runs under `jax.checkpoint`, so a backward pass recomputes a chunk's logits instead of keeping them.

    Args:
        x: (B, T, C) hidden states in the compute dtype; w: (Vp, C) float32 head, Vp >= vocab_size.
        targets: int32 (B, T); -1 is ignored.
        vocab_size, cap, n_chunks: static; n_chunks divides T (`loss_chunks`).
    Returns:
        float32 (B, T) losses in nats, 0 where target == -1.
    Source: nanochat/gpt.py `GPT.forward` (cross_entropy with ignore_index=-1, reduction='none').
    """
    step = lambda xc, tc: _token_ce(softcap_logits(xc, w, vocab_size, cap), tc)[0]  # noqa: E731
    step = jax.checkpoint(step) if n_chunks > 1 else step  # one chunk: nothing to save by recomputing
    return _chunked(lambda c, xt: (c, step(*xt)), x, targets, n_chunks, ())[1]


def _softcap_ce_terms(x: jax.Array, w: jax.Array, targets: jax.Array, vocab_size: int, cap: float, with_grads: bool):
    """Summed softcapped cross-entropy of one chunk, and optionally its gradients (d sum/dx, d sum/dw)."""
    logits = softcap_logits(x, w, vocab_size, cap)
    losses, lse, safe, valid = _token_ce(logits, targets)
    if not with_grads:
        return jnp.sum(losses), None, None
    # d/dz of (lse - logits[target]) = (softmax(logits) - onehot(target)) * (1 - t^2), the tanh's derivative.
    onehot = jnp.arange(vocab_size) == safe[..., None]
    t = logits / cap
    dz = (jnp.exp(logits - lse[..., None]) - onehot) * (1.0 - t * t)
    dz = jnp.where(valid[..., None], dz, 0.0).astype(x.dtype)
    dx = jnp.einsum("...v,vc->...c", dz, w[:vocab_size].astype(x.dtype))
    dw = jnp.einsum("nv,nc->vc", dz.reshape(-1, vocab_size), x.reshape(-1, x.shape[-1]),
                    preferred_element_type=jnp.float32)
    dw = jnp.pad(dw, ((0, w.shape[0] - vocab_size), (0, 0))).astype(w.dtype)
    return jnp.sum(losses), dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def softcap_cross_entropy_sum(x: jax.Array, w: jax.Array, targets: jax.Array, vocab_size: int, cap: float,
                              n_chunks: int = 1) -> jax.Array:
    """Sum over tokens of the cross-entropy of `softcap_logits(x, w, vocab_size, cap)`.

    A fused head + loss ("linear cross-entropy"): the forward pass of a gradient computes the gradients with
    respect to x and w chunk by chunk, so neither the (B, T, vocab) logits nor their gradient are kept for the
    backward pass, and nothing is recomputed (the backward pass only scales by the cotangent).

    Args:
        x: (B, T, C) hidden states in the compute dtype.
        w: (Vp, C) float32 head (nanochat `lm_head`), Vp >= vocab_size (padded rows get zero gradient).
        targets: int32 (B, T); -1 is ignored (zero gradient).
        vocab_size: real vocabulary size (static).
        cap: the softcap (static; nanochat's is 15).
        n_chunks: number of slices of T computed one after the other (static, divides T: `loss_chunks`).
    Returns:
        float32 scalar, the summed loss in nats; gradients in x's and w's dtypes.
    Source: nanochat/gpt.py `GPT.forward` (softcap, cross_entropy with ignore_index=-1); the gradients-in-forward
    fusion of Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989).
    """
    def body(total, xt):
        return total + _softcap_ce_terms(xt[0], w, xt[1], vocab_size, cap, False)[0], None
    return _chunked(body, x, targets, n_chunks, jnp.zeros((), jnp.float32))[0]


def _softcap_ce_fwd(x, w, targets, vocab_size, cap, n_chunks):
    def body(carry, xt):
        total, dw_sum = carry
        loss_sum, dx, dw = _softcap_ce_terms(xt[0], w, xt[1], vocab_size, cap, True)
        return (total + loss_sum, dw_sum + dw), dx
    (total, dw), dx = _chunked(body, x, targets, n_chunks, (jnp.zeros((), jnp.float32), jnp.zeros_like(w)))
    return total, (dx, dw)


def _softcap_ce_bwd(vocab_size, cap, n_chunks, residuals, g):
    dx, dw = residuals
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None


softcap_cross_entropy_sum.defvjp(_softcap_ce_fwd, _softcap_ce_bwd)
