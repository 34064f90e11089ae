"""GGUFBlocks, a GGUF block-quantized matrix held as the file's bytes: its dense view is gguf's own
dequantization bit for bit (every supported qtype, stacked, under jit), smooth_gemm on it (xla and pallas on the
dense view; ffi reads every qtype in place, with each copy of its block kernels this CPU runs and on both kernel
paths, and names what it does not read), and its conversions to every weight layout."""

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
# an InvalidArgument error of the handler: JaxRuntimeError, or ValueError where jax re-raises it from a cached call
HANDLER_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


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


def test_ffi_reads_every_qtype_and_keeps_blocks():
    """The ffi backend sends every GGUFBlocks qtype to the handler by its ggml type id; its automatic layout keeps
    the blocks."""
    assert ffi_gemm.GGUF_QTYPE_IDS == {q: gguf.GGMLQuantizationType[q].value for q in QTYPES}
    kept = blocks("Q8_0", (16, 64))
    assert prepare_weights({"w": kept}, "ffi")["w"] is kept
    with pytest.raises(ValueError, match="transpose_w=True"):
        smooth_gemm(jnp.ones((4, 256)), blocks("Q4_K", (16, 256)), 4)


@pytest.mark.parametrize("layout", ["blocks", "split", "plain"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_take_rows_is_the_dense_views_rows(qtype, layout):
    """An embedding lookup on a weight in any layout (jitted, rows repeated and out of order) equals the same rows
    of its dense view, bit for bit."""
    w = convert({"w": jax.tree.map(jnp.asarray, blocks(qtype, (20, 256)))}, layout)["w"]
    ids = jnp.asarray([3, 0, 19, 3], jnp.int32)
    expected = np.asarray(GGUFBlocks(w.data, qtype, 256).dense() if layout == "blocks" else dense(w))[[3, 0, 19, 3]]
    np.testing.assert_array_equal(np.asarray(jax.jit(take_rows)(w, ids)), expected)


def test_ffi_names_blocks_it_does_not_read(monkeypatch):
    """A qtype the Python side has no id for is a TypeError naming it and the ids it has; a type id the handler does
    not read (Q5_0's, 6, sent in Q4_K's place) or a K that is not a multiple of the qtype's block is the handler's
    error, naming the type and what it reads."""
    w = blocks("Q4_K", (16, 256))
    x = jnp.ones((4, 256))
    gemm = lambda: smooth_gemm(x, w, 4, transpose_w=True, backend="ffi")  # noqa: E731
    monkeypatch.delitem(ffi_gemm.GGUF_QTYPE_IDS, "Q4_K")
    with pytest.raises(TypeError, match="ffi gemm backend: GGUFBlocks \\(Q4_K\\).*reads Q4_0, Q4_1, Q8_0, Q6_K"):
        gemm()
    monkeypatch.setitem(ffi_gemm.GGUF_QTYPE_IDS, "Q4_K", gguf.GGMLQuantizationType.Q5_0.value)
    with pytest.raises(HANDLER_ERRORS, match="gguf_qtype 6 is not read here; supported: Q8_0 \\(8\\), "
                       "Q4_0 \\(2\\), Q4_1 \\(3\\), Q4_K \\(12\\), Q6_K \\(14\\)"):
        gemm()
    monkeypatch.setitem(ffi_gemm.GGUF_QTYPE_IDS, "Q8_0", ffi_gemm.GGUF_QTYPE_IDS["Q6_K"])   # 96 inputs of Q8_0
    with pytest.raises(HANDLER_ERRORS, match="GGUF blocks of Q6_K need K a multiple of 256, got K = 96"):
        smooth_gemm(jnp.ones((4, 96)), blocks("Q8_0", (16, 96)), 4, transpose_w=True, backend="ffi")


COPY_NAMES = ("generic", "avx2", "avx512")   # the handler's copies of the block kernels
RUNS = ffi_gemm.block_copies()               # those this CPU and build run, best first
FFI_QTYPES = tuple(ffi_gemm.GGUF_QTYPE_IDS)
# K per qtype: multiples of the block (256: one K-quant super-block), and for the 32-input blocks one that is not a
# multiple of 256
FFI_CASES = [(q, K) for q in FFI_QTYPES for K in ((256, 512) if GGUF_QTYPES[q][0] == 256 else (96, 256, 512))]
# stream_rows and amx_rows force the block kernel: always streaming (m <= 512), always panels multiplied by AMX where
# it runs (else the BLAS), always panels multiplied by the BLAS
PATHS = {"stream": {"stream_rows": 512}, "panels": {"stream_rows": 0}, "blas-panels": {"stream_rows": 0, "amx_rows": 0}}
_ffi_gemm = jax.jit(lambda x, w, m, layer, tuning: smooth_gemm(x, w, m, layer=layer, transpose_w=True, backend="ffi",
                                                               tuning=dict(tuning)),
                    static_argnames="tuning")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("copy", [c if c in RUNS else pytest.param(c, marks=pytest.mark.skip(
    reason=f"this CPU or build does not run the {c} copy (it runs {', '.join(RUNS)})")) for c in COPY_NAMES])
@pytest.mark.parametrize("qtype,K", FFI_CASES)
def test_ffi_block_kernels_read_blocks_in_place(qtype, K, copy, path, monkeypatch):
    """Each copy of the handler's block kernels, on each path, on a stack [2, 37, row_bytes] (N = 37: not a multiple
    of any register block or lane width) at a traced layer: rows < m equal float64 x @ dense.T for m = 0, 1, values
    off the register blocks' multiples and T, rows >= m exactly zero; and x = the identity gives dense.T bit for bit
    (each product is 0 or a weight, each sum exact): the kernels' weights are dense()'s exactly."""
    monkeypatch.setenv("XYJAX_GEMM_BLOCKS_KERNEL", copy)
    tuning = tuple(PATHS[path].items())
    w = jax.tree.map(jnp.asarray, blocks(qtype, (2, 37, K), seed=K))
    dense = np.asarray(w.dense(), np.float64)
    x = np.random.default_rng(K + 1).standard_normal((40, K)).astype(np.float32)
    for m, layer in ((0, 0), (1, 1), (5, 0), (7, 1), (13, 1), (40, 0)):
        out = np.asarray(_ffi_gemm(x, w, jnp.int32(m), jnp.int32(layer), tuning))
        # float32 sums: within a few ulps of sum |x| |w| (the random K-quant blocks cancel a lot)
        bound = 4e-6 * (np.abs(x[:m]) @ np.abs(dense[layer]).T)
        error = np.abs(out[:m] - x[:m].astype(np.float64) @ dense[layer].T)
        assert (error <= bound).all(), f"m={m} layer={layer}: error {error.max()} (bound {bound.min()}..)"
        assert not out[m:].any(), f"padding rows must be zero (m={m})"
    if K == 256:
        eye = np.eye(K, dtype=np.float32)
        np.testing.assert_array_equal(np.asarray(_ffi_gemm(eye, w, jnp.int32(K), jnp.int32(1), tuning)), dense[1].T)


@pytest.mark.parametrize("copy", [pytest.param(c, marks=pytest.mark.skipif(c in RUNS, reason=f"this CPU runs {c}"))
                                  for c in COPY_NAMES])
def test_ffi_block_kernel_copy_the_cpu_does_not_run_is_an_error(copy, monkeypatch):
    monkeypatch.setenv("XYJAX_GEMM_BLOCKS_KERNEL", copy)
    with pytest.raises(HANDLER_ERRORS, match=f"XYJAX_GEMM_BLOCKS_KERNEL={copy}: this CPU or build does "
                       f"not run that copy of the block kernels; it runs {','.join(RUNS)}"):
        smooth_gemm(jnp.ones((4, 32)), blocks("Q8_0", (16, 32)), 4, transpose_w=True, backend="ffi")


def test_ffi_block_kernel_choice(monkeypatch):
    """Unset or empty, XYJAX_GEMM_BLOCKS_KERNEL leaves the handler the best copy this CPU runs (generic last: every
    CPU runs it); an unknown name is an error listing the copies."""
    assert RUNS[-1] == "generic" and set(RUNS) <= set(COPY_NAMES)
    w, x = blocks("Q4_K", (16, 256)), jnp.ones((4, 256))
    gemm = lambda: np.asarray(smooth_gemm(x, w, 4, transpose_w=True, backend="ffi"))  # noqa: E731
    monkeypatch.setenv("XYJAX_GEMM_BLOCKS_KERNEL", RUNS[0])
    best = gemm()
    monkeypatch.setenv("XYJAX_GEMM_BLOCKS_KERNEL", "")
    np.testing.assert_array_equal(gemm(), best)
    monkeypatch.delenv("XYJAX_GEMM_BLOCKS_KERNEL")
    np.testing.assert_array_equal(gemm(), best)
    monkeypatch.setenv("XYJAX_GEMM_BLOCKS_KERNEL", "avx1024")
    with pytest.raises(HANDLER_ERRORS, match="XYJAX_GEMM_BLOCKS_KERNEL=avx1024 names no copy of the block "
                       "kernels \\(generic, avx2, avx512; unset: the best this CPU runs, of " + ",".join(RUNS)):
        gemm()


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
    assert convert(params, "blocks")["w"] is w and format_name(w) == f"blocks:{qtype}"
    for layout, cls in (("split", SplitBlocks), ("tiles", TileWeights)):
        got = convert(params, layout)["w"]
        assert isinstance(got, cls) if qtype == "Q4_1" else format_name(got) == "plain", layout
        np.testing.assert_array_equal(np.asarray(got.dense() if qtype == "Q4_1" else got), dense)
    assert format_name(prepare_weights(params, "xla", "blocks")["w"]) == f"blocks:{qtype}"


def test_bad_blocks_are_named():
    with pytest.raises(ValueError, match="unsupported GGUF type 'Q5_K'; supported: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K"):
        GGUFBlocks(np.zeros((2, 176), np.uint8), "Q5_K", 256)
    with pytest.raises(ValueError, match="rows of 30 bytes do not hold K = 32"):
        GGUFBlocks(np.zeros((2, 30), np.uint8), "Q8_0", 32)
    with pytest.raises(ValueError, match="only Q4_1"):
        blocks("Q8_0", (2, 32)).split()
