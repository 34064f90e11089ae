"""Meta-Attention: attention for a hybrid batch (prefill chunks, decodes, verify runs) over the paged KV cache.

The work comes as task tables of the tile contract (``ascend_ffi/include/xyjax/tile_contract.h``,
built by ``xyjax.tiling``): each task is one query tile of one sequence x one KV head over the KV
positions [kv_start, kv_end), with a causal-with-offset mask (row i sees positions <= q_pos + i).

Contract (every backend):
    q:     [T, num_heads, head_dim] float; rows are the step's tokens.
    kv:    KVCache, k/v [L, num_blocks, num_kv_heads, block_size, head_dim], this step's K/V written.
    layer: int32 scalar, the layer whose cache is read.
    meta:  AttentionMetadata: block_tables [S, P] int32 (physical block of each logical block of
           sequence slot s) and task groups, each a TaskTable(tasks [W, NUM_FIELDS] int32, num_tasks []
           int32, static tile = max query rows per task).
Returns [T, num_heads, head_dim] in q's dtype; rows no task covers are zero.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import ascend_ffi
from ascend_ffi import NUM_FIELDS, Field
from xyjax.kv_cache import KVCache


@struct.dataclass
class TaskTable:
    """One group of attention tasks sharing a static query tile size (rows >= num_tasks are padding)."""

    tasks: jax.Array        # [W, NUM_FIELDS] int32
    num_tasks: jax.Array    # [] int32
    tile: int = struct.field(pytree_node=False)


@struct.dataclass
class AttentionMetadata:
    """Block tables and the step's task groups (shapes above)."""

    block_tables: jax.Array
    groups: tuple[TaskTable, ...]


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
    if num_heads % kv.num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv.num_kv_heads}")
    scale = head_dim ** -0.5 if scale is None else scale
    if backend == "xla":
        out = jnp.zeros(q.shape, jnp.float32)
        for group in meta.groups:
            out = _attend_group_xla(q, kv, layer, meta.block_tables, group, scale, out)
        return out.astype(q.dtype)
    if backend == "ffi":
        return _attend_ffi(q, kv, layer, meta, scale)
    raise ValueError(f"unknown attention backend {backend!r}; available: 'xla', 'ffi'")


TASK_BLOCK = 32   # tasks processed together per loop iteration
KV_CHUNK = 128    # KV positions per online-softmax step


def _attend_group_xla(q, kv, layer, block_tables, group: TaskTable, scale, out):
    """Pure jnp, virtual padding by loops: blocks of TASK_BLOCK tasks up to ``num_tasks``; in each, KV chunks
    (whole cache blocks of one head, gathered contiguously) up to the block's longest task, merged by online
    softmax. Writes the group's rows into ``out`` [T, H, D] float32. Needs kv_start % block_size == 0."""
    num_tokens, num_heads, head_dim = q.shape
    group_size, tile, block_size = num_heads // kv.num_kv_heads, group.tile, kv.block_size
    pages, chunk_blocks = block_tables.shape[1], KV_CHUNK // block_size
    width = -(-group.tasks.shape[0] // TASK_BLOCK) * TASK_BLOCK
    tasks = jnp.pad(group.tasks, ((0, width - group.tasks.shape[0]), (0, 0)))
    rows, heads = jnp.arange(tile), jnp.arange(group_size)

    def task_block(b, out):
        t = jax.lax.dynamic_slice_in_dim(tasks, b * TASK_BLOCK, TASK_BLOCK)       # [B, F]
        real = b * TASK_BLOCK + jnp.arange(TASK_BLOCK) < group.num_tasks
        seq, head = t[:, Field.SEQ], t[:, Field.KV_HEAD]
        q_len = jnp.where(real, t[:, Field.Q_LEN], 0)
        kv_start, kv_end = t[:, Field.KV_START], jnp.where(real, t[:, Field.KV_END], t[:, Field.KV_START])
        token = jnp.where(rows[None] < q_len[:, None], t[:, Field.Q_START, None] + rows[None], num_tokens)
        q_heads = head[:, None] * group_size + heads[None]                         # [B, G]
        qs = q.at[token[:, :, None], q_heads[:, None, :]].get(mode="fill", fill_value=0)
        qs = qs.astype(jnp.float32) * scale                                        # [B, tile, G, D]
        q_pos = t[:, Field.Q_POS, None] + rows[None]                               # [B, tile]

        def kv_chunk(j, carry):
            peak, denom, acc = carry
            page = kv_start[:, None] // block_size + j * chunk_blocks + jnp.arange(chunk_blocks)[None]
            block = block_tables[seq[:, None], jnp.minimum(page, pages - 1)]       # [B, CB]
            keys = kv.k[layer, block, head[:, None]].reshape(TASK_BLOCK, KV_CHUNK, head_dim).astype(jnp.float32)
            values = kv.v[layer, block, head[:, None]].reshape(TASK_BLOCK, KV_CHUNK, head_dim).astype(jnp.float32)
            pos = (page[:, :, None] * block_size + jnp.arange(block_size)).reshape(TASK_BLOCK, KV_CHUNK)
            s = jnp.einsum("btgd,bcd->btgc", qs, keys)
            visible = (pos[:, None, :] < kv_end[:, None, None]) & (pos[:, None, :] <= q_pos[:, :, None])
            visible = visible[:, :, None, :]                                       # [B, tile, 1, C]
            new_peak = jnp.maximum(peak, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
            safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
            p = jnp.where(visible, jnp.exp(s - safe[..., None]), 0.0)
            alpha = jnp.exp(jnp.where(jnp.isfinite(peak), peak - safe, -jnp.inf))
            return (new_peak, denom * alpha + p.sum(-1),
                    acc * alpha[..., None] + jnp.einsum("btgc,bcd->btgd", p, values))

        shape = (TASK_BLOCK, tile, group_size)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (head_dim,)))
        num_chunks = (jnp.max(kv_end - kv_start) + KV_CHUNK - 1) // KV_CHUNK
        _, denom, acc = jax.lax.fori_loop(0, num_chunks, kv_chunk, init)
        result = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
        return out.at[token[:, :, None], q_heads[:, None, :]].set(result, mode="drop")

    return jax.lax.fori_loop(0, (group.num_tasks + TASK_BLOCK - 1) // TASK_BLOCK, task_block, out)


FFI_TARGET = "xyjax_meta_attention_cpu"   # jax.ffi target of the C++ CPU kernel (ascend_ffi/src/meta_attention_cpu.cc)
FFI_DTYPES = (jnp.float32, jnp.bfloat16)


def _attend_ffi(q, kv, layer, meta: AttentionMetadata, scale):
    """The C++ CPU kernel as a jax.ffi custom call (CPU only). The whole cache goes in and is read in place
    (no per-layer slice); the groups' tables become one table, rows at index >= num_tasks zeroed to padding
    (q_len 0). Only CAUSAL, unsplit tasks are implemented: others fail when the call runs."""
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
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, kv.k, kv.v, jnp.asarray(layer, jnp.int32), jnp.asarray(meta.block_tables, jnp.int32), tasks,
                scale=np.float32(scale))
