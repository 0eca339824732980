"""Float tolerances derived from the dtype and the size of the reduction, for tests that compare two computations
of the same value which differ only in rounding (another framework, summation order, blocking, chunking, a
different CPU's kernels: AMD EPYC with AVX-512, Intel Xeon with AMX).

The model: each floating-point add or multiply rounds with relative error at most eps/2. Summing n terms in an
order the test does not control leaves an error that grows like sqrt(n) (rounding errors of random sign; the
worst case is n) times eps times the size of the values. So

    tol(dtype, n, scale) = C * eps(dtype) * sqrt(n) * scale

with `n` the longest chain of accumulated products behind one compared value (for a network: summed over its
layers, see `gpt_reduction_len`) and `scale` the magnitude of the compared values (max |reference|; for a sum of
non-negative terms, the sum itself). C = 2: on the AMD EPYC CI machine the comparisons of test_model.py and
test_sharding.py sit at C <= 0.25 (measured: max |diff| / (eps sqrt(n) scale)), so C = 2 leaves a margin of 8x or
more for other CPUs' kernels, while a real bug moves values by far more: the short window off by one position
changes the T=256 logits by 0.28, 2300x the tolerance there.
"""

from __future__ import annotations

import math

import numpy as np

C = 2.0


def eps(dtype) -> float:
    """Machine epsilon of `dtype` (float32: 1.19e-7, bfloat16: 7.8e-3); works for jnp and np dtypes."""
    import jax.numpy as jnp

    return float(jnp.finfo(dtype).eps)


def tol(dtype, n: int, scale: float, c: float = C) -> float:
    """Absolute tolerance `c * eps(dtype) * sqrt(n) * scale` (see the module docstring)."""
    return c * eps(dtype) * math.sqrt(n) * float(scale)


def scale_of(ref) -> float:
    """max |ref|, the magnitude to pass as `scale` (1.0 for an all-zero reference, so tol stays positive)."""
    m = float(np.max(np.abs(np.asarray(ref, dtype=np.float64)))) if np.size(ref) else 0.0
    return m if m > 0 else 1.0


def gpt_reduction_len(config, seq_len: int) -> int:
    """Products accumulated into one logit of a GPT forward over `seq_len` tokens: per block the q/k/v projection,
    c_proj, c_fc (n_embd each) and the MLP's c_proj (4 n_embd), the q.k score (head_dim), softmax and weighted
    sum (seq_len each); then the lm_head (n_embd)."""
    head_dim = config.n_embd // config.n_head
    return config.n_layer * (7 * config.n_embd + head_dim + 2 * seq_len) + config.n_embd


def assert_close(actual, desired, dtype, n: int, scale: float | None = None, err_msg: str = "") -> float:
    """`assert_allclose` at `tol(dtype, n, scale)` (scale defaults to max |desired|), with the tolerance in the
    message. Returns the tolerance."""
    atol = tol(dtype, n, scale_of(desired) if scale is None else scale)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), atol=atol, rtol=0,
                               err_msg=f"{err_msg} (tol = {C} * eps * sqrt({n}) * scale = {atol:.3g})")
    return atol


def rounded_product_rel_tol(*operand_dtypes) -> float:
    """Relative (Frobenius-norm) error of a matrix product whose operands were each rounded once to these dtypes
    (e.g. quantised to float8), against the product of the unrounded operands: the sum of their unit roundoffs
    eps/2, the first-order bound on each product term's relative error. Independent rounding errors leave the
    observed error near sqrt(sum of u^2 / 3), 2-3x below; a wrong scale or operand is off by O(1)."""
    return sum(eps(d) / 2 for d in operand_dtypes)


def sample_std_tol(sigma: float, n_samples: int, k: float = 6.0) -> float:
    """Tolerance on the standard deviation of `n_samples` i.i.d. draws of std `sigma` (a statistical, not a
    rounding, tolerance): k standard errors, sigma / sqrt(2 n) each for a normal (a uniform's is smaller)."""
    return k * sigma / math.sqrt(2 * n_samples)
