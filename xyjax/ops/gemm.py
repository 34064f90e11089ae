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

``quant_block`` (with ``transpose_w``; 0: plain): w is the split layout of a block-quantized matrix (the
loader's for GGUF Q4_1, w = d * q + m per block of ``quant_block`` inputs): each row ``[d * q | m]``, w
[N, K + K / quant_block], and the op computes ``extend_x(x, quant_block) @ w.T``, x followed by its block sums.
d * q (a float16 scale times a 4-bit integer) and m (float16) are exact in two bfloat16 parts, so the ffi
backend's AMX kernel needs five bfloat16 part products where plain float32 weights need six; ffi needs
quant_block = 32 and float32. w may also be ``TileWeights`` (with ``transpose_w``): weights exact in two bfloat16
parts, such as the split layout, stored as the AMX kernel's tiles, which the ffi backend reads in place with no
conversion (CPUs with AMX-BF16 only); the other backends unpack them first.

Backends: ``xla`` (pure jnp, the oracle: computes every row, then zeroes the padding), ``ffi`` (the C++ CPU
handler in ``ascend_ffi/src/smooth_gemm_cpu.cc``: BLAS gemms over exactly m rows, float32 or bfloat16;
an m outside [0, T] fails when the call runs), ``pallas`` (``gemm_pallas.py``: tiles past m skip their
work; Triton on GPU, interpret mode on CPU).

``tuning``: the backend's tunables for this shape and bucket (``xyjax.gemm_profile`` measures them; None or
missing keys: defaults). ffi: ``lanes`` (0 = every lane of the thread pool), ``split_rows`` (cut rows, not
columns, over the lanes), ``m_align`` (compute m rounded up to this, then zero the extra rows), ``stream_rows``
(float32 with ``transpose_w`` and m <= this: the handler's own streaming kernel, which reads the weights once in
place, instead of the BLAS, which packs them; AVX-512 CPUs), ``amx_rows`` (the float32 ``transpose_w`` gemms
the streaming kernel does not take, with m >= this > 0: the handler's AMX kernel, float32-accurate sums of
bfloat16 tile products; CPUs with AMX-BF16, elsewhere the BLAS). pallas: the ``GemmTiling`` fields. xla: none.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

import ascend_ffi
from ascend_ffi import blas

BACKENDS = ("xla", "ffi", "pallas")
FFI_TARGET = "xyjax_smooth_gemm_cpu"   # jax.ffi target of the C++ CPU handler
FFI_DTYPES = (jnp.float32, jnp.bfloat16)


