"""Muon for the transformer's block matrices, as nanochat's `MuonAdamW` runs it.

One Muon step on a stack of K same-shaped matrices (nanochat `nanochat/optim.py`, `muon_step_fused`):

1. Nesterov momentum in lerp form: buf <- lerp(buf, g, 1 - mu); g <- lerp(g, buf, mu).
2. MuonEq equilibration (arXiv 2603.28254), optional: each row (or column) of X rescaled to the mean row (column)
   norm, ||X||_F / sqrt(R) (sqrt(C)), norms in float32 and floored at 1e-6, so the spectrum entering the
   orthogonalisation is better conditioned.
3. Orthogonalisation by Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932), the 5 published
   coefficient triples nanochat uses, after dividing by 1.01 * ||g||_F + 1e-6. Wide (R <= C) matrices iterate on
   X X^T, tall (R > C) on X^T X so the Gram matrix is the small one. It replaces the Newton-Schulz iteration of
   Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/).
4. Muon+ renormalisation (arXiv 2602.21545), optional: X rescaled to Frobenius norm sqrt(min(R, C)), the norm of
   an exactly semi-orthogonal matrix, which the 5 iterations only approach.
5. NorMuon variance reduction (arXiv 2510.05491): a second moment of the orthogonalised update, factored per row
   (R >= C) or per column (R < C), rescales each row/column and then the whole matrix back to the norm it had.
6. Cautious weight decay (arXiv 2510.12402): decay only where update and parameter agree in sign (u * p >= 0), with
   lr scaled by max(1, R/C) ** 0.5.

Precision follows nanochat's compiled kernel (the reference outputs in tests/fixtures/nanochat-tiny come from it):
the buffers and the parameter are float32; MuonEq, the Polar Express iterations and Muon+ run in bfloat16
(`ns_dtype`, float32 selectable) with matmuls accumulated in float32 and each iterate rounded once; everything after it (NorMuon
statistics, the scalars beta2, lr, weight decay, the final update) is float32. The fixture shows that the compiled
kernel does not round beta2/lr/wd to bfloat16 although the eager source writes `.to(g.dtype)`: the second moment
after one step is exactly (1 - 0.9) * v_mean and lr * wd exactly 0.004.

nanochat HEAD (commit 4e014d3) always applies MuonEq (row) and Muon+; its bigram speedrun branch (412e9a1) makes
both flags, off by default there. `muon_eq="none", muon_plus=False` is nanochat 5019acc exactly.

The core `muon_update_stacked` is a pure function of (K, R, C) stacks with no cross-matrix reduction, so the stack
axis K can be split over devices (`shard_map` over K, with K padded by `stack_multiple`) without changing a number.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Polar Express coefficients (a, b, c) for 5 iterations, safety factor 2e-2, cushion 2: arXiv 2505.16932, as listed
# in nanochat/optim.py. Iteration k maps X -> a X + (b A + c A^2) X with A = X X^T.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

PyTree = Any
# A dtype instance rather than the jnp.bfloat16 class (a callable, which optax.inject_hyperparams would take for a
# schedule if ns_dtype were not listed in its static_args).
BFLOAT16 = jnp.dtype(jnp.bfloat16)


def _mm(a: jax.Array, b: jax.Array, spec: str = "...ij,...jk->...ik") -> jax.Array:
    """Batched matmul (an einsum `spec`) accumulated in float32 and rounded to the inputs' dtype (torch's bf16
    matmul does the same). Float32 inputs get full float32 precision, not TF32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision).astype(a.dtype)


def polar_express(g: jax.Array, ns_steps: int = 5, dtype=BFLOAT16) -> jax.Array:
    """Approximate the orthogonal polar factor U V^T of each matrix in `g` (U S V^T its SVD).

    Args:
        g: (..., R, C) float array, any float dtype.
        ns_steps: number of Polar Express iterations, 1..5 (nanochat uses 5).
        dtype: dtype the iterations run in: bfloat16 as nanochat, or float32.
    Returns:
        (..., R, C) array of `dtype` whose singular values lie near 1 (the coefficients leave them in roughly
        [0.7, 1.2] rather than converging to exactly 1; see the paper).
    Raises:
        ValueError: `g` has fewer than 2 dims, or ns_steps is outside 1..5.
    Source: nanochat/optim.py `muon_step_fused` ("Polar express"); arXiv 2505.16932.
    """
    if g.ndim < 2:
        raise ValueError(f"polar_express needs (..., R, C) matrices, got shape {g.shape}")
    if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {ns_steps}")
    f32 = jnp.float32
    x = g.astype(dtype)
    # Frobenius pre-normalisation: the 1.01 keeps the top singular value safely below 1 after bf16 rounding.
    # The norm stays float32 (as nanochat's compiled kernel keeps a fused reduction), the result is rounded once.
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(f32)), axis=(-2, -1), keepdims=True))
    x = (x.astype(f32) / (norm * 1.01 + 1e-6)).astype(dtype)
    tall = g.shape[-2] > g.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:  # work with the small (C, C) Gram matrix
            gram = _mm(jnp.swapaxes(x, -1, -2), x)
            poly = (b * gram.astype(f32) + c * _mm(gram, gram).astype(f32)).astype(dtype)
            x = (a * x.astype(f32) + _mm(x, poly).astype(f32)).astype(dtype)
        else:  # wide or square: the (R, R) Gram matrix
            # x x^T as one einsum, not matmul(x, swapaxes(x)): XLA CPU then keeps the bf16 operands (the transposed
            # one was upcast to float32 first, ~1.4x slower). Same products, same result.
            gram = _mm(x, x, "...ik,...jk->...ij")
            poly = (b * gram.astype(f32) + c * _mm(gram, gram).astype(f32)).astype(dtype)
            x = (a * x.astype(f32) + _mm(poly, x).astype(f32)).astype(dtype)
    return x


