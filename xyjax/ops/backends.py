"""Backends: which implementation each op runs, chosen once per engine and passed to the model (static)."""

from __future__ import annotations

import dataclasses

from xyjax.ops.attention import meta_attention
from xyjax.ops.gemm import format_name, smooth_gemm
from xyjax.ops.gemm.profile import GemmProfile


@dataclasses.dataclass(frozen=True)
class Backends:
    """The attention and gemm backends (``xla``, ``ffi``, ``pallas``) and the gemm backend's profile of tunables
    per weight format, shape and bucket (hashable: a static jit argument)."""

    attention: str = "xla"
    gemm: str = "xla"
    gemm_profile: GemmProfile | None = None

    def smooth_gemm(self, x, w, m, *, layer=None, transpose_w: bool = False):
        """``smooth_gemm`` on this gemm backend with the profiled tunables of w's format, x's bucket and the shape."""
        K, N = x.shape[1], w.shape[-2] if transpose_w else w.shape[-1]
        tuning = self.gemm_profile.params(format_name(w), x.shape[0], K, N, transpose_w) if self.gemm_profile else None
        return smooth_gemm(x, w, m, layer=layer, transpose_w=transpose_w, backend=self.gemm, tuning=tuning)

    def meta_attention(self, q, kv, layer, meta):
        """``meta_attention`` on this attention backend."""
        return meta_attention(q, kv, layer, meta, backend=self.attention)
