"""Meta-Attention: attention for a hybrid batch (prefill chunks, decodes, verify runs) over the paged KV cache.

The work comes as task tables of the tile contract (``ascend_ffi/include/xyjax/tile_contract.h``,
built by ``xyjax.tiling``): each task is one query tile of one sequence x one KV head over the KV
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
import numpy as np
from flax import struct

import ascend_ffi
from ascend_ffi import NUM_FIELDS, Field, MaskKind
from xyjax.kv_cache import KVCache


@struct.dataclass
class TaskTable:
    """One group of attention tasks sharing a static query tile size (rows >= num_tasks are padding)."""

    tasks: jax.Array        # [W, NUM_FIELDS] int32
    num_tasks: jax.Array    # [] int32
    tile: int = struct.field(pytree_node=False)


@struct.dataclass
class AttentionMetadata:
    """Block tables, the step's task groups and the optional per-row tree mask (shapes above)."""

    block_tables: jax.Array
    groups: tuple[TaskTable, ...]
    tree_mask: jax.Array | None = None   # [T, MT] uint8; None: no TREE tasks (see module docstring)


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
    if backend == "xla":
        parts = [_attend_group_xla(q, kv, layer, meta.block_tables, meta.tree_mask, group, scale)
                 for group in meta.groups]
        return _merge_xla(q.shape, parts).astype(q.dtype)
    if backend == "ffi":
        return _attend_ffi(q, kv, layer, meta, scale)
    if backend == "pallas":   # interpret mode on CPU (tests); Triton on GPU
        from xyjax.ops.attention_pallas import meta_attention_pallas

        return meta_attention_pallas(q, kv, layer, meta, scale=scale).astype(q.dtype)
    raise ValueError(f"unknown attention backend {backend!r}; available: {', '.join(map(repr, BACKENDS))}")


BACKENDS = ("xla", "ffi", "pallas")


TASK_BLOCK = 32   # tasks processed together per loop iteration
KV_CHUNK = 128    # KV positions per online-softmax step