MUON_EQ_MODES = ("none", "row", "col")


def equilibrate(x: jax.Array, mode: str = "row") -> jax.Array:
    """MuonEq equilibration of each (R, C) matrix of x (arXiv 2603.28254), in x's dtype.

    'row': row i is multiplied by (||X||_F / sqrt(R)) / max(||X_i,:||_2, 1e-6), bringing every row to the mean row
    norm; 'col': the same over columns with sqrt(C); 'none': x unchanged. Norms and the scale are float32, the
    scale is rounded to x's dtype before the product (as nanochat's kernel does in bfloat16).

    Args:
        x: (..., R, C) float array.
        mode: 'none' | 'row' | 'col'.
    Raises:
        ValueError: an unknown mode.
    Source: nanochat/optim.py `muon_step_fused` (commit 4e014d3; `muon_eq_axis` 1/2 at 412e9a1).
    """
    if mode not in MUON_EQ_MODES:
        raise ValueError(f"muon_eq must be one of {MUON_EQ_MODES}, got {mode!r} (train flag --muon-eq)")
    if mode == "none":
        return x
    f32 = jnp.float32
    xf = x.astype(f32)
    axis, n = (-1, x.shape[-2]) if mode == "row" else (-2, x.shape[-1])
    target = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(-2, -1), keepdims=True)) / n ** 0.5
    norms = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(xf), axis=axis, keepdims=True)), 1e-6)
    return x * (target / norms).astype(x.dtype)


