"""The xla backend of meta_attention: pure jnp, the oracle (virtual padding by loops over the real tasks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xyjax.ops.attention.contract import Field, MaskKind
from xyjax.ops.attention.metadata import AttentionMetadata, TaskTable, merge_partials

TASK_BLOCK = 32   # tasks processed together per loop iteration
KV_CHUNK = 128    # KV positions per online-softmax step


def _attend_group_xla(q, kv, layer, block_tables, tree_mask, group: TaskTable, scale):
    """Pure jnp, virtual padding by loops: blocks of TASK_BLOCK tasks up to ``num_tasks``; in each, KV chunks
    (whole cache blocks of one head, gathered contiguously) up to the block's longest task, merged by online
    softmax. Returns the group's per-task results for ``merge_partials``: flat rows token [W', tile] (T where
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



def attend_xla(q, kv, layer, meta: AttentionMetadata, scale) -> jax.Array:
    """Every group's tasks, merged: [T, H, D] float32. Host (numpy) metadata is fine, eagerly or traced."""
    tables = jnp.asarray(meta.block_tables)
    tree_mask = None if meta.tree_mask is None else jnp.asarray(meta.tree_mask)
    parts = []
    for group in meta.groups:
        token, heads, partial, lse = _attend_group_xla(q, kv, layer, tables, tree_mask, group, scale)
        parts.append((token[:, :, None], heads[:, None, :], partial, lse))
    return merge_partials(q.shape, parts)[0]
