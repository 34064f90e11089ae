"""The xla backend of smooth_gemm: pure jnp on the weights' dense view, the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xyjax.ops.gemm.formats import dense
from xyjax.ops.gemm.quant import fake_quantize


def take_layer(w, layer):
    """w[layer] of a stacked weight in any format (None: w)."""
    if layer is None:
        return w
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), w)


def quantized_input(x, w):
    """x as the gemm on w multiplies it: int8 activations dequantized where w asks for them, else x."""
    return fake_quantize(x).astype(x.dtype) if getattr(w, "act_quant", "none") == "int8" else x


def gemm(x, w, m, layer, transpose_w: bool, tuning: dict) -> jax.Array:
    """Every row computed, then rows >= m zeroed."""
    x = quantized_input(x, w)
    w = dense(take_layer(w, layer)).astype(x.dtype)
    rows = jnp.arange(x.shape[0])[:, None]
    out = jax.lax.dot_general(x, w, (((1,), (1 if transpose_w else 0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return jnp.where(rows < m, out, 0).astype(x.dtype)


def auto_layout() -> str:
    return "plain"
