"""Meta-Attention: attention for a hybrid batch (prefill chunks, decodes, verify runs) over the paged KV cache.

The work comes as task tables of the tile contract (``ascend_ffi/include/xyjax/tile_contract.h``,
built by ``xyjax.ops.attention.tiling``): each task is one query tile of one sequence x one KV head over the KV
positions [kv_start, kv_end), with a CAUSAL (row i sees positions <= q_pos + i) or TREE mask, and
possibly one of several KV splits whose partial results are merged by log-sum-exp.

Contract (every backend):
    q:     [T, num_heads, head_dim] float; rows are the step's tokens.
    kv:    KVCache, k/v [L, num_blocks, num_kv_heads, block_size, head_dim], this step's K/V written.
    layer: int32 scalar, the layer whose cache is read.
    meta:  AttentionMetadata: block_tables [S, P] int32 (physical block of each logical block of
           sequence slot s), task groups, each a TaskTable(tasks [W, NUM_FIELDS] int32, num_tasks []
           int32, static tile = max query rows per task), and tree_mask (below).
Returns [T, num_heads, head_dim] in q's dtype; rows no task covers are zero, and so are rows of a
task that see no KV position at all.

KV splits: the tasks of one (seq, q_start, kv_head) with NUM_SPLITS = n > 1 are its splits
SPLIT = 0..n-1, identical but for their KV ranges, which partition the tile's range in order
([kv_start, kv_end) of split s + 1 starts where split s ends; the planner puts the boundaries at
multiples of block_size, which the ffi backend requires). Each split gives a normalised partial
output O_s and lse_s = log sum exp(scores) over the positions the row sees in the split (-inf
where it sees none); the result is sum_s exp(lse_s - m) O_s / sum_s exp(lse_s - m), m = max_s lse_s,
or zeros when every lse_s is -inf. Splits may sit in any group.

TREE masks (speculative tree verify): ``meta.tree_mask`` is [T, MT] uint8 (bool accepted), MT the
static maximum of tree tokens per sequence. For a TREE task, row i (flat row t = q_start + i) sees
position p in [kv_start, kv_end) iff p < mask_base, or 0 <= p - mask_base < MT and
tree_mask[t, p - mask_base] != 0; nothing else about tree order is implied (the planner sets each
node's own column and its ancestors'). CAUSAL tasks ignore tree_mask. With tree_mask None, the xla
backend treats every tree column as clear (TREE rows see only p < mask_base), the ffi backend
rejects TREE tasks.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from xyjax.ops.attention.contract import NUM_FIELDS
from xyjax.ops.attention.ffi import attend_ffi
from xyjax.ops.attention.metadata import AttentionMetadata, TaskTable
from xyjax.ops.attention.pallas import meta_attention_pallas
from xyjax.ops.attention.xla import attend_xla
from xyjax.ops.kv_cache import KVCache

__all__ = ["AttentionMetadata", "BACKENDS", "TaskTable", "meta_attention"]

# backend name -> fn(q, kv, layer, meta, scale) -> [T, H, D]; pallas runs in interpret mode on CPU (tests)
BACKENDS = {"xla": attend_xla, "ffi": attend_ffi, "pallas": meta_attention_pallas}


def meta_attention(q: jax.Array, kv: KVCache, layer: jax.Array | int, meta: AttentionMetadata, *,
                   scale: float | None = None, backend: str = "xla") -> jax.Array:
    """Attention of every task's query rows against its sequence's paged KV (see module docstring)."""
    num_tokens, num_heads, head_dim = q.shape
    chex.assert_rank(q, 3)
    chex.assert_rank(meta.block_tables, 2)
    chex.assert_axis_dimension(kv.k, 4, head_dim)
    for group in meta.groups:
        chex.assert_shape(group.tasks, (None, NUM_FIELDS))
        chex.assert_type([group.tasks, group.num_tasks], jnp.int32)
    if meta.tree_mask is not None:
        chex.assert_shape(meta.tree_mask, (num_tokens, None))
        if meta.tree_mask.dtype not in (jnp.uint8, jnp.bool_):
            raise TypeError(f"tree_mask dtype {meta.tree_mask.dtype} is not uint8 (or bool)")
    if num_heads % kv.num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv.num_kv_heads}")
    scale = head_dim ** -0.5 if scale is None else scale
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {', '.join(map(repr, BACKENDS))}")
    return BACKENDS[backend](q, kv, layer, meta, scale=scale).astype(q.dtype)


