"""Int8 activations (``activation_quant="int8"``): a GEMM's input quantized per token and per group of 32 inputs,
symmetric, as llama.cpp's Q8_0 quantizes activations. The ffi handler does the same in C++ (bit for bit) and
multiplies the int8 values with the weight blocks' integers; the xla and pallas backends multiply the dequantized
values (``fake_quantize``) with the weights' dense view, the reference.

Contract, per row of x and group g of 32 consecutive inputs (all float32 arithmetic, IEEE round to nearest even):
    amax = max |x[g]|;  d = amax / 127;  id = 1 / d if d != 0 else 0;  q = round_half_even(x[g] * id)  (|q| <= 127)
and x[g] ~ d * q.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP = 32     # inputs per activation scale (the 32-input weight blocks' size)
MODES = ("none", "int8")


def quantize_activations(x: jax.Array, group: int = GROUP) -> tuple[jax.Array, jax.Array]:
    """x [T, K] float32 (K a multiple of ``group``) -> (q [T, K] int8, d [T, K / group] float32)."""
    T, K = x.shape
    if K % group:
        raise ValueError(f"int8 activations need K a multiple of {group}, got K = {K}")
    g = x.astype(jnp.float32).reshape(T, K // group, group)
    # a division, as the contract says: under jit XLA rewrites a division by the constant 127 into a multiplication by
    # float32(1 / 127), which differs in the last bit for ~5% of groups; the barrier keeps the divisor opaque
    d = jnp.max(jnp.abs(g), axis=-1) / jax.lax.optimization_barrier(jnp.float32(127))
    inv = jnp.where(d != 0, jnp.float32(1) / jnp.where(d != 0, d, 1), jnp.float32(0))
    q = jnp.round(g * inv[..., None])          # round half to even, as the C++ conversion
    return q.astype(jnp.int8).reshape(T, K), d


def fake_quantize(x: jax.Array, group: int = GROUP) -> jax.Array:
    """x as the int8 mode sees it: d * q per group, float32 [T, K]."""
    q, d = quantize_activations(x, group)
    T, K = x.shape
    return (q.astype(jnp.float32).reshape(T, K // group, group) * d[..., None]).reshape(T, K)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"activation_quant must be one of {', '.join(MODES)}, got {mode!r}")
    return mode
