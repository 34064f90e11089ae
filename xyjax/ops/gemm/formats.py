"""Weight formats of ``smooth_gemm``: how a dense layer's weight matrix is stored. The model never knows which
(gpt-fast's pattern: quantization swaps the linear's weight, not the model).

Every format holds transposed weights ``[..., N, K]`` (outputs first, each output's K inputs one row, as
``torch.nn.Linear``), has ``.shape`` ([..., N, K]) and a ``dense()`` view (float32 [..., N, K]):
    a plain array      [..., N, K] (or [..., K, N] when the gemm is called without ``transpose_w``);
    ``SplitBlocks``    a 4-bit block-quantized GGUF matrix (Q4_1: w = d * q + m per block of 32 inputs) in the
                       split block layout, each row ``[d * q | m]``: the ffi backend's AMX kernel multiplies it
                       exactly with five bfloat16 part products where plain float32 needs six;
    ``TileWeights``    weights exact in two bfloat16 parts (a ``SplitBlocks``, or a plain matrix that is)
                       stored as the AMX kernel's A tiles, read in place by the ffi backend (AMX-BF16 CPUs).
The loader returns the file's format; ``prepare_weights`` picks the format for the gemm backend and CPU at
engine start.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TILE_ROWS, TILE_K = 16, 32   # an AMX A tile: 16 weight rows x 32 bfloat16 along K
LAYOUTS = ("auto", "plain", "split", "tiles")


def _in_features(width: int, block: int) -> int:
    """K of a row of ``width`` = K + K / block values (block 0: K = width)."""
    return width * block // (block + 1) if block else width


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitBlocks:
    """A block-quantized matrix [..., N, K] as ``data`` [..., N, K + K / block] float32: per row the K values
    d * q (a float16 scale times a 4-bit integer), then the K / block block minimums m; w = d * q + m."""

    data: jax.Array
    block: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], _in_features(self.data.shape[-1], self.block))

    def dense(self) -> jax.Array:
        """w = d * q + m [..., N, K] float32 (rounded once, as gguf's dequantization computes it)."""
        K = self.shape[-1]
        data = jnp.asarray(self.data, jnp.float32)
        dq, mins = data[..., :K], data[..., K:]
        return (dq.reshape(*dq.shape[:-1], K // self.block, self.block) + mins[..., None]).reshape(dq.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileWeights:
    """A [..., N, KW] matrix (KW = K, or K + K / block holding a ``SplitBlocks``' data) exact in two bfloat16
    parts, w = hi + lo, as ``tiles`` [..., 16 ceil(N / 16), ceil(KW / 32), 2, 32] bfloat16: tiles[..., r, s, p, j]
    = part p of w[..., r, 32 s + j] (zero past N and KW), each row's 32-input steps a (hi, lo) pair of 64-byte
    lines, so an A tile is 16 rows' lines of one part. Four bytes per weight, nothing to convert per call."""

    tiles: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    kw: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.tiles.shape[:-4], self.n, _in_features(self.kw, self.block))

    def stored(self) -> jax.Array:
        """The float32 [..., N, KW] matrix the tiles hold (hi + lo)."""
        t = self.tiles.astype(jnp.float32)
        *lead, rows, ks, _, _ = t.shape
        return (t[..., 0, :] + t[..., 1, :]).reshape(*lead, rows, ks * TILE_K)[..., :self.n, :self.kw]

    def dense(self) -> jax.Array:
        w = self.stored()
        return SplitBlocks(w, self.block).dense() if self.block else w


FORMATS = (SplitBlocks, TileWeights)


def is_format(w) -> bool:
    return isinstance(w, FORMATS)


def dense(w) -> jax.Array:
    """Any weight format's dense view (a plain array as it is)."""
    return w.dense() if is_format(w) else w


def quantize_blocks(w, block: int = 32) -> SplitBlocks:
    """Plain [..., N, K] -> its 4-bit block quantization, rounded as GGUF's Q4_1 quantizer rounds: per block of
    ``block`` inputs, d = (max - min) / 15 and q = trunc((w - min) / d + 0.5) in [0, 15] from the float32 min
    and d, then d and m = min stored as float16."""
    w = np.asarray(w, np.float32)
    b = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.clip(np.trunc((b - lo) * inv + np.float32(0.5)), 0, 15)
    d16, mins = (v.astype(np.float16).astype(np.float32) for v in (d, lo))
    return SplitBlocks(np.concatenate([(d16 * q).reshape(w.shape), mins[..., 0]], axis=-1), block)


def pack_tiles(w: SplitBlocks | np.ndarray) -> TileWeights:
    """A ``SplitBlocks`` or a float32 [..., N, K] matrix -> TileWeights; a ValueError if some weight is not exact
    in two bfloat16 parts."""
    block = w.block if isinstance(w, SplitBlocks) else 0
    w = np.asarray(w.data if block else w, np.float32)
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
    return TileWeights(jnp.asarray(tiles), n, kw, block)


def convert(params, layout: str):
    """``params`` with every ``SplitBlocks`` leaf held as ``layout``: "plain" (dense float32), "split" (as is)
    or "tiles" (``pack_tiles``). Other leaves are left alone."""
    if layout not in LAYOUTS[1:]:
        raise ValueError(f"weight layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    to = {"plain": lambda w: w.dense(), "split": lambda w: w, "tiles": pack_tiles}[layout]
    return jax.tree.map(lambda w: to(w) if isinstance(w, SplitBlocks) else w, params,
                        is_leaf=lambda w: isinstance(w, SplitBlocks))
