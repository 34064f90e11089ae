"""GGUFBlocks, a GGUF block-quantized matrix held as the file's bytes: its dense view is gguf's own
dequantization bit for bit (every supported qtype, stacked, under jit), smooth_gemm on it (xla and pallas on the
dense view; ffi names it), and its conversions to every weight layout."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import gguf_block_bytes
from xyjax.ops import smooth_gemm
from xyjax.ops.gemm import format_name, prepare_weights
from xyjax.ops.gemm.formats import GGUF_QTYPES, GGUFBlocks, SplitBlocks, TileWeights, convert

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


def test_ffi_names_blocks_and_never_picks_them():
    w = blocks("Q8_0", (16, 64))
    with pytest.raises(TypeError, match="ffi gemm backend: GGUFBlocks \\(Q8_0\\)"):
        smooth_gemm(jnp.ones((4, 64)), w, 4, transpose_w=True, backend="ffi")
    assert not isinstance(prepare_weights({"w": w}, "ffi")["w"], GGUFBlocks)
    with pytest.raises(ValueError, match="transpose_w=True"):
        smooth_gemm(jnp.ones((4, 16)), w, 4)


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
