"""SmoothGEMM as a Pallas kernel for the Mosaic GPU lowering (Hopper: TMA pipeline into shared memory, wgmma).

Same contract as ``pallas.smooth_gemm_pallas`` (rows < m are x @ w with float32 accumulation, rows >= m zero,
result in x's dtype) for what ``unsupported`` accepts: bfloat16 / float16 x and w, K a multiple of ``BLOCK_K`` and
N a multiple of 64. ``pallas.gemm`` sends everything else to the Triton-style kernel.

Design: ``plgpu.kernel`` grid (T / BLOCK_M, N / block_n), one warpgroup per CTA; block_n the largest of
``BLOCK_N`` that divides N. A CTA whose first row is at or past m writes zeros and reads nothing (virtual
padding: the work follows the real rows in steps of 64, wgmma's M); a live CTA runs ``plgpu.emit_pipeline``
over K in BLOCK_K slices (x [64, BLOCK_K] and w [BLOCK_K, block_n] tiles by TMA, ``STEPS`` slices in flight,
wgmma into a float32 accumulator, released one step late so a wgmma can run while the next is issued), zeroes
rows >= m and writes its tile back by TMA. T is padded to a multiple of 64 rows (a copy only for buckets below
64). With ``transpose_w`` the w tiles are [block_n, BLOCK_K] slices of w [N, K], fed to wgmma transposed. A
stacked weight [L, ...] is read at ``layer`` in place (the layer a scalar in global memory), where slicing it out
first would copy that layer's weights on every call.

Tests lower it for CUDA from a CPU host (``jax.export``) and run it in Pallas' GPU interpreter; compiling and
running it needs the CUDA plugin and a Hopper GPU (``examples/gpu_check.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["smooth_gemm_mosaic", "unsupported"]

BLOCK_M = 64            # wgmma's M for one warpgroup
BLOCK_N = (128, 64)     # output columns per CTA: the first that divides N
BLOCK_K = 64            # one 128-byte swizzled row of bfloat16 per K slice
STEPS = 3               # K slices in flight
DTYPES = (jnp.bfloat16, jnp.float16)
SEMANTICS = plgpu.LoweringSemantics.Lane


def unsupported(dtype, K: int, N: int) -> str | None:
    """Why this kernel cannot take an x [T, K] @ w [K, N] gemm in ``dtype`` (None: it can)."""
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype)} is not bfloat16/float16"
    if K % BLOCK_K:
        return f"K={K} is not a multiple of {BLOCK_K}"
    if N % BLOCK_N[-1]:
        return f"N={N} is not a multiple of {BLOCK_N[-1]}"
    return None


def _transforms(cols: int, dtype):
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(m_ref, x_ref, w_ref, o_ref, o_smem, *, block_n: int, transpose_w: bool, stacked: bool):
    """One [BLOCK_M, block_n] output tile (module docstring); m_ref [2]: m and the layer of a stacked w."""
    i, j = lax.axis_index("m"), lax.axis_index("n")
    m = m_ref[0]
    if stacked:
        w_ref = w_ref.at[m_ref[1]]
    live = i * BLOCK_M < m
    K = x_ref.shape[1]
    tiles = _transforms(BLOCK_K, x_ref.dtype)

    def accumulate(acc_ref):
        def step(_, x_smem, w_smem):
            plgpu.wgmma(acc_ref, x_smem, w_smem.T if transpose_w else w_smem)
            plgpu.wgmma_wait(1)     # the previous slice's wgmma is done: its buffers are released next step

        w_spec = (plgpu.BlockSpec((block_n, BLOCK_K), lambda k: (j, k), transforms=tiles, delay_release=1)
                  if transpose_w else
                  plgpu.BlockSpec((BLOCK_K, block_n), lambda k: (k, j), transforms=tiles, delay_release=1))
        plgpu.emit_pipeline(
            step, grid=(K // BLOCK_K,),
            in_specs=[plgpu.BlockSpec((BLOCK_M, BLOCK_K), lambda k: (i, k), transforms=tiles, delay_release=1), w_spec],
            max_concurrent_steps=min(STEPS, K // BLOCK_K + 1),
        )(x_ref, w_ref)
        return acc_ref[...]

    @pl.when(live)
    def _():
        acc = pl.run_scoped(accumulate, plgpu.ACC((BLOCK_M, block_n), jnp.float32))
        rows = i * BLOCK_M + plgpu.broadcasted_iota(jnp.int32, (BLOCK_M, block_n), 0, layout=plgpu.Layout.WGMMA)
        o_smem[...] = jnp.where(rows < m, acc, 0.0).astype(o_smem.dtype)

    @pl.when(~live)
    def _():
        o_smem[...] = plgpu.layout_cast(jnp.zeros(o_smem.shape, o_smem.dtype), plgpu.Layout.WGMMA)

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(i * BLOCK_M, BLOCK_M), pl.ds(j * block_n, block_n)])
    plgpu.wait_smem_to_gmem(0)


def smooth_gemm_mosaic(x: jax.Array, w: jax.Array, m, *, layer=None, transpose_w: bool = False,
                       interpret: bool = False) -> jax.Array:
    """``x @ w`` ([T, K] @ [K, N], or w [N, K] with transpose_w) on the first m rows, zeros below, in x's dtype.
    ``layer``: None, or an int32 scalar (may be traced) and w a stack [L, ...] whose layer the kernel reads in
    place (no per-layer copy of the weights). ``interpret``: Pallas' GPU interpreter (CPU)."""
    stacked = layer is not None
    if x.ndim != 2 or w.ndim != 2 + stacked or x.dtype != w.dtype:
        raise ValueError(f"expected x [T, K] and w {'[L, K, N]' if stacked else '[K, N]'} of one dtype; got x "
                         f"{x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    T, K = x.shape
    N, w_k = (w.shape[-2], w.shape[-1]) if transpose_w else (w.shape[-1], w.shape[-2])
    why = unsupported(x.dtype, K, N) or (w_k != K and f"x {x.shape} and w {w.shape} do not chain")
    if why:
        raise ValueError(f"smooth_gemm_mosaic cannot take x {x.shape} @ w {w.shape}: {why}")
    block_n = next(b for b in BLOCK_N if N % b == 0)
    rows = BLOCK_M * pl.cdiv(T, BLOCK_M)
    x_rows = x if rows == T else jnp.pad(x, ((0, rows - T), (0, 0)))
    m_arr = jnp.stack([jnp.clip(jnp.asarray(m, jnp.int32), 0, T), jnp.asarray(0 if layer is None else layer,
                                                                                jnp.int32)])
    kernel = plgpu.kernel(
        functools.partial(_kernel, block_n=block_n, transpose_w=transpose_w, stacked=stacked),
        out_type=jax.ShapeDtypeStruct((rows, N), x.dtype),
        grid=(rows // BLOCK_M, N // block_n),
        grid_names=("m", "n"),
        scratch_types=[plgpu.SMEM((BLOCK_M, block_n), x.dtype, transforms=_transforms(block_n, x.dtype))],
        compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
        kernel_name=f"xyjax_smooth_gemm_mosaic_n{block_n}",
    )
    out = kernel(m_arr, x_rows, w)
    return out if rows == T else out[:T]