FFI_TUNING = dict(lanes=0, split_rows=False, m_align=1, stream_rows=24, amx_rows=1)   # the ffi backend's defaults
# ... with quant_block: the two-part AMX kernel overtakes the streaming kernel from ~12 rows (BENCHMARKS.md)
FFI_TUNING_SPLIT = dict(FFI_TUNING, stream_rows=12)
TILE_ROWS, TILE_K = 16, 32   # an AMX A tile: 16 weight rows x 32 bfloat16 along K


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileWeights:
    """Weights w [..., N, KW] (rows of KW inputs, transposed: outputs first) exact in two bfloat16 parts,
    w = hi + lo, stored as what the ffi AMX kernel loads its tiles from: ``tiles`` [..., 16 ceil(N / 16),
    ceil(KW / 32), 2, 32] bfloat16, tiles[..., r, s, p, j] = part p of w[..., r, 32 s + j] (zero past N and KW):
    each row's 32-input steps as a (hi, lo) pair of 64-byte lines, so an A tile is 16 rows' lines of one part.
    Four bytes per weight, as float32, with nothing to convert per call; every ffi gemm on them runs the AMX
    kernel."""

    tiles: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    kw: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weights held, [..., N, KW]."""
        return (*self.tiles.shape[:-4], self.n, self.kw)


def pack_tiles(w: np.ndarray) -> TileWeights:
    """float32 w [..., N, KW] -> TileWeights; a ValueError if some weight is not exact in two bfloat16 parts."""
    w = np.asarray(w, np.float32)
    *lead, n, kw = w.shape
    hi = w.astype(jnp.bfloat16)
    lo = (w - hi.astype(np.float32)).astype(jnp.bfloat16)
    if not np.array_equal(hi.astype(np.float32) + lo.astype(np.float32), w):
        raise ValueError("pack_tiles: the weights are not exact in two bfloat16 parts (e.g. not the split layout "
                         "of 4-bit blocks)")
    rows, ks = -(-n // TILE_ROWS) * TILE_ROWS, -(-kw // TILE_K)
    tiles = np.zeros((*lead, rows, ks, 2, TILE_K), jnp.bfloat16)
    pad = [(0, 0)] * (len(lead) + 1) + [(0, ks * TILE_K - kw)]
    for p, part in enumerate((hi, lo)):
        tiles[..., :n, :, p, :] = np.pad(part, pad).reshape(*lead, n, ks, TILE_K)
    return TileWeights(jnp.asarray(tiles), n, kw)


def unpack_tiles(w: TileWeights) -> jax.Array:
    """TileWeights -> the float32 weights [..., N, KW] they hold (hi + lo)."""
    t = w.tiles.astype(jnp.float32)
    *lead, rows, ks, _, _ = t.shape
    return (t[..., 0, :] + t[..., 1, :]).reshape(*lead, rows, ks * TILE_K)[..., :w.n, :w.kw]


def split_layout_pays() -> bool:
    """Whether the split block layout beats plain float32 weights here: on CPU with the ffi handler's AMX kernel
    (its two-part path; elsewhere the layout only adds x_ext's columns)."""
    return jax.default_backend() == "cpu" and bool(ascend_ffi.load().xyjax_gemm_amx())


def extend_x(x: jax.Array, quant_block: int) -> jax.Array:
    """[T, K] -> [T, K + K / quant_block]: x followed by the float32 sums of its ``quant_block``-column blocks."""
    T, K = x.shape
    sums = x.reshape(T, K // quant_block, quant_block).astype(jnp.float32).sum(-1)
    return jnp.concatenate([x, sums.astype(x.dtype)], axis=1)


def smooth_gemm(x: jax.Array, w: jax.Array | TileWeights, m: jax.Array | int, *,
                layer: jax.Array | int | None = None, transpose_w: bool = False, quant_block: int = 0,
                backend: str = "xla", tuning: dict | None = None) -> jax.Array:
    """``x @ w[layer]`` (``.T`` with ``transpose_w``) on the first ``m`` rows, zeros below (see module docstring)."""
    tiles = isinstance(w, TileWeights)
    if tiles and not transpose_w:
        raise ValueError("TileWeights hold transposed weights [N, K]: pass transpose_w=True")
    if tiles and backend != "ffi":
        w = unpack_tiles(w)
    chex.assert_rank(x, 2)
    if len(w.shape) != (2 if layer is None else 3):
        raise ValueError(f"w must be {'[K, N]' if layer is None else '[L, K, N]'} (transposed: N, K), got {w.shape}")
    K = x.shape[1]
    if quant_block and (not transpose_w or K % quant_block):
        raise ValueError(f"quant_block={quant_block} needs transpose_w and K={K} a multiple of it")
    if w.shape[-1 if transpose_w else -2] != K + (K // quant_block if quant_block else 0):
        split = f" (quant_block={quant_block}: w's rows hold K + K / {quant_block})" if quant_block else ""
        raise ValueError(f"x {x.shape} and w {w.shape}{' (transposed)' if transpose_w else ''} do not chain{split}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown gemm backend {backend!r}; available: {', '.join(map(repr, BACKENDS))}")
    if backend == "ffi":
        return _gemm_ffi(x, w, m, 0 if layer is None else layer, transpose_w, quant_block, tuning or {})
    if quant_block:
        x = extend_x(x, quant_block)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
    if backend == "pallas":
        from xyjax.ops.gemm_pallas import GemmTiling, smooth_gemm_pallas

        return smooth_gemm_pallas(x, w, m, tiling=GemmTiling(**(tuning or {})), transpose_w=transpose_w,
                                  interpret=jax.default_backend() == "cpu")
    rows = jnp.arange(x.shape[0])[:, None]
    out = jax.lax.dot_general(x, w, (((1,), (1 if transpose_w else 0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return jnp.where(rows < m, out, 0).astype(x.dtype)


def _gemm_ffi(x, w, m, layer, transpose_w: bool, quant_block: int, tuning: dict):
    """The C++ handler as a jax.ffi custom call (CPU only), the BLAS loaded first (``ascend_ffi.blas``)."""
    tiles = isinstance(w, TileWeights)
    if x.dtype not in FFI_DTYPES or (w.tiles.dtype != jnp.bfloat16 or x.dtype != jnp.float32 if tiles
                                     else w.dtype != x.dtype):
        raise TypeError(f"ffi gemm backend: x and w must be both float32 or both bfloat16 (TileWeights: x float32), "
                        f"got {x.dtype} and {'TileWeights' if tiles else w.dtype}")
    if quant_block not in (0, 32) or (quant_block and x.dtype != jnp.float32):
        raise ValueError(f"ffi gemm backend: quant_block must be 0 or 32 (float32 only), got {quant_block} with "
                         f"{x.dtype}")
    unknown = set(tuning) - set(FFI_TUNING)
    if unknown:
        raise ValueError(f"unknown ffi gemm tunables {sorted(unknown)}; known: {sorted(FFI_TUNING)}")
    params = {**(FFI_TUNING_SPLIT if quant_block else FFI_TUNING), **tuning}
    if min(params["lanes"], params["stream_rows"], params["amx_rows"]) < 0 or params["m_align"] < 1:
        raise ValueError(f"ffi gemm tunables need lanes, stream_rows, amx_rows >= 0 and m_align >= 1, got {params}")
    blas.load()
    ascend_ffi.register_ffi_target(FFI_TARGET, "XyjaxSmoothGemmCpu", platform="cpu")
    n = w.shape[-2] if transpose_w else w.shape[-1]
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))
    return call(x, w.tiles if tiles else w, jnp.asarray(m, jnp.int32), jnp.asarray(layer, jnp.int32),
                transpose_w=transpose_w, lanes=np.int32(params["lanes"]), split_rows=bool(params["split_rows"]),
                m_align=np.int32(params["m_align"]), stream_rows=np.int32(params["stream_rows"]),
                amx_rows=np.int32(params["amx_rows"]), quant_block=np.int32(quant_block), w_tiles=tiles)
