"""SmoothGEMM: a dense layer over a bucket-sized token block where only the first ``m`` rows are real.

Contract (every backend):
    x: [T, K] float, w: [K, N] float of x's dtype ([N, K] with ``transpose_w``: the op then computes
    ``x @ w.T`` without materialising the transpose, e.g. a tied LM head ``embed`` [V, D]),
    m: int32 scalar (data, not shape) with 0 <= m <= T.
    layer: None, or an int32 scalar and w a stack [L, K, N] ([L, N, K]) of which w[layer] is used: the ffi
    backend reads that layer in place, where slicing it out first (as ``lax.scan`` over the weights does)
    would copy it every step.
Returns [T, N] in x's dtype, accumulated in float32: rows < m are ``x @ w``, rows >= m are zero (virtual
padding: fast backends skip them; this result is defined and tested).

Backends: ``xla`` (pure jnp, the oracle: computes every row, then zeroes the padding), ``ffi`` (the C++ CPU
handler in ``ascend_ffi/src/smooth_gemm_cpu.cc``: one BLAS gemm over exactly m rows, float32 or bfloat16;
an m outside [0, T] fails when the call runs), ``pallas`` (not built yet).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

import ascend_ffi
from ascend_ffi import blas

BACKENDS = ("xla", "ffi", "pallas")
FFI_TARGET = "xyjax_smooth_gemm_cpu"   # jax.ffi target of the C++ CPU handler
FFI_DTYPES = (jnp.float32, jnp.bfloat16)


def smooth_gemm(x: jax.Array, w: jax.Array, m: jax.Array | int, *, layer: jax.Array | int | None = None,
                transpose_w: bool = False, backend: str = "xla") -> jax.Array:
    """``x @ w[layer]`` (``.T`` with ``transpose_w``) on the first ``m`` rows, zeros below (see module docstring)."""
    chex.assert_rank([x, w], [2, 2 if layer is None else 3])
    chex.assert_axis_dimension(w, w.ndim - (1 if transpose_w else 2), x.shape[1])
    if backend == "ffi":
        return _gemm_ffi(x, w, m, 0 if layer is None else layer, transpose_w)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
    if backend == "xla":
        rows = jnp.arange(x.shape[0])[:, None]
        out = jax.lax.dot_general(x, w, (((1,), (1 if transpose_w else 0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return jnp.where(rows < m, out, 0).astype(x.dtype)
    if backend == "pallas":
        raise ValueError("the pallas gemm backend is not built yet; available now: 'xla', 'ffi'")
    raise ValueError(f"unknown gemm backend {backend!r}; available: {', '.join(map(repr, BACKENDS))}")


def _gemm_ffi(x, w, m, layer, transpose_w: bool):
    """The C++ handler as a jax.ffi custom call (CPU only), the BLAS loaded first (``ascend_ffi.blas``)."""
    if x.dtype not in FFI_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"ffi gemm backend: x and w must be both float32 or both bfloat16, got {x.dtype} and {w.dtype}")
    blas.load()
    ascend_ffi.register_ffi_target(FFI_TARGET, "XyjaxSmoothGemmCpu", platform="cpu")
    n = w.shape[-2] if transpose_w else w.shape[-1]
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))
    return call(x, w, jnp.asarray(m, jnp.int32), jnp.asarray(layer, jnp.int32), transpose_w=transpose_w)
