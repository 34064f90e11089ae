"""Paged KV cache: a pytree of per-layer K and V blocks, written functionally through a slot mapping."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """K and V blocks for every layer.

    k, v: ``[num_layers, num_blocks, num_kv_heads, block_size, head_dim]`` (head-major inside a block, so
    one head's keys of a block are contiguous). Flat slot ``s`` is ``(block = s // block_size, offset =
    s % block_size)``.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    def write(self, layer: jax.Array | int, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> "KVCache":
        """Write ``k, v: [T, num_kv_heads, head_dim]`` of ``layer`` at flat slots ``slot_mapping: [T]`` int32.

        Slot -1 writes nothing (padding tokens). Runs in place when the cache is a loop carry or donated.
        """
        chex.assert_equal_shape([k, v])
        chex.assert_shape(slot_mapping, (k.shape[0],))
        block = jnp.where(slot_mapping < 0, self.num_blocks, slot_mapping // self.block_size)  # OOB -> dropped
        offset = slot_mapping % self.block_size
        return KVCache(
            k=self.k.at[layer, block, :, offset].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[layer, block, :, offset].set(v.astype(self.v.dtype), mode="drop"),
        )

    def copy_block(self, source: jax.Array, destination: jax.Array) -> "KVCache":
        """Block ``destination`` := block ``source`` in every layer (copy-on-write of a shared block)."""
        def copy(x):
            return jax.lax.dynamic_update_index_in_dim(x, jax.lax.dynamic_index_in_dim(x, source, 1), destination, 1)
        return KVCache(k=copy(self.k), v=copy(self.v))

    def move(self, moves: jax.Array) -> "KVCache":
        """Copy every layer's K/V from slot ``moves[i, 0]`` to slot ``moves[i, 1]`` (``moves: [C, 2]`` int32;
        a row with -1 copies nothing). All reads happen before all writes."""
        src, dst = moves[:, 0], moves[:, 1]
        valid = (src >= 0) & (dst >= 0)
        src = jnp.where(valid, src, 0)
        block = jnp.where(valid, dst // self.block_size, self.num_blocks)                     # OOB -> dropped
        k = self.k[:, src // self.block_size, :, src % self.block_size]
        v = self.v[:, src // self.block_size, :, src % self.block_size]
        return KVCache(k=self.k.at[:, block, :, dst % self.block_size].set(k, mode="drop"),
                       v=self.v.at[:, block, :, dst % self.block_size].set(v, mode="drop"))


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """KV bytes one token occupies across all layers (K and V)."""
    return 2 * num_layers * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize
