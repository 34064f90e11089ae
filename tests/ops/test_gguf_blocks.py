"""GGUFBlocks, a GGUF block-quantized matrix held as the file's bytes: its dense view is gguf's own
dequantization bit for bit (every supported qtype, stacked, under jit), smooth_gemm on it (xla and pallas on the
dense view; ffi reads Q8_0, Q4_0 and Q4_1 in place with each copy of its block kernels and names the K-quants),
and its conversions to every weight layout."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import gguf_block_bytes
from xyjax.ops import smooth_gemm
from xyjax.ops.gemm import ffi as ffi_gemm, format_name, prepare_weights
from xyjax.ops.gemm.formats import GGUF_QTYPES, GGUFBlocks, SplitBlocks, TileWeights, convert, dense, take_rows

QTYPES = tuple(GGUF_QTYPES)


def blocks(qtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    values = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    values[..., 0, :32] = 0.25        # a constant block (Q4_1: d = 0)
    return GGUFBlocks(gguf_block_bytes(qtype, values, rng), qtype, shape[-1])


@pytest.mark.parametrize("qtype", QTYPES)
def test_dense_is_ggufs_dequantization_bit_for_bit(qtype):
    w = blocks(qtype, (3, 10, 512))
    block, nbytes = GGUF_QTYPES[qtype]
    assert w.shape == (3, 10, 512) and w.data.shape == (3, 10, 512 // block * nbytes) and w.data.dtype == np.uint8
    expected = gguf.quants.dequantize(np.asarray(w.data), gguf.GGMLQuantizationType[qtype])
    assert expected.shape == (3, 10, 512)
    np.testing.assert_array_equal(np.asarray(w.dense()), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.dense())(jax.tree.map(jnp.asarray, w))), expected)
    np.testing.assert_array_equal(np.asarray(w.dense()[1]), np.asarray(GGUFBlocks(w.data[1], qtype, 512).dense()))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_smooth_gemm_reads_blocks_by_layer(qtype, backend):
    """x @ w[layer].T for a stack [2, N, K] of blocks at a traced layer equals float64 on the dense view, rows
    >= m zero."""
    w = jax.tree.map(jnp.asarray, blocks(qtype, (2, 48, 256), seed=1))
    x = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    gemm = jax.jit(lambda x, w, m, layer: smooth_gemm(x, w, m, layer=layer, transpose_w=True, backend=backend))
    dense = np.asarray(w.dense(), np.float64)
    for m, layer in ((5, 1), (16, 0)):
        out = np.asarray(gemm(x, w, jnp.int32(m), jnp.int32(layer)))
        np.testing.assert_allclose(out[:m], x[:m].astype(np.float64) @ dense[layer].T, rtol=1e-5, atol=1e-4)
        assert not out[m:].any()


def test_ffi_names_unread_blocks_and_keeps_blocks():
    """The ffi handler reads Q8_0, Q4_0 and Q4_1 blocks; K-quants are named with the supported types. Its automatic
    layout keeps the blocks."""
    w = blocks("Q4_K", (16, 256))
    with pytest.raises(TypeError, match="ffi gemm backend: GGUFBlocks \\(Q4_K\\).*reads Q4_0, Q4_1, Q8_0"):
        smooth_gemm(jnp.ones((4, 256)), w, 4, transpose_w=True, backend="ffi")
    kept = blocks("Q8_0", (16, 64))
    assert prepare_weights({"w": kept}, "ffi")["w"] is kept
    with pytest.raises(ValueError, match="transpose_w=True"):
        smooth_gemm(jnp.ones((4, 16)), w, 4)


@pytest.mark.parametrize("layout", ["blocks", "split", "plain"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_take_rows_is_the_dense_views_rows(qtype, layout):
    """An embedding lookup on a weight in any layout (jitted, rows repeated and out of order) equals the same rows
    of its dense view, bit for bit."""
    w = convert({"w": jax.tree.map(jnp.asarray, blocks(qtype, (20, 256)))}, layout)["w"]
    ids = jnp.asarray([3, 0, 19, 3], jnp.int32)
    expected = np.asarray(GGUFBlocks(w.data, qtype, 256).dense() if layout == "blocks" else dense(w))[[3, 0, 19, 3]]
    np.testing.assert_array_equal(np.asarray(jax.jit(take_rows)(w, ids)), expected)


def _has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


FFI_QTYPES = tuple(ffi_gemm.GGUF_QTYPE_IDS)
# the handler's copies of the block kernels: "native" is the AVX-512F copy where the CPU has it (the handler's own
# choice), "generic" the portable copy every CPU runs (forced by XYJAX_GEMM_BLOCKS_KERNEL=generic)
COPIES = ("generic", pytest.param("avx512", marks=pytest.mark.skipif(
    not _has_avx512f(), reason="this CPU has no AVX-512F: the handler runs the portable copy only")))
# stream_rows and amx_rows pick the block kernel: default (streaming for m <= 24, panels multiplied by AMX where it
# runs, else the BLAS, above), always panels (0; with the BLAS: amx_rows 0), always streaming (128)
TUNINGS = ({}, {"stream_rows": 0}, {"stream_rows": 0, "amx_rows": 0}, {"stream_rows": 128})
_ffi_gemm = jax.jit(lambda x, w, m, layer, tuning: smooth_gemm(x, w, m, layer=layer, transpose_w=True, backend="ffi",
                                                               tuning=dict(tuning)),
                    static_argnames="tuning")


@pytest.mark.parametrize("tuning", TUNINGS, ids=("default", "panels", "blas-panels", "stream"))
@pytest.mark.parametrize("K", (96, 576))
@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("qtype", FFI_QTYPES)
def test_ffi_block_kernels_read_blocks_in_place(qtype, copy, K, tuning, monkeypatch):
    """The handler's block kernels on a stack [2, 70, row_bytes] (N = 70: not a multiple of the register block) at
    each layer: rows < m equal float64 x @ dense.T for every m (0, 1, the register block's edges, the streaming
    limit's edges, a bucket), rows >= m exactly zero."""
    if copy == "generic":
        monkeypatch.setenv("XYJAX_GEMM_BLOCKS_KERNEL", "generic")
    else:
        monkeypatch.delenv("XYJAX_GEMM_BLOCKS_KERNEL", raising=False)
    T = 96
    w = jax.tree.map(jnp.asarray, blocks(qtype, (2, 70, K), seed=K))
    x = np.random.default_rng(K + 1).standard_normal((T, K)).astype(np.float32)
    dense = np.asarray(w.dense(), np.float64)
    for m in (0, 1, 5, 6, 7, 24, 25, 64, T):
        for layer in (0, 1):
            out = np.asarray(_ffi_gemm(x, w, jnp.int32(m), jnp.int32(layer), tuple(tuning.items())))
            np.testing.assert_allclose(out[:m], x[:m].astype(np.float64) @ dense[layer].T, rtol=1e-5, atol=1e-5,
                                       err_msg=f"m={m} layer={layer}")
            assert not out[m:].any(), f"padding rows must be zero (m={m})"


def test_ffi_block_copies_agree():
    """The portable and the AVX-512F copies of the streaming kernel give the same sums to float32 rounding (both
    dequantize to dense()'s exact weights; only the order of the additions differs)."""
    if not _has_avx512f():
        pytest.skip("this CPU has no AVX-512F: the handler runs the portable copy only")
    import os
    w = jax.tree.map(jnp.asarray, blocks("Q4_1", (70, 576), seed=3))
    x = np.random.default_rng(4).standard_normal((8, 576)).astype(np.float32)
    native = np.asarray(smooth_gemm(x, w, 8, transpose_w=True, backend="ffi"))
    os.environ["XYJAX_GEMM_BLOCKS_KERNEL"] = "generic"
    try:
        generic = np.asarray(smooth_gemm(x, w, 8, transpose_w=True, backend="ffi"))
    finally:
        del os.environ["XYJAX_GEMM_BLOCKS_KERNEL"]
    np.testing.assert_allclose(native, generic, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", QTYPES)
def test_convert_to_every_layout(qtype):
    """plain: the dense view; split / tiles: Q4_1 as SplitBlocks / TileWeights holding the same weights, other
    types plain; blocks: kept. Other leaves are left alone."""
    w = blocks(qtype, (2, 20, 256))
    params = {"w": w, "norm": jnp.ones(4)}
    dense = np.asarray(w.dense())
    plain = convert(params, "plain")
    assert plain["norm"] is params["norm"] and format_name(plain["w"]) == "plain"
    np.testing.assert_array_equal(np.asarray(plain["w"]), dense)
    assert convert(params, "blocks")["w"] is w and format_name(w) == "blocks"
    for layout, cls in (("split", SplitBlocks), ("tiles", TileWeights)):
        got = convert(params, layout)["w"]
        assert isinstance(got, cls) if qtype == "Q4_1" else format_name(got) == "plain", layout
        np.testing.assert_array_equal(np.asarray(got.dense() if qtype == "Q4_1" else got), dense)
    assert format_name(prepare_weights(params, "xla", "blocks")["w"]) == "blocks"


def test_bad_blocks_are_named():
    with pytest.raises(ValueError, match="unsupported GGUF type 'Q5_K'; supported: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K"):
        GGUFBlocks(np.zeros((2, 176), np.uint8), "Q5_K", 256)
    with pytest.raises(ValueError, match="rows of 30 bytes do not hold K = 32"):
        GGUFBlocks(np.zeros((2, 30), np.uint8), "Q8_0", 32)
    with pytest.raises(ValueError, match="only Q4_1"):
        blocks("Q8_0", (2, 32)).split()
