"""SmoothGEMM as a Pallas kernel (Triton lowering; interpret mode on CPU), and ``gemm``, the pallas backend, which
runs it or the Mosaic GPU kernel (``pallas_mosaic.py``) by ``xyjax.ops.pallas_lowering``; the oracle is the xla
backend.

Contract (``xyjax.ops.gemm``)::

    out = smooth_gemm_pallas(x, w, m, *, tiling=GemmTiling(), interpret, transpose_w=False)

    x       [T, K] float32 / bfloat16: a bucket of T token rows, the first ``m`` real.
    w       [K, N] of x's dtype ([N, K] with transpose_w=True, e.g. a tied LM head ``embed``).
    m       int32 scalar, may be traced: real rows, 0 <= m <= T (clipped into that range).
    tiling  GemmTiling: block_m / block_n / block_k and the grid order (static: one program per value).
    returns [T, N] in x's dtype: rows < m are x @ w (float32 accumulation), rows >= m are zero.

Virtual padding: the grid covers the bucket in block_m x block_n tiles; a tile whose first row is at or
past ``m`` writes zeros and reads neither x nor w, so the work follows the real rows in block_m steps.
A live tile walks K in block_k slices (``lax.fori_loop``) with a float32 accumulator and zeroes its rows
>= m. Blocks past the edge of T or N (sizes that are not tile multiples) are clipped by Pallas: padded on
load, dropped on store. block_k must divide K (the profiler only proposes divisors).

Grid order: ``m_major`` runs the M tiles of one N column together (w's column block stays hot);
otherwise the N tiles of one M row (x's row block stays hot). Which is faster depends on the shape and the
device; ``xyjax profile`` measures it.

GPU: Pallas' Triton lowering (``compiler_params`` are Triton's); dots of at least 16 x 16 and power-of-two
block sizes. Tests run it with ``interpret=True`` on CPU and lower it to Triton IR for CUDA; running it
needs a GPU (``examples/gpu_check.py``). On Hopper the backend prefers the Mosaic GPU kernel and uses this one
for float32 and for shapes that one does not take.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xyjax.ops import pallas_lowering
from xyjax.ops.gemm import pallas_mosaic
from xyjax.ops.gemm.formats import dense, is_format
from xyjax.ops.gemm.xla import quantized_input, take_layer


@dataclasses.dataclass(frozen=True)
class GemmTiling:
    """One point of the Pallas SmoothGEMM's tuning space (see module docstring)."""

    block_m: int = 32
    block_n: int = 128
    block_k: int = 64
    m_major: bool = True
    num_warps: int = 4
    num_stages: int = 2

    def fit(self, T: int, K: int, N: int) -> "GemmTiling":
        """This tiling clipped to a [T, K] x [K, N] problem: blocks no larger than the next power of two of
        the dimension (at least 16), block_k a divisor of K."""
        def clip(block, n):
            return max(16, min(block, 1 << max(0, n - 1).bit_length()))
        block_k = clip(self.block_k, K)
        while K % block_k:
            block_k //= 2
        return dataclasses.replace(self, block_m=clip(self.block_m, T), block_n=clip(self.block_n, N),
                                   block_k=max(block_k, 1))


