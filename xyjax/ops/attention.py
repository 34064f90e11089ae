"""Meta-Attention: causal attention for a ragged batch of sequences over the paged KV cache.

Contract (every backend):
    q:            [T, num_heads, head_dim] float; rows are the step's tokens, sequence by sequence.
    kv:           KVCache, k/v [L, num_blocks, block_size, num_kv_heads, head_dim]; this step's K/V
                  already written.
    layer:        int32 scalar, the layer whose cache is read.
    meta.q_start  [S] int32  first row of sequence s in ``q``.
    meta.q_len    [S] int32  rows of sequence s this step (0: unused sequence slot).
    meta.kv_len   [S] int32  KV positions of sequence s after this step (history + q_len).
    meta.block_tables [S, P] int32  physical block of each logical block (unused entries: any valid id).
    meta.max_q_len (static) an upper bound on q_len.
Query row i of sequence s sits at absolute position ``kv_len - q_len + i`` and sees KV positions
``<= `` that position (causal with offset: prefill, chunked prefill, cached prefixes and decode alike).
Returns [T, num_heads, head_dim] in q's dtype; rows that belong to no sequence are zero.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from xyjax.kv_cache import KVCache


@struct.dataclass
class AttentionMetadata:
    """Where each sequence's query rows and KV pages are (shapes above)."""

    q_start: jax.Array
    q_len: jax.Array
    kv_len: jax.Array
    block_tables: jax.Array
    max_q_len: int = struct.field(pytree_node=False)


def meta_attention(q: jax.Array, kv: KVCache, layer: jax.Array | int, meta: AttentionMetadata, *,
                   scale: float | None = None, backend: str = "xla") -> jax.Array:
    """Attention of every query row against its own sequence's paged KV (see module docstring)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = meta.block_tables.shape[0]
    chex.assert_rank(q, 3)
    chex.assert_shape([meta.q_start, meta.q_len, meta.kv_len], (num_seqs,))
    chex.assert_type([meta.q_start, meta.q_len, meta.kv_len, meta.block_tables], jnp.int32)
    chex.assert_axis_dimension(kv.k, 4, head_dim)
    if num_heads % kv.k.shape[3]:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv.k.shape[3]}")
    scale = head_dim ** -0.5 if scale is None else scale
    if backend == "xla":
        return _attention_xla(q, kv, layer, meta, scale)
    raise ValueError(f"unknown attention backend {backend!r}; available: 'xla'")


def _attention_xla(q, kv, layer, meta, scale):
    """Pure jnp: gather each sequence's pages, masked softmax in float32, scatter rows back."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, pages = meta.block_tables.shape
    num_kv_heads = kv.k.shape[3]
    group = num_heads // num_kv_heads
    rows = jnp.arange(meta.max_q_len)
    row_ok = rows[None, :] < meta.q_len[:, None]                                    # [S, Q]
    token = jnp.where(row_ok, meta.q_start[:, None] + rows[None, :], num_tokens)    # [S, Q]
    qs = q.at[token].get(mode="fill", fill_value=0).astype(jnp.float32)              # [S, Q, H, D]
    qs = qs.reshape(num_seqs, meta.max_q_len, num_kv_heads, group, head_dim)

    kv_shape = (num_seqs, pages * kv.block_size, num_kv_heads, head_dim)
    keys = kv.k[layer, meta.block_tables].reshape(kv_shape).astype(jnp.float32)    # [S, K, Hkv, D]
    values = kv.v[layer, meta.block_tables].reshape(kv_shape).astype(jnp.float32)

    scores = jnp.einsum("sqhgd,skhd->shgqk", qs, keys) * scale                       # [S, Hkv, G, Q, K]
    q_pos = (meta.kv_len - meta.q_len)[:, None] + rows[None, :]                      # [S, Q]
    visible = (jnp.arange(kv_shape[1])[None, None, :] <= q_pos[:, :, None]) & row_ok[:, :, None]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))              # masked -> exp(-inf) = 0
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("shgqk,skhd->sqhgd", probs, values).reshape(num_seqs, meta.max_q_len, num_heads, head_dim)
    result = jnp.zeros_like(q).at[token].set(out.astype(q.dtype), mode="drop")
    return result
