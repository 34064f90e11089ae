"""The two ops models are built from; each has an ``xla`` backend (pure jnp, the oracle)."""

from xyjax.ops.attention import AttentionMetadata, TaskTable, meta_attention
from xyjax.ops.gemm import smooth_gemm

__all__ = ["AttentionMetadata", "TaskTable", "meta_attention", "smooth_gemm"]
