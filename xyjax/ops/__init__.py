"""The bottom layer that models are built from: the two ops (``attention``, ``gemm``; each with an ``xla``
backend, pure jnp, the oracle), the paged KV cache, a step's inputs and the sampler."""

from xyjax.ops.attention import AttentionMetadata, TaskTable, meta_attention
from xyjax.ops.backends import Backends
from xyjax.ops.gemm import smooth_gemm, take_rows
from xyjax.ops.kv_cache import KVCache
from xyjax.ops.step_inputs import StepInputs

__all__ = ["AttentionMetadata", "Backends", "KVCache", "StepInputs", "TaskTable", "meta_attention", "smooth_gemm",
           "take_rows"]