def renormalize(x: jax.Array) -> jax.Array:
    """Muon+ renormalisation (arXiv 2602.21545): each (R, C) matrix of x scaled, in x's dtype, to Frobenius norm
    sqrt(min(R, C)) (the norm is float32, floored at 1e-6). Source: nanochat/optim.py `muon_step_fused`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    return x * (min(x.shape[-2], x.shape[-1]) ** 0.5 / jnp.maximum(norm, 1e-6)).astype(x.dtype)


def second_moment_shape(k: int, rows: int, cols: int) -> tuple[int, int, int]:
    """Shape of NorMuon's factored second moment for a (k, rows, cols) stack: one value per row when
    rows >= cols, else one per column (nanochat `MuonAdamW._step_muon`)."""
    return (k, rows, 1) if rows >= cols else (k, 1, cols)


def muon_update_stacked(grads: jax.Array, params: jax.Array, momentum_buffer: jax.Array,
                        second_momentum_buffer: jax.Array, *, learning_rate, momentum, weight_decay,
                        beta2=0.9, ns_steps: int = 5, ns_dtype=BFLOAT16, muon_eq: str = "row",
                        muon_plus: bool = True):
    """One Muon step for a stack of K same-shaped matrices; pure, and independent per matrix along K.

    Args:
        grads: (K, R, C) gradients.
        params: (K, R, C) current parameters (float32 in jaxchat).
        momentum_buffer: (K, R, C) Nesterov momentum, dtype of params.
        second_momentum_buffer: (K, R, 1) if R >= C else (K, 1, C): NorMuon's factored second moment.
        learning_rate: scalar base lr (float or traced); the step uses lr * max(1, R/C) ** 0.5.
        momentum: scalar Nesterov momentum (nanochat schedules 0.85 -> 0.97 -> 0.90).
        weight_decay: scalar cautious weight decay.
        beta2: scalar EMA coefficient of the second moment (None means 0: no averaging, as nanochat).
        ns_steps: Polar Express iterations (static).
        ns_dtype: dtype of the Polar Express iterations (static): bfloat16 (nanochat) or float32.
        muon_eq: MuonEq before Polar Express (static): 'row' (nanochat HEAD), 'col' or 'none' (5019acc).
        muon_plus: Muon+ after Polar Express (static): True (nanochat HEAD) or False (5019acc).
    Returns:
        (updates, momentum_buffer, second_momentum_buffer): updates (K, R, C) in params' dtype to ADD to params
        (new_p = p + updates), and the new buffers.
    Raises:
        ValueError: on inconsistent shapes.
    Source: nanochat/optim.py `muon_step_fused`.
    """
    if grads.ndim != 3 or grads.shape != params.shape or grads.shape != momentum_buffer.shape:
        raise ValueError(f"muon_update_stacked: grads {grads.shape}, params {params.shape}, momentum_buffer "
                         f"{momentum_buffer.shape} must all be the same (K, R, C)")
    k, rows, cols = grads.shape
    if second_momentum_buffer.shape != second_moment_shape(k, rows, cols):
        raise ValueError(f"muon_update_stacked: second_momentum_buffer is {second_momentum_buffer.shape}, expected "
                         f"{second_moment_shape(k, rows, cols)}")
    f32 = jnp.float32
    buf_dtype = momentum_buffer.dtype
    mu = jnp.asarray(momentum, f32)

    # 1. Nesterov momentum, lerp form: buf = buf + (1-mu)(g - buf); g = g + mu (buf - g).
    g = grads.astype(f32)
    buf = momentum_buffer.astype(f32)
    buf = buf + (1.0 - mu) * (g - buf)
    g = g + mu * (buf - g)

    # 2-4. Equilibrate, orthogonalise, renormalise (in ns_dtype, as nanochat's kernel).
    x = equilibrate(g.astype(ns_dtype), muon_eq)
    x = polar_express(x, ns_steps, ns_dtype)
    if muon_plus:
        x = renormalize(x)

    # 5. NorMuon: factored second moment, one value per row if R >= C (mean over columns), else per column.
    red_axis = -1 if rows >= cols else -2
    red_size = cols if rows >= cols else rows
    b2 = jnp.asarray(0.0 if beta2 is None else beta2, f32)
    v_mean = jnp.mean(jnp.square(x.astype(f32)), axis=red_axis, keepdims=True)  # (K,R,1) or (K,1,C)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * red_size)  # ||x||_F, (K,1,1)
    smb = second_momentum_buffer.astype(f32)
    smb = smb + (1.0 - b2) * (v_mean - smb)
    step_size = jax.lax.rsqrt(jnp.maximum(smb, 1e-10))
    # Norm the rescaled update would have; rescale so each matrix keeps its pre-NorMuon Frobenius norm.
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * red_size * jnp.square(step_size), axis=(-2, -1), keepdims=True))
    final_scale = step_size * (v_norm / jnp.maximum(v_norm_new, 1e-10))
    u = x.astype(f32) * final_scale

    # 6. Cautious weight decay and the step, lr scaled up for tall matrices (e.g. c_fc).
    lr = jnp.asarray(learning_rate, f32) * max(1.0, rows / cols) ** 0.5
    wd = jnp.asarray(weight_decay, f32)
    p = params.astype(f32)
    mask = (u * p) >= 0
    updates = -(lr * u + lr * wd * p * mask)
    return updates.astype(params.dtype), buf.astype(buf_dtype), smb.astype(second_momentum_buffer.dtype)


class MuonState(NamedTuple):
    """Muon's state, one entry per shape group keyed 'RxC' (e.g. '768x3072'), matrices stacked in the order their
    leaves appear in the flattened params pytree, K padded up to a multiple of `stack_multiple` with zeros.

    momentum_buffer: {'RxC': (K, R, C)}; second_momentum_buffer: {'RxC': (K, R, 1) or (K, 1, C)}. Same layout as
    nanochat's per-group `momentum_buffer` / `second_momentum_buffer`.
    """
    momentum_buffer: dict[str, jax.Array]
    second_momentum_buffer: dict[str, jax.Array]


def shape_key(shape) -> str:
    """'RxC' name of a shape group, e.g. (768, 3072) -> '768x3072'."""
    return "x".join(str(int(d)) for d in shape)


def group_by_shape(shapes) -> dict[str, list[int]]:
    """Indices of the given 2-D shapes grouped by shape, groups in sorted shape order (as nanochat's
    `setup_optimizer`), indices ascending within a group. Raises ValueError for a non-2-D shape."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(shapes):
        s = tuple(int(d) for d in s)
        if len(s) != 2:
            raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {s}")
        groups.setdefault(s, []).append(i)
    return {shape_key(s): groups[s] for s in sorted(groups)}


