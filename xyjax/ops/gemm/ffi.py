"""The ffi backend of smooth_gemm: the C++ CPU handler (``ascend_ffi/src/smooth_gemm_cpu.cc``) as a jax.ffi
custom call, every weight format read in place.

Tunables (``tuning``; missing keys: ``TUNING``, or ``TUNING_SPLIT`` for block-quantized weights): ``lanes``
(0 = every lane of the thread pool), ``split_rows`` (cut rows, not columns, over the lanes), ``m_align`` (compute
m rounded up to this, then zero the extra rows), ``stream_rows`` (float32 with ``transpose_w`` and m <= this: the
handler's streaming kernel, which reads the weights once in place, instead of the BLAS, which packs them;
AVX-512 CPUs; for ``GGUFBlocks`` m <= this runs the block streaming kernel, larger m the block panels: dequantized
weight rows, then AMX or the BLAS), ``amx_rows`` (the float32 ``transpose_w`` gemms and block panels the streaming
kernels do not take, with m >= this > 0: the AMX kernel, float32-accurate sums of bfloat16 tile products; AMX-BF16
CPUs, elsewhere the BLAS).

``GGUFBlocks`` of every qtype (``GGUF_QTYPE_IDS``: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) are read in place by the handler's
block kernels, each weight exactly ``dense()``'s float32, in the copy for the best instruction set this CPU runs
(``block_copies()``: AVX-512F, AVX2 with FMA and F16C, portable); the environment variable
``XYJAX_GEMM_BLOCKS_KERNEL`` (generic, avx2, avx512), read on every call, forces one (a copy this CPU does not run is
an error).

``GGUFBlocks`` with ``act_quant="int8"`` (``xyjax.ops.gemm.quant``): the handler quantizes x's m rows once per call,
bit for bit as ``quant.quantize_activations``; for m <= ``stream_rows`` its int8 kernels multiply them with the
blocks' integers in place (exact int32 sums per 4 inputs, float32 scales and accumulation), in the copy for the best
instruction set this CPU runs (``int8_copies()``: AVX-512 VNNI, AVX2, portable) or the one ``XYJAX_GEMM_INT8_KERNEL``
(generic, avx2, avx512vnni) names; larger m run the block panels on the fake-quantized rows d * q (float32). Both are
within float32 rounding of the xla backend's result (fake-quantized x times the dense weights).
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

import ascend_ffi
from ascend_ffi import blas
from xyjax.ops.gemm.formats import GGUFBlocks, SplitBlocks, TileWeights

TARGET = "xyjax_smooth_gemm_cpu"   # jax.ffi target of the C++ CPU handler
DTYPES = (jnp.float32, jnp.bfloat16)
TUNING = dict(lanes=0, split_rows=False, m_align=1, stream_rows=24, amx_rows=1)
# block-quantized weights: the two-part AMX kernel overtakes the streaming kernel from ~12 rows (BENCHMARKS.md)
TUNING_SPLIT = dict(TUNING, stream_rows=12)
QUANT_BLOCKS = (32,)   # the block sizes the handler's split path takes
# GGUFBlocks qtypes the handler's block kernels read, by ggml type id (gguf.GGMLQuantizationType): every qtype of
# formats.GGUF_QTYPES (one added there without an id here is a TypeError in gemm)
GGUF_QTYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
ACT_QUANT_IDS = {"none": 0, "int8": 1}   # GGUFBlocks.act_quant -> the handler's act_quant attribute


def block_copies() -> tuple[str, ...]:
    """The copies of the handler's GGUF block kernels this CPU and build run, best first ("avx512", "avx2",
    "generic"): the handler runs the first, or the one the environment variable XYJAX_GEMM_BLOCKS_KERNEL names (read
    on every call; naming another is an error)."""
    fn = ascend_ffi.load().xyjax_gemm_blocks_copies
    fn.restype = ctypes.c_char_p
    return tuple(fn().decode().split(","))


def int8_copies() -> tuple[str, ...]:
    """The copies of the handler's int8 kernels (``act_quant="int8"``) this CPU and build run, best first
    ("avx512vnni", "avx2", "generic"), as ``block_copies`` for XYJAX_GEMM_INT8_KERNEL."""
    fn = ascend_ffi.load().xyjax_gemm_int8_copies
    fn.restype = ctypes.c_char_p
    return tuple(fn().decode().split(","))


def auto_layout() -> str:
    """"blocks" on every CPU: the file's blocks read in place, by the block streaming kernel for gemms of few rows
    (decode: a fifth of float32's bytes) and as dequantized panels multiplied by the AMX kernel (where it runs)
    or the BLAS above (BENCHMARKS.md, "Blocks everywhere")."""
    return "blocks"


def gemm(x, w, m, layer, transpose_w: bool, tuning: dict) -> jax.Array:
    """The custom call over exactly m rows, the BLAS loaded first (``ascend_ffi.blas``)."""
    qtype = 0
    if isinstance(w, GGUFBlocks):
        if w.qtype not in GGUF_QTYPE_IDS:
            raise TypeError(f"ffi gemm backend: GGUFBlocks ({w.qtype}) are not read by the C++ handler (it reads "
                            f"{', '.join(GGUF_QTYPE_IDS)}); hold them in weight layout 'plain', not 'blocks'")
        if x.dtype != jnp.float32:   # transpose_w and K: checked by smooth_gemm for every format
            raise ValueError(f"ffi gemm backend: GGUFBlocks need float32 x, got {x.dtype}")
        qtype = GGUF_QTYPE_IDS[w.qtype]
    tiles = isinstance(w, TileWeights)
    block = w.block if isinstance(w, (SplitBlocks, TileWeights)) else 0
    data = w.tiles if tiles else w.data if block or qtype else w
    if x.dtype not in DTYPES or (data.dtype != jnp.bfloat16 or x.dtype != jnp.float32 if tiles
                                 else data.dtype != jnp.uint8 if qtype else data.dtype != x.dtype):
        raise TypeError(f"ffi gemm backend: x and w must be both float32 or both bfloat16 (TileWeights: x float32), "
                        f"got {x.dtype} and {'TileWeights' if tiles else data.dtype}")
    if block and (block not in QUANT_BLOCKS or x.dtype != jnp.float32):
        raise ValueError(f"ffi gemm backend: block-quantized weights need blocks of {QUANT_BLOCKS} and float32 x, "
                         f"got blocks of {block} with {x.dtype}")
    unknown = set(tuning) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown ffi gemm tunables {sorted(unknown)}; known: {sorted(TUNING)}")
    params = {**(TUNING_SPLIT if block else TUNING), **tuning}
    if min(params["lanes"], params["stream_rows"], params["amx_rows"]) < 0 or params["m_align"] < 1:
        raise ValueError(f"ffi gemm tunables need lanes, stream_rows, amx_rows >= 0 and m_align >= 1, got {params}")
    blas.load()
    ascend_ffi.register_ffi_target(TARGET, "XyjaxSmoothGemmCpu", platform="cpu")
    n = w.shape[-2] if transpose_w else w.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))
    return call(x, data, jnp.asarray(m, jnp.int32), jnp.asarray(0 if layer is None else layer, jnp.int32),
                transpose_w=transpose_w, lanes=np.int32(params["lanes"]), split_rows=bool(params["split_rows"]),
                m_align=np.int32(params["m_align"]), stream_rows=np.int32(params["stream_rows"]),
                amx_rows=np.int32(params["amx_rows"]), quant_block=np.int32(block), w_tiles=tiles,
                gguf_qtype=np.int32(qtype), act_quant=np.int32(ACT_QUANT_IDS[w.act_quant] if qtype else 0))
