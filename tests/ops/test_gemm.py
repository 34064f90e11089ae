"""smooth_gemm's ffi backend (C++ handler over MKL) and its xla oracle, against float64 numpy: real rows, zero
padding rows, fused and transposed weights, stacked weights read by layer, bfloat16, bad m and layer, no recompile
across m, the split block layout of 4-bit weights, and the engine's greedy output with either backend."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import ascend_ffi
from ascend_ffi import blas
from xyjax.ops.gemm import profile as gemm_profile
from xyjax.engine.config import EngineConfig
from xyjax.ops import smooth_gemm
from xyjax.ops.gemm import prepare_weights
from xyjax.ops.gemm.formats import SplitBlocks, TileWeights, pack_tiles, quantize_blocks

gemm = jax.jit(smooth_gemm, static_argnames=("backend", "transpose_w"))
BACKENDS = ("ffi", "xla")


def check(out, full, m, rtol=1e-5, atol=1e-5):
    """Rows < m equal the float64 reference ``full``; rows >= m are exactly zero."""
    out = np.asarray(out.astype(jnp.float32))
    np.testing.assert_allclose(out[:m], full[:m], rtol=rtol, atol=atol)
    assert not out[m:].any(), f"padding rows must be zero (m={m})"


def operands(rng, T, K, N):
    return rng.standard_normal((T, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 40), K=st.integers(1, 48), N=st.integers(1, 80), frac=st.floats(0, 1), seed=st.integers(0, 99))
@example(T=1, K=33, N=65, frac=1.0, seed=0)   # ceil(N / 2 lanes) is not a multiple of 16: the last column's lane
def test_random_shapes_match_float64(T, K, N, frac, seed):
    x, w = operands(np.random.default_rng(seed), T, K, N)
    m = round(frac * T)
    full = x.astype(np.float64) @ w.astype(np.float64)
    for backend in BACKENDS:
        check(gemm(x, w, jnp.int32(m), backend=backend), full, m, rtol=1e-4, atol=1e-4)
        check(gemm(x, w.T.copy(), jnp.int32(m), transpose_w=True, backend=backend), full, m, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 17, 36, 37])
def test_edge_m_and_non_tile_multiples(backend, m):
    """T = 37, N = 70: no multiple of a tile or of the handler's 16-column blocks; padding rows hold NaN."""
    x, w = operands(np.random.default_rng(m), 37, 24, 70)
    full = x.astype(np.float64) @ w.astype(np.float64)
    x[m:] = np.nan
    check(gemm(x, w, jnp.int32(m), backend=backend), full, m)
    check(gemm(x, w.T.copy(), jnp.int32(m), transpose_w=True, backend=backend), full, m)


@pytest.mark.parametrize("K, N", [(576, 960), (1536, 100), (40, 4100)])
def test_streaming_kernel_equals_the_blas(K, N):
    """The float32 ``transpose_w`` path at m <= stream_rows (the handler's own kernel on AVX-512 CPUs) against
    float64 and against the BLAS path (stream_rows=0), at the model's sizes: every row block of 1..6 rows, weight
    blocks of 32 rows with a tail, K with and without a 16-float tail, rows split over the lanes."""
    rng = np.random.default_rng(K + N)
    x, w = operands(rng, 40, K, N)
    wt = w.T.copy()
    for m in (1, 2, 5, 6, 7, 12, 31, 40):
        full = x.astype(np.float64) @ w.astype(np.float64)
        stream = smooth_gemm(x, wt, m, backend="ffi", transpose_w=True, tuning=dict(stream_rows=64))
        check(stream, full, m, rtol=1e-4, atol=1e-3)
        blas_path = smooth_gemm(x, wt, m, backend="ffi", transpose_w=True, tuning=dict(stream_rows=0))
        np.testing.assert_allclose(np.asarray(stream), np.asarray(blas_path), rtol=1e-4, atol=1e-3)
        by_rows = smooth_gemm(x, wt, m, backend="ffi", transpose_w=True, tuning=dict(stream_rows=64, split_rows=True))
        np.testing.assert_array_equal(np.asarray(by_rows), np.asarray(stream))