def _padded(k: int, multiple: int) -> int:
    return -(-k // multiple) * multiple


# Arguments of `muon` that shape the computation and must stay Python values under optax.inject_hyperparams.
MUON_STATIC_ARGS = ("ns_steps", "ns_dtype", "stack_multiple", "stacked_update_fn", "muon_eq", "muon_plus")


def muon(learning_rate, momentum=0.95, ns_steps: int = 5, beta2=0.9, weight_decay=0.0, ns_dtype=BFLOAT16,
         stack_multiple: int = 1, stacked_update_fn: Callable | None = None, muon_eq: str = "row",
         muon_plus: bool = True) -> optax.GradientTransformation:
    """nanochat's Muon (Nesterov -> MuonEq -> Polar Express -> Muon+ -> NorMuon -> cautious weight decay) as an
    optax transformation.

    Every leaf of the params pytree must be a 2-D (out, in) matrix. Leaves of equal shape are stacked to (K, R, C)
    and updated together by `muon_update_stacked`; the update needs `params` (cautious weight decay). The emitted
    updates already include -lr, so apply them with `optax.apply_updates`.

    learning_rate, momentum, beta2 and weight_decay may be floats or traced scalars; to change them between steps
    without recompiling wrap with `optax.inject_hyperparams(muon)(learning_rate=..., momentum=..., ...)` (jaxchat's
    `make_optimizer` does this for the whole optimizer). Pass `static_args=MUON_STATIC_ARGS` there: otherwise
    inject_hyperparams turns the integer ns_steps / stack_multiple into traced values and callables (a dtype class,
    stacked_update_fn) into schedules.

    Args:
        learning_rate: base lr (nanochat matrix_lr 0.02); tall matrices get lr * sqrt(R/C).
        momentum: Nesterov momentum.
        ns_steps: Polar Express iterations, 1..5.
        beta2: NorMuon second-moment EMA (None: no averaging).
        weight_decay: cautious decoupled weight decay (multiplied by lr).
        ns_dtype: dtype of the Polar Express iterations (bfloat16 as nanochat, or float32).
        stack_multiple: pad each stack's K to a multiple of this (e.g. the device count) so the stack axis of the
            state and the work can be sharded evenly; padding rows are zeros and stay zero.
        stacked_update_fn: replacement for `muon_update_stacked` with the same signature, e.g. a `shard_map`
            over K of it.
        muon_eq: 'row' | 'col' | 'none' (see `equilibrate`).
        muon_plus: apply Muon+ (see `renormalize`).
    Returns:
        optax.GradientTransformation with state `MuonState`.
    Raises:
        ValueError: a non-2-D leaf (at init), params missing at update, ns_steps out of range, unknown muon_eq.
    Source: nanochat/optim.py (`MuonAdamW._step_muon`, `muon_step_fused`).
    """
    if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"muon: ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {ns_steps}")
    if stack_multiple < 1:
        raise ValueError(f"muon: stack_multiple must be >= 1, got {stack_multiple}")
    if muon_eq not in MUON_EQ_MODES:
        raise ValueError(f"muon: muon_eq must be one of {MUON_EQ_MODES}, got {muon_eq!r} (train flag --muon-eq)")
    core = stacked_update_fn or muon_update_stacked

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        mb, smb = {}, {}
        for key, idx in group_by_shape([p.shape for p in leaves]).items():
            rows, cols = leaves[idx[0]].shape
            k, dtype = _padded(len(idx), stack_multiple), leaves[idx[0]].dtype
            mb[key] = jnp.zeros((k, rows, cols), dtype)
            smb[key] = jnp.zeros(second_moment_shape(k, rows, cols), dtype)
        return MuonState(momentum_buffer=mb, second_momentum_buffer=smb)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("muon: update needs params (cautious weight decay); call tx.update(grads, state, params)")
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        out = [None] * len(g_leaves)
        mb, smb = dict(state.momentum_buffer), dict(state.second_momentum_buffer)
        for key, idx in group_by_shape([g.shape for g in g_leaves]).items():
            pad = mb[key].shape[0] - len(idx)
            g = jnp.stack([g_leaves[i] for i in idx])
            p = jnp.stack([p_leaves[i] for i in idx])
            if pad:
                zeros = jnp.zeros((pad,) + g.shape[1:], g.dtype)
                g, p = jnp.concatenate([g, zeros]), jnp.concatenate([p, zeros.astype(p.dtype)])
            u, mb[key], smb[key] = core(g, p, mb[key], smb[key], learning_rate=learning_rate, momentum=momentum,
                                        weight_decay=weight_decay, beta2=beta2, ns_steps=ns_steps, ns_dtype=ns_dtype,
                                        muon_eq=muon_eq, muon_plus=muon_plus)
            for j, i in enumerate(idx):
                out[i] = u[j]
        return jax.tree.unflatten(treedef, out), MuonState(mb, smb)

    return optax.GradientTransformation(init_fn, update_fn)