def _attend_group_xla(q, kv, layer, block_tables, tree_mask, group: TaskTable, scale):
    """Pure jnp, virtual padding by loops: blocks of TASK_BLOCK tasks up to ``num_tasks``; in each, KV chunks
    (whole cache blocks of one head, gathered contiguously) up to the block's longest task, merged by online
    softmax. Returns the group's per-task results for ``_merge_xla``: flat rows token [W', tile] (T where
    none), heads [W', G], normalised partial outputs [W', tile, G, D] float32 and their log-sum-exp
    [W', tile, G] (-inf where a row sees nothing), W' = W rounded up to TASK_BLOCK."""
    num_tokens, num_heads, head_dim = q.shape
    group_size, tile, block_size = num_heads // kv.num_kv_heads, group.tile, kv.block_size
    pages, chunk_blocks = block_tables.shape[1], KV_CHUNK // block_size
    width = -(-group.tasks.shape[0] // TASK_BLOCK) * TASK_BLOCK
    tasks = jnp.pad(jnp.asarray(group.tasks), ((0, width - group.tasks.shape[0]), (0, 0)))
    rows, heads = jnp.arange(tile), jnp.arange(group_size)
    real = jnp.arange(width) < group.num_tasks
    q_len = jnp.where(real, tasks[:, Field.Q_LEN], 0)
    all_tokens = jnp.where(rows[None] < q_len[:, None], tasks[:, Field.Q_START, None] + rows[None], num_tokens)
    all_heads = tasks[:, Field.KV_HEAD, None] * group_size + heads[None]                  # [W', G]
    mask_cols = 0 if tree_mask is None else tree_mask.shape[1]

    def task_block(b, carry):
        partials, lses = carry
        t = jax.lax.dynamic_slice_in_dim(tasks, b * TASK_BLOCK, TASK_BLOCK)       # [B, F]
        token = jax.lax.dynamic_slice_in_dim(all_tokens, b * TASK_BLOCK, TASK_BLOCK)  # [B, tile]
        q_heads = jax.lax.dynamic_slice_in_dim(all_heads, b * TASK_BLOCK, TASK_BLOCK)  # [B, G]
        live = jax.lax.dynamic_slice_in_dim(real, b * TASK_BLOCK, TASK_BLOCK)
        seq, head = t[:, Field.SEQ], t[:, Field.KV_HEAD]
        kv_start, kv_end = t[:, Field.KV_START], jnp.where(live, t[:, Field.KV_END], t[:, Field.KV_START])
        first_page = kv_start // block_size
        is_tree = (t[:, Field.MASK_KIND] == MaskKind.TREE)[:, None, None]                # [B, 1, 1]
        mask_base = t[:, Field.MASK_BASE, None, None]                                     # [B, 1, 1]
        qs = q.at[token[:, :, None], q_heads[:, None, :]].get(mode="fill", fill_value=0)
        qs = qs.astype(jnp.float32) * scale                                        # [B, tile, G, D]
        q_pos = t[:, Field.Q_POS, None] + rows[None]                               # [B, tile]

        def kv_chunk(j, carry):
            peak, denom, acc = carry
            page = first_page[:, None] + j * chunk_blocks + jnp.arange(chunk_blocks)[None]
            block = block_tables[seq[:, None], jnp.minimum(page, pages - 1)]       # [B, CB]
            keys = kv.k[layer, block, head[:, None]].reshape(TASK_BLOCK, KV_CHUNK, head_dim).astype(jnp.float32)
            values = kv.v[layer, block, head[:, None]].reshape(TASK_BLOCK, KV_CHUNK, head_dim).astype(jnp.float32)
            pos = (page[:, :, None] * block_size + jnp.arange(block_size)).reshape(TASK_BLOCK, KV_CHUNK)
            pos = pos[:, None, :]                                                  # [B, 1, C]
            s = jnp.einsum("btgd,bcd->btgc", qs, keys)
            in_range = (pos >= kv_start[:, None, None]) & (pos < kv_end[:, None, None])
            tree_seen = pos < mask_base
            if mask_cols:
                col = pos - mask_base
                bits = tree_mask[jnp.minimum(token, num_tokens - 1)[:, :, None], jnp.clip(col, 0, mask_cols - 1)]
                tree_seen |= (col >= 0) & (col < mask_cols) & (bits != 0)           # [B, tile, C]
            visible = in_range & jnp.where(is_tree, tree_seen, pos <= q_pos[:, :, None])
            visible = visible[:, :, None, :]                                       # [B, tile, 1, C]
            new_peak = jnp.maximum(peak, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
            safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
            p = jnp.where(visible, jnp.exp(s - safe[..., None]), 0.0)
            alpha = jnp.exp(jnp.where(jnp.isfinite(peak), peak - safe, -jnp.inf))
            return (new_peak, denom * alpha + p.sum(-1),
                    acc * alpha[..., None] + jnp.einsum("btgc,bcd->btgd", p, values))

        shape = (TASK_BLOCK, tile, group_size)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (head_dim,)))
        num_chunks = (jnp.max(kv_end - first_page * block_size) + KV_CHUNK - 1) // KV_CHUNK
        peak, denom, acc = jax.lax.fori_loop(0, num_chunks, kv_chunk, init)
        seen = denom > 0
        partial = acc / jnp.where(seen, denom, 1.0)[..., None]
        lse = jnp.where(seen, peak + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
        return (jax.lax.dynamic_update_slice_in_dim(partials, partial, b * TASK_BLOCK, 0),
                jax.lax.dynamic_update_slice_in_dim(lses, lse, b * TASK_BLOCK, 0))

    init = (jnp.zeros((width, tile, group_size, head_dim), jnp.float32),
            jnp.full((width, tile, group_size), -jnp.inf, jnp.float32))
    partials, lses = jax.lax.fori_loop(0, (group.num_tasks + TASK_BLOCK - 1) // TASK_BLOCK, task_block, init)
    return all_tokens, all_heads, partials, lses


def _merge_xla(shape, parts):
    """The rows of every group's tasks merged by log-sum-exp weights: scatter-max of lse per (row, head)
    into [T, H], then scatter-add of exp(lse - max) * partial and exp(lse - max); [T, H, D] float32. An
    unsplit row's weight is exactly 1, so it comes out as its task's result unchanged."""
    num_tokens, num_heads, head_dim = shape
    if not parts:
        return jnp.zeros(shape, jnp.float32)
    peak = jnp.full((num_tokens, num_heads), -jnp.inf, jnp.float32)
    for token, heads, _, lse in parts:
        peak = peak.at[token[:, :, None], heads[:, None, :]].max(lse, mode="drop")
    num = jnp.zeros(shape, jnp.float32)
    den = jnp.zeros((num_tokens, num_heads), jnp.float32)
    for token, heads, partial, lse in parts:
        idx = (token[:, :, None], heads[:, None, :])
        top = peak.at[idx].get(mode="fill", fill_value=-jnp.inf)
        weight = jnp.where(lse > -jnp.inf, jnp.exp(lse - jnp.where(top > -jnp.inf, top, 0.0)), 0.0)
        num = num.at[idx].add(weight[..., None] * partial, mode="drop")
        den = den.at[idx].add(weight, mode="drop")
    return num / jnp.where(den > 0, den, 1.0)[..., None]


FFI_TARGET = "xyjax_meta_attention_cpu"   # jax.ffi target of the C++ CPU kernel (ascend_ffi/src/meta_attention_cpu.cc)
FFI_DTYPES = (jnp.float32, jnp.bfloat16)


def _attend_ffi(q, kv, layer, meta: AttentionMetadata, scale):
    """The C++ CPU kernel as a jax.ffi custom call (CPU only). The whole cache goes in and is read in place
    (no per-layer slice); the groups' tables become one table, rows at index >= num_tasks zeroed to padding
    (q_len 0), and the tree mask goes in as uint8 [T, MT] ([T, 0] without one). Invalid tables (bad split
    groups, TREE tasks without a tree mask, rows or positions out of range) fail when the call runs."""
    for name, x in (("q", q), ("KV cache", kv.k)):
        if x.dtype not in FFI_DTYPES:
            raise TypeError(f"ffi attention backend: {name} dtype {x.dtype} is not float32 or bfloat16")
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("ffi attention backend: scale must be a Python float (a static attribute), not traced")
    tables = []
    for g in meta.groups:
        t = jnp.asarray(g.tasks, jnp.int32)
        live = jnp.arange(t.shape[0]) < g.num_tasks
        tables.append(t.at[:, Field.Q_LEN].set(jnp.where(live, t[:, Field.Q_LEN], 0)))
    tasks = jnp.concatenate(tables) if tables else jnp.zeros((0, NUM_FIELDS), jnp.int32)
    ascend_ffi.register_ffi_target(FFI_TARGET, "XyjaxMetaAttentionCpu", platform="cpu")
    if meta.tree_mask is None:
        tree_mask = jnp.zeros((q.shape[0], 0), jnp.uint8)
    else:
        tree_mask = jnp.asarray(meta.tree_mask).astype(jnp.uint8)
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, kv.k, kv.v, jnp.asarray(layer, jnp.int32), jnp.asarray(meta.block_tables, jnp.int32), tasks,
                tree_mask, scale=np.float32(scale))
