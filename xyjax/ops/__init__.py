"""The two ops models are built from; each has an ``xla`` backend (pure jnp, the oracle)."""

from xyjax.ops.attention import AttentionMetadata, meta_attention
from xyjax.ops.gemm import smooth_gemm

__all__ = ["AttentionMetadata", "meta_attention", "smooth_gemm"]
