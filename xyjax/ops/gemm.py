"""SmoothGEMM: a dense layer over a bucket-sized token block where only the first ``m`` rows are real.

Contract (every backend):
    x: [T, K] float, w: [K, N] float (same dtype), m: int32 scalar with 0 <= m <= T.
Returns [T, N] in x's dtype: rows < m are ``x @ w``, rows >= m are zero (virtual padding: fast
backends skip them; this result is defined and tested).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def smooth_gemm(x: jax.Array, w: jax.Array, m: jax.Array | int, *, backend: str = "xla") -> jax.Array:
    """``x @ w`` on the first ``m`` rows, zeros below (see module docstring)."""
    chex.assert_rank([x, w], 2)
    chex.assert_axis_dimension(w, 0, x.shape[1])
    if backend == "xla":
        rows = jnp.arange(x.shape[0])[:, None]
        out = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return jnp.where(rows < m, out, 0).astype(x.dtype)
    raise ValueError(f"unknown gemm backend {backend!r}; available: 'xla'")
