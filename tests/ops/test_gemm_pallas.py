"""The Pallas SmoothGEMM (interpret mode on CPU) against a float64 numpy reference, and its Triton lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abstract_gpu import abstract_cuda_device
from hypothesis import given, settings, strategies as st

from xyjax.ops import smooth_gemm
from xyjax.ops.gemm.pallas import GemmTiling, smooth_gemm_pallas

tilings = st.builds(GemmTiling, block_m=st.sampled_from([16, 32, 64]), block_n=st.sampled_from([16, 32, 64]),
                    block_k=st.sampled_from([16, 32]), m_major=st.booleans())


def expected(x, w, m, transpose_w=False):
    w = w.T if transpose_w else w
    out = np.zeros((x.shape[0], w.shape[1]))
    out[:m] = x[:m].astype(np.float64) @ w.astype(np.float64)
    return out


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), K=st.sampled_from([16, 48, 64, 96]), N=st.integers(1, 80), data=st.data(),
       tiling=tilings, transpose_w=st.booleans(), seed=st.integers(0, 2**31))
def test_matches_float64_reference(T, K, N, data, tiling, transpose_w, seed):
    """Shapes that are not tile multiples, m from 0 to T, both grid orders, w as [K, N] or [N, K]."""
    m = data.draw(st.sampled_from(sorted({0, 1, T, T // 2, max(T - 1, 0)})))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal((N, K) if transpose_w else (K, N)).astype(np.float32)
    out = np.asarray(smooth_gemm_pallas(x, w, m, tiling=tiling, interpret=True, transpose_w=transpose_w))
    np.testing.assert_allclose(out, expected(x, w, m, transpose_w), rtol=1e-5, atol=1e-4)
    assert not out[m:].any(), "rows >= m must be exactly zero"


def test_traced_m_one_program_and_fused_weights():
    """m as data: one compiled program serves every m; a fused [K, 3N] weight (QKV-style) is one GEMM."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((48, 32)).astype(np.float32)
    parts = [rng.standard_normal((32, n)).astype(np.float32) for n in (24, 8, 8)]
    w = np.concatenate(parts, axis=1)
    fn = jax.jit(lambda x, w, m: smooth_gemm_pallas(x, w, m, tiling=GemmTiling(16, 16, 16), interpret=True))
    for m in (0, 5, 16, 33, 48):
        out = np.asarray(fn(x, w, m))
        np.testing.assert_allclose(out, expected(x, w, m), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(smooth_gemm(x, w, m, backend="xla")), out, rtol=1e-5, atol=1e-4)
    assert fn._cache_size() == 1


def test_bfloat16_accumulates_in_float32():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.bfloat16)
    out = smooth_gemm_pallas(x, w, 20, tiling=GemmTiling(16, 16, 16), interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = expected(np.asarray(x, np.float32), np.asarray(w, np.float32), 20)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=5e-2)


def test_tiling_fits_the_problem():
    t = GemmTiling(block_m=128, block_n=256, block_k=128).fit(T=20, K=96, N=40)
    assert (t.block_m, t.block_n, t.block_k) == (32, 64, 32)     # powers of two >= the dims; 32 divides 96
    assert GemmTiling(block_m=16).fit(T=1, K=576, N=49152).block_m == 16


def test_bad_shapes_and_dtypes():
    x = jnp.zeros((16, 32))
    with pytest.raises(ValueError, match="chain"):
        smooth_gemm_pallas(x, jnp.zeros((16, 8)), 4, interpret=True)
    with pytest.raises(TypeError, match="dtypes differ"):
        smooth_gemm_pallas(x, jnp.zeros((32, 8), jnp.bfloat16), 4, interpret=True)
    with pytest.raises(ValueError, match=r"x \[T, K\]"):
        smooth_gemm_pallas(jnp.zeros((16,)), jnp.zeros((16, 8)), 4, interpret=True)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_lowers_to_triton_for_cuda(transpose_w):
    """Lowering (not compiling or running) for CUDA from this CPU host, at the default model's QKV shape:
    one Triton custom call. PTX compilation and execution need a GPU."""
    x = jax.ShapeDtypeStruct((64, 576), jnp.float32)
    w = jax.ShapeDtypeStruct((960, 576) if transpose_w else (576, 960), jnp.float32)
    m = jax.ShapeDtypeStruct((), jnp.int32)

    def fn(x, w, m):
        return smooth_gemm_pallas(x, w, m, tiling=GemmTiling(32, 128, 64), interpret=False,
                                  transpose_w=transpose_w)

    try:
        with abstract_cuda_device():
            exported = jax.export.export(
                jax.jit(fn), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, w, m)
    except (ImportError, NotImplementedError) as e:     # a jaxlib without the Triton dialect
        pytest.skip(f"no Triton lowering here: {e}")
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 1
