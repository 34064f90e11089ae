"""Weight formats of ``smooth_gemm``: how a dense layer's weight matrix is stored. The model never knows which
(gpt-fast's pattern: quantization swaps the linear's weight, not the model).

Every format holds transposed weights ``[..., N, K]`` (outputs first, each output's K inputs one row, as
``torch.nn.Linear``), has ``.shape`` ([..., N, K]) and a ``dense()`` view (float32 [..., N, K]):
    a plain array      [..., N, K] (or [..., K, N] when the gemm is called without ``transpose_w``);
    ``SplitBlocks``    a 4-bit block-quantized GGUF matrix (Q4_1: w = d * q + m per block of 32 inputs) in the
                       split block layout, each row ``[d * q | m]``: the ffi backend's AMX kernel multiplies it
                       exactly with five bfloat16 part products where plain float32 needs six;
    ``TileWeights``    weights exact in two bfloat16 parts (a ``SplitBlocks``, or a plain matrix that is)
                       stored as the AMX kernel's A tiles, read in place by the ffi backend (AMX-BF16 CPUs);
    ``GGUFBlocks``     a GGUF block-quantized matrix (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) as the file's bytes, each
                       row its blocks; ``dense()`` is gguf's own dequantization, float32 bit for bit; the ffi
                       backend's block kernels read every qtype in place, dequantizing to the same float32 weights.
The loader returns the file's format (``GGUFBlocks``); ``prepare_weights`` picks the format for the gemm backend
and CPU at engine start; ``take_rows`` looks rows up (an embedding) in any format.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TILE_ROWS, TILE_K = 16, 32   # an AMX A tile: 16 weight rows x 32 bfloat16 along K
LAYOUTS = ("auto", "plain", "split", "tiles", "blocks")


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


# GGUF block formats GGUFBlocks holds: qtype -> (inputs per block, bytes per block), as ``gguf.GGML_QUANT_SIZES``.
# A row is its K / block blocks back to back; float16 fields little-endian; w[j] is input j of the block (the ffi
# handler's block kernels read these layouts in place: ascend_ffi/src/smooth_gemm_blocks_format.h):
#   Q8_0 (34 B)  d f16 | q int8 x 32                          w[j] = q[j] * d
#   Q4_0 (18 B)  d f16 | 16 B nibbles                         q[j] = byte[j % 16] low nibble (j < 16) or high
#                                                              (j >= 16); w[j] = d * (q[j] - 8)
#   Q4_1 (20 B)  d f16 | m f16 | 16 B nibbles (as Q4_0)       w[j] = d * q[j] + m
#   Q4_K (144 B) d f16 | dmin f16 | 12 B scales | 128 B qs    8 sub-blocks s of 32 with 6-bit scale sc[s] and min
#                mn[s]: bytes 0-3 low 6 bits: sc[0..3], bytes 4-7: mn[0..3]; sc[4+i] = byte[8+i] & 15 |
#                (byte[i] >> 6) << 4, mn[4+i] = byte[8+i] >> 4 | (byte[4+i] >> 6) << 4; q of sub-block 2c / 2c+1:
#                the low / high nibbles of qs[32c .. 32c+31]; w = (d * sc[s]) * q - (dmin * mn[s])
#   Q6_K (210 B) ql 128 B | qh 64 B | scales int8 x 16 | d f16   for j in [0, 256): h = j // 128, r = j % 128:
#                low 4 bits = ql[64h + r % 64] >> (4 (r >= 64)) & 15, high 2 bits = qh[32h + r % 32] >> 2 (r // 32)
#                & 3; q = (low | high << 4) - 32; w = (d * scales[j // 16]) * q
GGUF_QTYPES = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _f16(b: jax.Array) -> jax.Array:
    """Little-endian float16 bytes [..., 2] uint8 -> float32 [...]."""
    bits = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """Bytes [..., n] -> [..., 2, n]: the low nibbles, then the high nibbles (uint8)."""
    return jnp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _q8_0(b):
    d, x = _f16(b[..., 0:2]), jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return x * d[..., None]


def _q4_0(b):
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 2:]).reshape(*b.shape[:-1], 32).astype(jnp.int8) - jnp.int8(8)
    return d[..., None] * q.astype(jnp.float32)


def _q4_1_parts(b):
    """Q4_1 blocks [..., 20] -> (d [..., 1], q [..., 32], m [..., 1]) float32; w = d * q + m."""
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 4:]).reshape(*b.shape[:-1], 32).astype(jnp.float32)
    return d[..., None], q, m[..., None]


def _q4_1(b):
    d, q, m = _q4_1_parts(b)
    return d * q + m


def _q4_k_scale_min(s):
    """The 12 packed scale bytes [..., 12] -> (scales, mins) [..., 8] of the 8 sub-blocks (6 bits each)."""
    d, m, m_d = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(b):
    lead = b.shape[:-1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _q4_k_scale_min(b[..., 4:16])
    ds = (d[..., None] * sc.astype(jnp.float32))[..., None]          # [..., 8, 1]
    dm = (dmin[..., None] * mn.astype(jnp.float32))[..., None]
    q = _nibbles(b[..., 16:].reshape(*lead, 4, 32)).reshape(*lead, 8, 32).astype(jnp.float32)
    return (ds * q - dm).reshape(*lead, 256)


def _q6_k(b):
    lead = b.shape[:-1]
    ql, qh = b[..., :128].reshape(*lead, 2, 64), b[..., 128:192].reshape(*lead, 2, 1, 32)
    scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16(b[..., 208:210])[..., None] * scales)[..., None]         # [..., 16, 1]
    lo = _nibbles(ql).reshape(*lead, 256)
    hi = ((qh >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 0x03).reshape(*lead, 256)
    q = (lo | (hi << 4)).astype(jnp.int8) - jnp.int8(32)
    return (d * q.reshape(*lead, 16, 16).astype(jnp.float32)).reshape(*lead, 256)


_DEQUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GGUFBlocks:
    """A block-quantized matrix [..., N, K] exactly as a GGUF file stores it: ``data`` [..., N, row_bytes] uint8,
    each output row its K / block blocks of ``qtype`` (``GGUF_QTYPES``) one after another, as in the file.
    ``dense()`` computes gguf's own dequantization (``gguf.quants.dequantize``) in jnp, float32 bit for bit."""

    data: jax.Array
    qtype: str = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    act_quant: str = dataclasses.field(default="none", metadata=dict(static=True))   # the gemm's x: "none", "int8"

    def __post_init__(self):
        if self.act_quant not in ("none", "int8"):
            raise ValueError(f"GGUFBlocks: act_quant must be 'none' or 'int8', got {self.act_quant!r}")
        if self.qtype not in GGUF_QTYPES:
            raise ValueError(f"GGUFBlocks: unsupported GGUF type {self.qtype!r}; supported: {', '.join(GGUF_QTYPES)}")
        block, nbytes = GGUF_QTYPES[self.qtype]
        shape = getattr(self.data, "shape", None)
        if shape is not None and (self.k % block or shape[-1] != self.k // block * nbytes):
            raise ValueError(f"GGUFBlocks {self.qtype}: rows of {shape[-1]} bytes do not hold K = {self.k} inputs "
                             f"in blocks of {block} ({nbytes} bytes each)")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.k)

    def blocks(self) -> jax.Array:
        """``data`` as [..., N, K / block, block bytes] uint8."""
        block, nbytes = GGUF_QTYPES[self.qtype]
        return jnp.asarray(self.data, jnp.uint8).reshape(*self.data.shape[:-1], self.k // block, nbytes)

    def dense(self) -> jax.Array:
        """float32 [..., N, K], each weight the float32 value ``gguf.quants.dequantize`` gives (same operations
        in the same order)."""
        return _DEQUANTIZE[self.qtype](self.blocks()).reshape(self.shape)

    def split(self) -> SplitBlocks:
        """Q4_1 only: the same weights as ``SplitBlocks`` [d * q | m] (d * q is exact in float32, so
        ``SplitBlocks.dense()`` = d * q + m rounded once, as ``dense()``)."""
        if self.qtype != "Q4_1":
            raise ValueError(f"GGUFBlocks.split: only Q4_1 blocks have a split layout, not {self.qtype}")
        d, q, m = _q4_1_parts(self.blocks())
        return SplitBlocks(jnp.concatenate([(d * q).reshape(self.shape), m[..., 0]], axis=-1), 32)


FORMATS = (SplitBlocks, TileWeights, GGUFBlocks)


def is_format(w) -> bool:
    return isinstance(w, FORMATS)


def dense(w) -> jax.Array:
    """Any weight format's dense view (a plain array as it is)."""
    return w.dense() if is_format(w) else w


def with_activation_quant(params, mode: str):
    """``params`` with every ``GGUFBlocks`` leaf's gemm input quantized as ``mode`` says ("none", "int8":
    ``xyjax.ops.gemm.quant``); a plain or split weight cannot take int8 activations (a ValueError)."""
    def to(w):
        if isinstance(w, GGUFBlocks):
            return dataclasses.replace(w, act_quant=mode)
        if mode != "none" and is_format(w):
            raise ValueError(f"int8 activations need the weights as GGUF blocks (weight layout 'blocks'), got "
                             f"{type(w).__name__}")
        return w

    return jax.tree.map(to, params, is_leaf=is_format)


def take_rows(w, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` [T] int32 of a weight [N, K] in any format as [T, K] (an embedding lookup): only those rows
    are dequantized (float32; a plain array keeps its dtype)."""
    if isinstance(w, GGUFBlocks):
        return GGUFBlocks(jnp.asarray(w.data)[ids], w.qtype, w.k).dense()
    if isinstance(w, SplitBlocks):
        return SplitBlocks(jnp.asarray(w.data)[ids], w.block).dense()
    return dense(w)[ids]


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
    """``params`` with every block-quantized leaf (``GGUFBlocks``, ``SplitBlocks``) held as ``layout``:
    "plain" (dense float32), "split" (Q4_1 ``GGUFBlocks`` -> ``SplitBlocks``, other qtypes plain), "tiles" (as
    "split", then ``pack_tiles``) or "blocks" (``GGUFBlocks`` kept as the file's blocks, ``SplitBlocks`` as
    they are). Other leaves (plain arrays, ``TileWeights``) are left alone."""
    if layout not in LAYOUTS[1:]:
        raise ValueError(f"weight layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")

    def to(w):
        if layout == "blocks":
            return w
        if layout == "plain":
            return w.dense()
        if isinstance(w, GGUFBlocks):
            if w.qtype != "Q4_1":
                return w.dense()
            w = w.split()
        return pack_tiles(w) if layout == "tiles" else w

    blocky = lambda w: isinstance(w, (SplitBlocks, GGUFBlocks))  # noqa: E731
    return jax.tree.map(lambda w: to(w) if blocky(w) else w, params, is_leaf=blocky)


def split_outputs(w, n: int, sections: tuple[int, ...] | None = None) -> list:
    """A weight [..., N, K] (plain or ``GGUFBlocks``, host arrays) cut into ``n`` column-parallel shards by output
    rows: each section of ``sections`` (row counts summing to N, e.g. the q, k, v parts of a fused QKV; None: one
    section) is cut into n equal pieces and shard s holds piece s of every section, in order. A row is whole in any
    block format, so only the row counts must divide (a ValueError naming the section otherwise)."""
    data = np.asarray(w.data if isinstance(w, GGUFBlocks) else _host_plain(w, "split_outputs"))
    sections = sections or (data.shape[-2],)
    if sum(sections) != data.shape[-2]:
        raise ValueError(f"split_outputs: sections {sections} do not add up to the {data.shape[-2]} output rows")
    bad = [size for size in sections if size % n]
    if bad:
        raise ValueError(f"split_outputs: a section of {bad[0]} output rows does not divide into {n} shards")
    pieces = np.split(data, np.cumsum(sections)[:-1], axis=-2)
    shards = [np.concatenate([np.split(p, n, axis=-2)[s] for p in pieces], axis=-2) for s in range(n)]
    return [dataclasses.replace(w, data=d) if isinstance(w, GGUFBlocks) else d for d in shards]


def split_inputs(w, n: int) -> list:
    """A weight [..., N, K] (plain or ``GGUFBlocks``, host arrays) cut into ``n`` row-parallel shards along K:
    shard s holds inputs [s K / n, (s + 1) K / n). ``GGUFBlocks`` are cut at block boundaries, so K / n must be a
    multiple of the qtype's block (a ValueError naming both otherwise)."""
    if not isinstance(w, GGUFBlocks):
        data = _host_plain(w, "split_inputs")
        if data.shape[-1] % n:
            raise ValueError(f"split_inputs: K = {data.shape[-1]} inputs do not divide into {n} shards")
        return np.split(data, n, axis=-1)
    block = GGUF_QTYPES[w.qtype][0]
    if w.k % (n * block):
        raise ValueError(f"split_inputs: K = {w.k} inputs of {w.qtype} blocks ({block} inputs each) do not cut "
                         f"into {n} shards at block boundaries")
    return [dataclasses.replace(w, data=d, k=w.k // n) for d in np.split(np.asarray(w.data), n, axis=-1)]


def _host_plain(w, what: str) -> np.ndarray:
    if is_format(w):
        raise ValueError(f"{what}: tensor parallelism shards plain matrices and GGUF blocks, not {type(w).__name__} "
                         f"(use weight_layout 'plain' or 'blocks')")
    return np.asarray(w)