def _kernel(m_ref, x_ref, w_ref, o_ref, *, tile: GemmTiling, transpose_w: bool, precision):
    """One [block_m, block_n] output tile over the whole K (x block [bm, K], w block [K, bn] or [bn, K])."""
    i = pl.program_id(0 if tile.m_major else 1)
    bm, bk = tile.block_m, tile.block_k
    m = m_ref[0]
    first = i * bm

    @pl.when(first < m)
    def _():
        def step(k, acc):
            a = x_ref[:, pl.ds(k * bk, bk)]
            if transpose_w:
                b = w_ref[:, pl.ds(k * bk, bk)]
                dims = (((1,), (1,)), ((), ()))
            else:
                b = w_ref[pl.ds(k * bk, bk), :]
                dims = (((1,), (0,)), ((), ()))
            return acc + lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, x_ref.shape[1] // bk, step, jnp.zeros(o_ref.shape, jnp.float32))
        rows = first + jnp.arange(bm, dtype=jnp.int32)
        o_ref[...] = jnp.where(rows[:, None] < m, acc, 0.0).astype(o_ref.dtype)

    @pl.when(first >= m)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def smooth_gemm_pallas(x: jax.Array, w: jax.Array, m, *, tiling: GemmTiling = GemmTiling(), interpret: bool,
                       transpose_w: bool = False, precision=lax.Precision.HIGHEST) -> jax.Array:
    """``x @ w`` on the first ``m`` rows of ``x``, zeros below (module docstring)."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"expected x [T, K] and w [K, N]; got x {x.shape}, w {w.shape}")
    T, K = x.shape
    N = w.shape[0] if transpose_w else w.shape[1]
    if (w.shape[1] if transpose_w else w.shape[0]) != K:
        raise ValueError(f"x {x.shape} and w {w.shape}{' (transposed)' if transpose_w else ''} do not chain")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")
    tile = tiling.fit(T, K, N)
    bm, bn = tile.block_m, tile.block_n
    grid_m, grid_n = pl.cdiv(T, bm), pl.cdiv(N, bn)
    m_arr = jnp.clip(jnp.asarray(m, jnp.int32), 0, T).reshape(1)

    if tile.m_major:
        grid, ij = (grid_m, grid_n), (lambda a, b: (a, b))
    else:
        grid, ij = (grid_n, grid_m), (lambda a, b: (b, a))
    w_block = (bn, K) if transpose_w else (K, bn)
    w_index = (lambda a, b: (ij(a, b)[1], 0)) if transpose_w else (lambda a, b: (0, ij(a, b)[1]))
    kernel = functools.partial(_kernel, tile=tile, transpose_w=transpose_w, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((1,), lambda a, b: (0,)),
                  pl.BlockSpec((bm, K), lambda a, b: (ij(a, b)[0], 0)),
                  pl.BlockSpec(w_block, w_index)],
        out_specs=pl.BlockSpec((bm, bn), ij),
        out_shape=jax.ShapeDtypeStruct((T, N), x.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=tile.num_warps, num_stages=tile.num_stages),
        interpret=interpret,
        name=f"xyjax_smooth_gemm_m{bm}_n{bn}_k{tile.block_k}",
    )(m_arr, x, w)


def gemm(x, w, m, layer, transpose_w: bool, tuning: dict, lowering: str | None = None) -> jax.Array:
    """smooth_gemm's pallas backend on the weights' dense view: the Mosaic GPU kernel (``pallas_mosaic.py``) where
    ``lowering`` (None: ``pallas_lowering.default_lowering()``) picks it and it takes the call, else this module's
    (``tuning``: its GemmTiling fields; Triton on GPU, Pallas' interpreter on CPU)."""
    x = quantized_input(x, w)
    lowering = pallas_lowering.check(lowering or pallas_lowering.default_lowering())
    N = w.shape[-2] if transpose_w else w.shape[-1]
    if lowering in ("mosaic", "mosaic_interpret") and pallas_mosaic.unsupported(x.dtype, x.shape[1], N):
        lowering = pallas_lowering.fallback(lowering)
    if lowering in ("mosaic", "mosaic_interpret"):
        if is_format(w) or w.dtype != x.dtype:     # its dense view (or cast) is a new array anyway
            w, layer = dense(take_layer(w, layer)).astype(x.dtype), None
        return pallas_mosaic.smooth_gemm_mosaic(x, w, m, layer=layer, transpose_w=transpose_w,  # layer read in place
                                                interpret=lowering == "mosaic_interpret")
    w = dense(take_layer(w, layer)).astype(x.dtype)
    return smooth_gemm_pallas(x, w, m, tiling=GemmTiling(**tuning), transpose_w=transpose_w,
                              interpret=lowering == "interpret")


def auto_layout() -> str:
    return "plain"