@pytest.mark.parametrize("K, N", [(576, 960), (1536, 300), (40, 4100), (31, 33)])
def test_amx_kernel_is_float32_accurate(K, N):
    """The float32 ``transpose_w`` path at m >= amx_rows (the handler's bfloat16-tile kernel on AMX CPUs) is as
    close to float64 as the BLAS path (amx_rows=0), scaled by |x| @ |w|: one and two 16-row tiles of rows and
    of columns, K and N tails, one pass over x and several (m = 300 at K = 1536), more than 256 weight rows;
    rows >= m zero though x's padding rows hold NaN."""
    import ascend_ffi

    if not ascend_ffi.load().xyjax_gemm_amx():
        pytest.skip("this CPU or OS does not run AMX-BF16")
    rng = np.random.default_rng(K + N)
    T = 320
    x, w = operands(rng, T, K, N)
    wt = w.T.copy()
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
    full = x.astype(np.float64) @ w.astype(np.float64)
    for m in (1, 16, 17, 33, 64, 300):
        xm = x.copy()
        xm[m:] = np.nan
        errors = {}
        for name, amx_rows in (("amx", 1), ("blas", 0)):
            out = np.asarray(smooth_gemm(xm, wt, m, backend="ffi", transpose_w=True,
                                         tuning=dict(stream_rows=0, amx_rows=amx_rows)))
            assert not out[m:].any(), f"padding rows must be zero (m={m})"
            errors[name] = np.max(np.abs(out[:m] - full[:m]) / scale[:m])
        assert errors["amx"] < 1e-6 and errors["amx"] < 4 * errors["blas"], (m, errors)


