"""Task decomposition on the device (jnp, traceable): ``tiling.attention_metadata`` for traced sequence lengths.

The same tables as the host planner's with ``max_splits = 1`` (no KV splits, so ``lanes`` changes nothing) and
no TREE tasks: each sequence's query rows are cut into tiles (``decode``: the 1-row sequences, 1-token tiles;
``chunk``: the longer ones, tiles of ``tile`` rows), each tile x KV head one CAUSAL task over KV [0, kv_end),
in sequence order, padding rows zero. Every tile's slot in its table is the exclusive prefix sum of the tiles
before it, so the whole table is one scatter of a static [S, max tiles, KV heads] candidate grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.attention.metadata import AttentionMetadata, TaskTable
from xyjax.ops.attention.tiling import capacities


def _scatter_tiles(capacity, valid, slot, seq, q_start, q_len, q_pos, kv_end, num_kv_heads):
    """Task table [capacity, NUM_FIELDS] int32 of the tiles [S, J] (``valid`` ones at tile slot ``slot``), each
    tile repeated over the KV heads."""
    shape = valid.shape + (num_kv_heads,)
    heads = jnp.broadcast_to(jnp.arange(num_kv_heads, dtype=jnp.int32), shape)
    grow = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32)[..., None], shape)  # noqa: E731
    columns = {Field.SEQ: grow(seq), Field.Q_START: grow(q_start), Field.Q_LEN: grow(q_len), Field.Q_POS: grow(q_pos),
               Field.KV_START: jnp.zeros(shape, jnp.int32), Field.KV_END: grow(kv_end), Field.KV_HEAD: heads,
               Field.MASK_KIND: jnp.full(shape, MaskKind.CAUSAL, jnp.int32),
               Field.MASK_BASE: jnp.zeros(shape, jnp.int32),
               Field.SPLIT: jnp.zeros(shape, jnp.int32), Field.NUM_SPLITS: jnp.ones(shape, jnp.int32)}
    rows = jnp.stack([columns[f] for f in Field], axis=-1).reshape(-1, NUM_FIELDS)
    dest = jnp.where(grow(valid) > 0, grow(slot) * num_kv_heads + heads, capacity).reshape(-1)   # invalid: dropped
    return jnp.zeros((capacity, NUM_FIELDS), jnp.int32).at[dest].set(rows, mode="drop")


def build_tasks(q_start, q_len, kv_len, *, num_kv_heads: int, tile: int, num_tokens: int, max_q_len: int):
    """(decode TaskTable, chunk TaskTable) for sequences [S] int32 as ``tiling.build_tasks`` with max_splits 1:
    ``q_len[s]`` rows at flat rows ``q_start[s]:``, KV ``kv_len[s]`` after the step; at most ``num_tokens`` rows
    in all (the capacities' bucket) and ``max_q_len`` (static) per sequence."""
    q_start, q_len, kv_len = (jnp.asarray(a, jnp.int32) for a in (q_start, q_len, kv_len))
    seqs = jnp.arange(q_len.shape[0], dtype=jnp.int32)
    history = kv_len - q_len
    cap_decode, cap_chunk = capacities(num_tokens, q_len.shape[0], num_kv_heads, tile)
    decode = q_len == 1
    slot = jnp.cumsum(decode) - decode
    decode_table = _scatter_tiles(cap_decode, decode[:, None], slot[:, None], seqs[:, None], q_start[:, None],
                                  jnp.ones_like(q_len)[:, None], history[:, None], kv_len[:, None], num_kv_heads)
    tiles = jnp.where(q_len > 1, -(-q_len // tile), 0)                          # [S]
    j = jnp.arange(-(-max(max_q_len, 0) // tile), dtype=jnp.int32)[None]      # [1, J]
    offset = j * tile
    first = (jnp.cumsum(tiles) - tiles)[:, None]
    chunk_table = _scatter_tiles(cap_chunk, j < tiles[:, None], first + j, seqs[:, None], q_start[:, None] + offset,
                                 jnp.minimum(tile, q_len[:, None] - offset), history[:, None] + offset,
                                 jnp.minimum(kv_len[:, None], history[:, None] + offset + tile), num_kv_heads)
    num_decode = (jnp.sum(decode) * num_kv_heads).astype(jnp.int32)
    num_chunk = (jnp.sum(tiles) * num_kv_heads).astype(jnp.int32)
    return TaskTable(decode_table, num_decode, 1), TaskTable(chunk_table, num_chunk, tile)


def attention_metadata(q_start, q_len, kv_len, block_tables, *, num_kv_heads: int, tile: int, num_tokens: int,
                       max_q_len: int) -> AttentionMetadata:
    """AttentionMetadata of per-sequence int32 arrays [S] (traced) and ``block_tables`` [S, P]: equal to
    ``tiling.attention_metadata(..., num_tokens=num_tokens, max_splits=1)`` (see ``build_tasks``)."""
    groups = build_tasks(q_start, q_len, kv_len, num_kv_heads=num_kv_heads, tile=tile, num_tokens=num_tokens,
                         max_q_len=max_q_len)
    return AttentionMetadata(block_tables=jnp.asarray(block_tables, jnp.int32), groups=groups)


def contiguous_block_tables(num_seqs: int, pages: int) -> jax.Array:
    """Block tables [num_seqs, pages] int32 of a contiguous cache: sequence b owns blocks [b * pages,
    (b + 1) * pages)."""
    return jnp.arange(num_seqs * pages, dtype=jnp.int32).reshape(num_seqs, pages)
