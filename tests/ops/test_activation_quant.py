"""The int8 activation quantization (xyjax.ops.gemm.quant) against a numpy reference of its contract: per row and
group of 32 inputs, d = amax / 127, q = round half to even of x / d (x * (1 / d)), all in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xyjax.ops.gemm.quant import fake_quantize, quantize_activations


def reference(x: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    g = x.astype(np.float32).reshape(x.shape[0], -1, group)
    d = (np.abs(g).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return np.rint(g * inv[..., None]).astype(np.int8).reshape(x.shape), d


def test_matches_numpy_bit_for_bit_with_ties_and_zero_groups():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 96)) * rng.uniform(0.01, 10, (5, 1))).astype(np.float32)
    x[1, :32] = 0                                              # an all-zero group: d = 0, q = 0
    x[2, 32:64] = np.arange(32) - 15.5                         # amax 16.5
    x[3, :32] = [127, 2.5, -3.5, 0.5, -0.5] + [0] * 27        # d = 1: the ties round to even
    q, d = jax.jit(quantize_activations)(jnp.asarray(x))
    q_ref, d_ref = reference(x)
    np.testing.assert_array_equal(np.asarray(d), d_ref)
    np.testing.assert_array_equal(np.asarray(q), q_ref)
    assert list(np.asarray(q)[3, :5]) == [127, 2, -4, 0, 0] and not np.asarray(q)[1, :32].any()
    assert np.abs(np.asarray(q, np.int32)).max() <= 127
    deq = np.asarray(fake_quantize(jnp.asarray(x))).reshape(5, 3, 32)
    np.testing.assert_array_equal(deq, q_ref.reshape(5, 3, 32).astype(np.float32) * d_ref[..., None])
    assert np.all(np.abs(deq.reshape(5, 96) - x) <= np.repeat(d_ref, 32, axis=1) / 2 * (1 + 1e-6))


def test_k_must_be_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="int8 activations need K a multiple of 32, got K = 40"):
        quantize_activations(jnp.ones((2, 40)))