@pytest.mark.parametrize("K, N", [(576, 960), (1536, 100), (64, 70)])
def test_split_block_layout_equals_the_merged_weights(K, N):
    """SplitBlocks: w = [d * q | m], a 4-bit block quantization in the split layout, stacked and read by layer.
    x_ext @ w^T equals x @ (d * q + m)^T to float32 accuracy (scaled by |x_ext| @ |w|^T) on every ffi path (the
    AMX kernel's two-part weights where the CPU has AMX, the BLAS, the streaming kernel) and on xla; padding
    rows (NaN in x) are zero."""
    rng = np.random.default_rng(K + N)
    split = quantize_blocks(rng.standard_normal((2, N, K)).astype(np.float32), 32)   # data [2, N, K + K / 32]
    assert split.shape == (2, N, K) and split.data.shape == (2, N, K + K // 32)
    merged = np.asarray(split.dense(), np.float64)
    x = rng.standard_normal((40, K)).astype(np.float32)
    x_ext = np.abs(np.concatenate([x, x.reshape(40, K // 32, 32).sum(-1)], 1)).astype(np.float64)
    paths = {"xla": ("xla", None), "blas": ("ffi", dict(stream_rows=0, amx_rows=0)),
             "stream": ("ffi", dict(stream_rows=64, amx_rows=0)), "amx": ("ffi", dict(stream_rows=0, amx_rows=1))}
    for m, layer in ((1, 0), (17, 1), (33, 0), (40, 1)):
        full = x[:m].astype(np.float64) @ merged[layer].T
        scale = x_ext[:m] @ np.abs(split.data[layer]).astype(np.float64).T
        xs = x.copy()
        xs[m:] = np.nan
        for name, (backend, tuning) in paths.items():
            out = np.asarray(smooth_gemm(xs, split, m, layer=layer, transpose_w=True, backend=backend, tuning=tuning))
            assert np.max(np.abs(out[:m] - full) / scale) < 1e-6, (name, m)
            assert not out[m:].any(), (name, m)


def test_tile_weights_hold_the_split_layout():
    """TileWeights (the split layout's two bfloat16 parts as the AMX kernel's tiles, N and K+K/32 not multiples
    of a tile): unpack gives the weights back exactly; on the ffi backend (AMX CPUs, every m on the AMX kernel)
    the product equals the two-part AMX path's on the float32 split layout bit for bit, for every layer and m; on
    xla it equals the split layout's."""
    rng = np.random.default_rng(9)
    split = quantize_blocks(rng.standard_normal((2, 70, 96)).astype(np.float32), 32)   # data [2, 70, 99]
    tiles = pack_tiles(split)
    assert tiles.shape == (2, 70, 96) and tiles.tiles.shape == (2, 80, 4, 2, 32)
    np.testing.assert_array_equal(np.asarray(tiles.stored()), split.data)
    np.testing.assert_array_equal(np.asarray(tiles.dense()), np.asarray(split.dense()))
    x = rng.standard_normal((40, 96)).astype(np.float32)
    for m, layer in ((1, 0), (16, 1), (17, 0), (40, 1)):
        xla = smooth_gemm(x, tiles, m, layer=layer, transpose_w=True)
        np.testing.assert_array_equal(np.asarray(xla), np.asarray(smooth_gemm(x, split, m, layer=layer,
                                                                              transpose_w=True)))
        if ascend_ffi.load().xyjax_gemm_amx():
            ffi = smooth_gemm(x, tiles, m, layer=layer, transpose_w=True, backend="ffi")
            amx = smooth_gemm(x, split, m, layer=layer, transpose_w=True, backend="ffi",
                              tuning=dict(stream_rows=0, amx_rows=1))
            np.testing.assert_array_equal(np.asarray(ffi), np.asarray(amx))
    with pytest.raises(ValueError, match="not exact in two bfloat16 parts"):
        pack_tiles(rng.standard_normal((16, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="transpose_w=True"):
        smooth_gemm(x, tiles, 1, layer=0)


def test_split_block_layout_errors():
    x = jnp.ones((4, 64))
    with pytest.raises(ValueError, match="SplitBlocks holds transposed weights"):
        smooth_gemm(x, SplitBlocks(jnp.ones((8, 66)), 32), 4)
    with pytest.raises(ValueError, match=r"do not chain"):
        smooth_gemm(x, SplitBlocks(jnp.ones((8, 33)), 32), 4, transpose_w=True)
    with pytest.raises(ValueError, match=r"blocks of \(32,\)"):
        smooth_gemm(x, SplitBlocks(jnp.ones((8, 68)), 16), 4, transpose_w=True, backend="ffi")
    with pytest.raises(ValueError, match="float32 x"):
        smooth_gemm(x.astype(jnp.bfloat16), SplitBlocks(jnp.ones((8, 66), jnp.bfloat16), 32), 4, transpose_w=True,
                    backend="ffi")


def test_prepare_weights_layouts():
    """prepare_weights holds SplitBlocks as asked, leaves other leaves alone, and names a bad layout."""
    split = quantize_blocks(np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32))
    params = {"w": split, "norm": jnp.ones(4)}
    plain = prepare_weights(params, "xla")
    assert not isinstance(plain["w"], SplitBlocks) and plain["norm"] is params["norm"]
    np.testing.assert_array_equal(np.asarray(plain["w"]), np.asarray(split.dense()))
    assert prepare_weights(params, "ffi", "split")["w"] is split
    assert isinstance(prepare_weights(params, "ffi", "tiles")["w"], TileWeights)
    with pytest.raises(ValueError, match="weight layout must be one of auto, plain, split, tiles, blocks, got 'q4'"):
        prepare_weights(params, "ffi", "q4")


def test_fused_weights_equal_separate_gemms():
    """A QKV-style concatenation [K, Nq + Nk + Nv] gives the separate products side by side."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 32)).astype(np.float32)
    parts = [rng.standard_normal((32, n)).astype(np.float32) for n in (48, 16, 16)]
    fused = np.asarray(gemm(x, np.concatenate(parts, axis=1), jnp.int32(7), backend="ffi"))
    separate = np.concatenate([np.asarray(gemm(x, p, jnp.int32(7), backend="ffi")) for p in parts], axis=1)
    np.testing.assert_allclose(fused, separate, rtol=1e-6, atol=1e-6)
    check(fused, x.astype(np.float64) @ np.concatenate(parts, axis=1).astype(np.float64), 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_and_stacked_weights(backend):
    """w [N, K] with transpose_w (a tied LM head), and stacks [L, K, N] / [L, N, K] read at a traced layer."""
    rng = np.random.default_rng(2)
    x, w = operands(rng, 12, 40, 100)
    stack = rng.standard_normal((3, 40, 100)).astype(np.float32)
    full = x.astype(np.float64) @ w.astype(np.float64)
    check(gemm(x, w.T.copy(), jnp.int32(5), transpose_w=True, backend=backend), full, 5)
    layered = jax.jit(smooth_gemm, static_argnames=("backend", "transpose_w"))
    for layer in range(3):
        ref = x.astype(np.float64) @ stack[layer].astype(np.float64)
        check(layered(x, stack, jnp.int32(11), layer=jnp.int32(layer), backend=backend), ref, 11)
        check(layered(x, stack.transpose(0, 2, 1).copy(), jnp.int32(11), layer=jnp.int32(layer), transpose_w=True,
                      backend=backend), ref, 11)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bfloat16(transpose_w):
    """bf16 operands, float32 accumulation, rounded once to a bf16 result (as the xla backend)."""
    x, w = operands(np.random.default_rng(3), 10, 64, 40)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w.T.copy() if transpose_w else w, jnp.bfloat16)
    w64 = np.asarray(wb, np.float64)
    full = np.asarray(xb, np.float64) @ (w64.T if transpose_w else w64)
    out = gemm(xb, wb, jnp.int32(6), transpose_w=transpose_w, backend="ffi")
    assert out.dtype == jnp.bfloat16
    check(out, full, 6, rtol=1e-2, atol=1e-2)
    xla = gemm(xb, wb, jnp.int32(6), transpose_w=transpose_w, backend="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xla, np.float32), rtol=1e-2, atol=1e-2)


def test_bad_m_layer_and_dtypes_are_clear_errors():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    for m in (-1, 5):
        with pytest.raises(Exception, match=rf"m = {m} outside \[0, T = 4\]"):
            np.asarray(gemm(x, w, jnp.int32(m), backend="ffi"))
    with pytest.raises(Exception, match=r"layer 2 outside \[0, 2\)"):
        np.asarray(smooth_gemm(x, jnp.ones((2, 8, 16)), 1, layer=2, backend="ffi"))
    with pytest.raises(TypeError, match="both float32 or both bfloat16"):
        smooth_gemm(x, w.astype(jnp.bfloat16), 1, backend="ffi")
    with pytest.raises(TypeError, match="both float32 or both bfloat16"):
        smooth_gemm(x.astype(jnp.float16), w.astype(jnp.float16), 1, backend="ffi")
    with pytest.raises(ValueError, match="do not chain"):
        smooth_gemm(x, jnp.ones((4, 3)), 2, backend="ffi")


def test_unknown_backends_and_tunables():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    with pytest.raises(ValueError, match="unknown gemm backend 'cuda'; available: 'xla', 'ffi', 'pallas'"):
        smooth_gemm(x, w, 1, backend="cuda")
    with pytest.raises(ValueError, match="gemm_backend must be one of xla, ffi, pallas, got 'blas'"):
        EngineConfig(gemm_backend="blas")
    assert EngineConfig().gemm_backend == "ffi"   # the CPU default
    with pytest.raises(ValueError, match=r"unknown ffi gemm tunables \['threads'\]"):
        smooth_gemm(x, w, 1, backend="ffi", tuning={"threads": 2})
    with pytest.raises(ValueError, match="m_align >= 1"):
        smooth_gemm(x, w, 1, backend="ffi", tuning={"m_align": 0})
    with pytest.raises(ValueError, match="amx_rows >= 0"):
        smooth_gemm(x, w, 1, backend="ffi", tuning={"stream_rows": -1})


@pytest.mark.parametrize("tuning", gemm_profile.candidates("ffi") + [dict(lanes=7, m_align=5)])
@pytest.mark.parametrize("m", [0, 1, 13, 37])
def test_every_ffi_tuning_computes_the_same(tuning, m):
    """Each point the profiler sweeps (streaming kernel up to 0, 24 or 64 rows, lanes, row or column split, m
    rounded up to 16), and lanes beyond the pool: the same rows < m, zeros (not the NaN of computed padding
    rows) below; plain and transposed w."""
    x, w = operands(np.random.default_rng(m + 7), 37, 24, 70)
    full = x.astype(np.float64) @ w.astype(np.float64)
    x[m:] = np.nan
    check(smooth_gemm(x, w, m, backend="ffi", tuning=tuning), full, m)
    check(smooth_gemm(x, w.T.copy(), m, backend="ffi", transpose_w=True, tuning=tuning), full, m)


def test_missing_mkl_is_a_clear_error(monkeypatch):
    def absent(name):
        raise blas.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(blas.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match="pip install mkl"):
        blas.library_path()


def test_m_is_data_no_recompile():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(kw.get("fun_name")) if event.endswith("backend_compile_duration")
        else None)
    fn = jax.jit(lambda x, w, m: smooth_gemm(x, w, m, backend="ffi"))
    x, w = operands(np.random.default_rng(4), 16, 8, 24)
    full = x.astype(np.float64) @ w.astype(np.float64)
    check(fn(x, w, jnp.int32(0)), full, 0)
    before = len(compiles)
    for m in range(17):
        check(fn(x, w, jnp.int32(m)), full, m)
    assert len(compiles) == before
