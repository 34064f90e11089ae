"""SmoothGEMM: a dense layer over a bucket-sized token block where only the first ``m`` rows are real.

Contract (every backend):
    x: [T, K] float, w: [K, N] float of x's dtype, or with ``transpose_w`` [N, K] in any weight format
    (``formats``: a plain array, ``SplitBlocks``, ``TileWeights``, ``GGUFBlocks``): the op then computes
    ``x @ w.T`` without materialising the transpose (e.g. a tied LM head ``embed`` [V, D]).
    m: int32 scalar (data, not shape) with 0 <= m <= T.
    layer: None, or an int32 scalar and w a stack [L, K, N] ([L, N, K]) of which w[layer] is used: the ffi
    backend reads that layer in place, where slicing it out first (as ``lax.scan`` over the weights does)
    would copy it every step.
Returns [T, N] in x's dtype, accumulated in float32: rows < m are ``x @ w``, rows >= m are zero (virtual
padding: fast backends skip them; this result is defined and tested).

Backends: ``xla`` (``xla.py``, pure jnp, the oracle: computes every row on the dense view, then zeroes the
padding), ``ffi`` (``ffi.py``, the C++ CPU handler: BLAS, streaming and AMX kernels over exactly m rows, every
format read in place), ``pallas`` (``pallas.py``: tiles past m skip their work; the Mosaic GPU kernel of
``pallas_mosaic.py`` on Hopper, Triton on other GPUs, interpret mode on CPU: ``xyjax.ops.pallas_lowering``).
``tuning``: the backend's tunables for this format, shape and bucket (``profile`` measures them; the pallas ones
are the Triton-style kernel's).
"""

from __future__ import annotations

import chex
import jax

from xyjax.ops.gemm import ffi, pallas, xla
from xyjax.ops.gemm.formats import LAYOUTS, GGUFBlocks, SplitBlocks, TileWeights, convert, is_format, take_rows

__all__ = ["BACKENDS", "format_name", "prepare_weights", "smooth_gemm", "take_rows"]

# backend name -> module with gemm(x, w, m, layer, transpose_w, tuning) and the layout "auto" picks for it
BACKENDS = {"xla": xla, "ffi": ffi, "pallas": pallas}


def format_name(w) -> str:
    """The profile key of a weight's format: "plain", "split", "tiles" or "blocks:<qtype>" (``GGUFBlocks``, e.g.
    "blocks:Q4_1": each qtype its own kernels and bytes per weight, so its own tunables; "-int8" appended with
    int8 activations, which run other kernels)."""
    if isinstance(w, GGUFBlocks):
        return f"blocks:{w.qtype}" + ("" if w.act_quant == "none" else f"-{w.act_quant}")
    return "split" if isinstance(w, SplitBlocks) else "tiles" if isinstance(w, TileWeights) else "plain"


def smooth_gemm(x: jax.Array, w, m: jax.Array | int, *, layer: jax.Array | int | None = None,
                transpose_w: bool = False, backend: str = "xla", tuning: dict | None = None) -> jax.Array:
    """``x @ w[layer]`` (``.T`` with ``transpose_w``) on the first ``m`` rows, zeros below (module docstring)."""
    chex.assert_rank(x, 2)
    if backend not in BACKENDS:
        raise ValueError(f"unknown gemm backend {backend!r}; available: {', '.join(map(repr, BACKENDS))}")
    if is_format(w) and not transpose_w:
        raise ValueError(f"{type(w).__name__} holds transposed weights [N, K]: pass transpose_w=True")
    if len(w.shape) != (2 if layer is None else 3):
        raise ValueError(f"w must be {'[K, N]' if layer is None else '[L, K, N]'} (transposed: N, K), got {w.shape}")
    if w.shape[-1 if transpose_w else -2] != x.shape[1]:
        raise ValueError(f"x {x.shape} and w {w.shape}{' (transposed)' if transpose_w else ''} do not chain")
    return BACKENDS[backend].gemm(x, w, m, layer, transpose_w, tuning or {})


def prepare_weights(params, backend: str, layout: str = "auto"):
    """``params`` with their block-quantized matrices (``GGUFBlocks``, ``SplitBlocks``) in ``layout``
    (``formats.convert``), for ``backend`` on this machine; "auto": the backend's choice
    (``<backend>.auto_layout()``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"weight layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return convert(params, BACKENDS[backend].auto_layout() if layout == "auto" else layout)
