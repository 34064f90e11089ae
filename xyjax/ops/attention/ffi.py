"""The ffi backend of meta_attention: the C++ CPU kernel (``ascend_ffi/src/meta_attention_cpu.cc``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ascend_ffi
from xyjax.ops.attention.contract import NUM_FIELDS
from xyjax.ops.attention.metadata import AttentionMetadata, live_tasks

FFI_TARGET = "xyjax_meta_attention_cpu"   # jax.ffi target of the C++ CPU kernel (ascend_ffi/src/meta_attention_cpu.cc)
FFI_DTYPES = (jnp.float32, jnp.bfloat16)


def attend_ffi(q, kv, layer, meta: AttentionMetadata, scale):
    """The C++ CPU kernel as a jax.ffi custom call (CPU only). The whole cache goes in and is read in place
    (no per-layer slice); the groups' tables become one table, rows at index >= num_tasks zeroed to padding
    (q_len 0), and the tree mask goes in as uint8 [T, MT] ([T, 0] without one). Invalid tables (bad split
    groups, TREE tasks without a tree mask, rows or positions out of range) fail when the call runs."""
    for name, x in (("q", q), ("KV cache", kv.k)):
        if x.dtype not in FFI_DTYPES:
            raise TypeError(f"ffi attention backend: {name} dtype {x.dtype} is not float32 or bfloat16")
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("ffi attention backend: scale must be a Python float (a static attribute), not traced")
    tables = [live_tasks(g) for g in meta.groups]
    tasks = jnp.concatenate(tables) if tables else jnp.zeros((0, NUM_FIELDS), jnp.int32)
    ascend_ffi.register_ffi_target(FFI_TARGET, "XyjaxMetaAttentionCpu", platform="cpu")
    if meta.tree_mask is None:
        tree_mask = jnp.zeros((q.shape[0], 0), jnp.uint8)
    else:
        tree_mask = jnp.asarray(meta.tree_mask).astype(jnp.uint8)
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, kv.k, kv.v, jnp.asarray(layer, jnp.int32), jnp.asarray(meta.block_tables, jnp.int32), tasks,
                tree_mask, scale=np.float32(scale))
