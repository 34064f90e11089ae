"""Int8 activations in the ffi backend (GGUFBlocks with act_quant="int8"): the handler's quantization of x is
quant.quantize_activations bit for bit, and each copy of its int8 kernels this CPU runs, for every qtype, gives the
exact integer result where every float step is exact and the xla backend's (fake-quantized x times the dense
weights) within float32 rounding elsewhere; rows >= m zero, stacked weights at a traced layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import gguf_block_bytes
from xyjax.ops import smooth_gemm
from xyjax.ops.gemm import ffi as ffi_gemm
from xyjax.ops.gemm.formats import GGUF_QTYPES, GGUFBlocks, with_activation_quant
from xyjax.ops.gemm.quant import fake_quantize

HANDLER_ERRORS = (jax.errors.JaxRuntimeError, ValueError)
QTYPES = tuple(ffi_gemm.GGUF_QTYPE_IDS)
COPY_NAMES = ("generic", "avx2", "avx512vnni")   # the handler's copies of the int8 kernels
RUNS = ffi_gemm.int8_copies()                    # those this CPU and build run, best first
COPIES = [c if c in RUNS else pytest.param(c, marks=pytest.mark.skip(
    reason=f"this CPU or build does not run the {c} copy (it runs {', '.join(RUNS)})")) for c in COPY_NAMES]
ONE = np.array([1.0], np.float16).view(np.uint8)             # a block scale d = 1.0 as its two bytes

# the handler's int8 kernels for every m (stream_rows: the int8 kernels up to this m, the block panels on fake-quantized
# x above), or always the panels
KERNEL, PANELS = (("stream_rows", 512),), (("stream_rows", 0),)
_gemm = jax.jit(lambda x, w, m, layer, backend, tuning: smooth_gemm(x, w, m, layer=layer, transpose_w=True,
                                                                    backend=backend, tuning=dict(tuning)),
                static_argnames=("backend", "tuning"))


def gemm(x, w, m, layer=None, backend="ffi", tuning=KERNEL):
    layer = None if layer is None else jnp.int32(layer)
    if layer is None:
        return np.asarray(smooth_gemm(x, w, jnp.int32(m), transpose_w=True, backend=backend, tuning=dict(tuning)))
    return np.asarray(_gemm(x, w, jnp.int32(m), layer, backend, tuning if backend == "ffi" else ()))


def integer_blocks(qtype, n, K, rng):
    """Random blocks [n, row_bytes] of qtype whose every float16 scale is 1.0 and integer scales and minimums small:
    each weight is a small integer (Q4_1: m = -8.0)."""
    block, nbytes = GGUF_QTYPES[qtype]
    raw = rng.integers(0, 256, (n, K // block, nbytes), dtype=np.uint8)
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        raw[..., 0:2] = ONE
        if qtype == "Q4_1":
            raw[..., 2:4] = np.array([-8.0], np.float16).view(np.uint8)
    elif qtype == "Q4_K":
        raw[..., 0:2] = raw[..., 2:4] = ONE                  # d, dmin
        raw[..., 4:16] &= 0x13                               # 6-bit scales and mins <= 19
    else:   # Q6_K
        raw[..., 208:210] = ONE
        raw[..., 192:208] = rng.integers(-4, 5, (n, K // block, 16)).astype(np.int8).view(np.uint8)
    return GGUFBlocks(raw.reshape(n, -1), qtype, K, "int8")


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_integer_inputs_give_the_exact_integer_result(qtype, copy, monkeypatch):
    """Integer x whose every group's amax is 127 (so d = 1 and q = x) times blocks of integer weights (scales 1.0):
    every float step is exact, and each copy's result is the int64 product exactly."""
    monkeypatch.setenv("XYJAX_GEMM_INT8_KERNEL", copy)
    rng = np.random.default_rng(7)
    K = 256 if GGUF_QTYPES[qtype][0] == 256 else 288                # 288: nine 32-input blocks, an odd count
    w = integer_blocks(qtype, 37, K, rng)
    dense = np.asarray(w.dense())
    assert (dense == np.round(dense)).all()
    x = rng.integers(-127, 128, (11, K))
    x.reshape(11, K // 32, 32)[..., 5] = rng.choice([-127, 127], (11, K // 32))
    expected = x @ dense.astype(np.int64).T
    assert (np.abs(x) @ np.abs(dense).T).max() < 2**24                # every partial sum exact in float32
    np.testing.assert_array_equal(gemm(x.astype(np.float32), w, 11), expected.astype(np.float32))


@pytest.mark.parametrize("copy", COPIES)
def test_quantization_is_quant_pys_bit_for_bit(copy, monkeypatch):
    """Q8_0 identity weights (q = 1 on the diagonal, d = 1.0): the result is each x's d * q, one rounding, equal bit
    for bit to quant.fake_quantize (the xla backend's input); ties round to even, zero groups stay zero."""
    monkeypatch.setenv("XYJAX_GEMM_INT8_KERNEL", copy)
    K, T = 96, 8
    raw = np.zeros((K, K // 32, 34), np.uint8)
    raw[..., 0:2] = ONE
    raw[np.arange(K), np.arange(K) // 32, 2 + np.arange(K) % 32] = 1
    w = GGUFBlocks(raw.reshape(K, -1), "Q8_0", K, "int8")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((T, K)) * np.exp(rng.uniform(-20, 20, (T, K // 32))).repeat(32, 1)).astype(np.float32)
    x[0, :32] = 0.0                                                 # d = 0: q = 0
    x[1, :32] = np.arange(32) - 15.5                                # ties: amax 15.5 ... (d = 15.5 / 127)
    x[2, :32] = np.r_[127.0, -2.5, 2.5, 3.5, -3.5, 0.5, -0.5, 1.5, np.zeros(24)]   # d = 1: half to even
    expected = np.asarray(jax.jit(fake_quantize)(x))
    assert (expected[2, 1:8] == [-2, 2, 4, -4, 0, 0, 2]).all()
    np.testing.assert_array_equal(gemm(x, w, T), expected)
    np.testing.assert_array_equal(gemm(x, w, T, backend="xla"), expected)


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("qtype,K", [(q, K) for q in QTYPES for K in ((256, 512) if GGUF_QTYPES[q][0] == 256
                                                                      else (96, 512))])
def test_random_inputs_match_the_xla_backend(qtype, K, copy, monkeypatch):
    """Random x and blocks, a stack [2, 37, row_bytes] at a traced layer, m = 0, 1, 5, 9, T: rows < m within a few
    float32 ulps of sum |d q| |w| of the xla backend's result (fake-quantized x times the dense weights), rows >= m
    exactly zero."""
    check_random_inputs(qtype, K, KERNEL, monkeypatch, copy)


@pytest.mark.parametrize("qtype", QTYPES)
def test_prefill_panels_match_the_xla_backend(qtype, monkeypatch):
    """m > stream_rows: the block panels on the fake-quantized rows, as the int8 kernels."""
    check_random_inputs(qtype, 256, PANELS, monkeypatch)


def check_random_inputs(qtype, K, tuning, monkeypatch, copy=""):
    monkeypatch.setenv("XYJAX_GEMM_INT8_KERNEL", copy)
    rng = np.random.default_rng(K)
    values = (0.1 * rng.standard_normal((2, 37, K))).astype(np.float32)
    w = jax.tree.map(jnp.asarray, GGUFBlocks(gguf_block_bytes(qtype, values, rng), qtype, K, "int8"))
    dense = np.asarray(w.dense(), np.float64)
    x = (rng.standard_normal((40, K)) * rng.uniform(0.01, 10, (40, 1))).astype(np.float32)
    xq = np.asarray(fake_quantize(x), np.float64)
    for m, layer in ((0, 0), (1, 1), (5, 0), (9, 1), (40, 0)):
        out, ref = gemm(x, w, m, layer, tuning=tuning), gemm(x, w, m, layer, backend="xla")
        bound = 8e-6 * (np.abs(xq[:m]) @ np.abs(dense[layer]).T)
        error = np.abs(out[:m] - ref[:m])
        assert (error <= bound).all(), f"m={m} layer={layer}: error {error.max()}"
        assert not out[m:].any(), f"padding rows must be zero (m={m})"


def test_int8_copy_choice(monkeypatch):
    """The copies run best first, generic last; a copy this CPU does not run or an unknown name is an error naming
    those it runs; int8 activations are the weights' setting (with_activation_quant), not a backend's."""
    assert RUNS[-1] == "generic" and set(RUNS) <= set(COPY_NAMES)
    w = with_activation_quant({"w": integer_blocks("Q4_1", 16, 64, np.random.default_rng(0))}, "int8")["w"]
    x = jnp.ones((4, 64))
    for copy in COPY_NAMES:
        monkeypatch.setenv("XYJAX_GEMM_INT8_KERNEL", copy)
        if copy in RUNS:
            np.testing.assert_array_equal(gemm(x, w, 4), gemm(x, w, 4, backend="xla"))
        else:
            with pytest.raises(HANDLER_ERRORS, match=f"XYJAX_GEMM_INT8_KERNEL={copy}: this CPU or build does not "
                               f"run that copy of the int8 kernels; it runs {','.join(RUNS)}"):
                gemm(x, w, 4)
    monkeypatch.setenv("XYJAX_GEMM_INT8_KERNEL", "avx1024")
    with pytest.raises(HANDLER_ERRORS, match="XYJAX_GEMM_INT8_KERNEL=avx1024 names no copy of the int8 kernels "
                       "\\(generic, avx2, avx512vnni; unset: the best this CPU runs, of " + ",".join(RUNS)):
        gemm(x, w, 4)
