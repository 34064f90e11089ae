"""Planner on the device (jnp, traceable): the StepInputs of a fixed batch of B sequences over a contiguous paged
cache (sequence b owns blocks [b * pages, (b + 1) * pages), so its KV slot of position p is b * pages * block_size
+ p). Lengths are traced int32 data, shapes static, so one program serves every batch of the same padded shape;
the attention tables are the host planner's (``xyjax.ops.attention.device_tiling``). Real tokens are packed at the
front of the token array like the host planner's; padding rows have slot -1 and no task."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xyjax.ops.attention import device_tiling
from xyjax.ops.step_inputs import StepInputs


def _slots(pages: int, block_size: int, positions: jax.Array) -> jax.Array:
    """Flat KV slots [B, ...] int32 of ``positions`` [B, ...] in the contiguous cache."""
    seq = jnp.arange(positions.shape[0], dtype=jnp.int32).reshape((-1,) + (1,) * (positions.ndim - 1))
    return seq * pages * block_size + positions


def prefill_inputs(prompt_ids: jax.Array, prompt_lens: jax.Array, *, pages: int, block_size: int, num_kv_heads: int,
                   tile: int) -> StepInputs:
    """The step that writes every prompt's KV: ``prompt_ids`` [B, P] int32 (row b's first ``prompt_lens[b]``
    tokens, 1 <= prompt_lens[b] <= P; the rest ignored) packed into T = B * P rows; samples each prompt's last
    row (R = B)."""
    num_seqs, width = prompt_ids.shape
    lens = jnp.asarray(prompt_lens, jnp.int32)
    q_start = jnp.cumsum(lens) - lens
    pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (num_seqs, width))
    total = num_seqs * width
    row = jnp.where(pos < lens[:, None], q_start[:, None] + pos, total).reshape(-1)       # padding: dropped
    def pack(values, fill):
        return jnp.full(total, fill, jnp.int32).at[row].set(values.reshape(-1), mode="drop")
    tables = device_tiling.contiguous_block_tables(num_seqs, pages)
    attention = device_tiling.attention_metadata(q_start, lens, lens, tables, num_kv_heads=num_kv_heads, tile=tile,
                                                 num_tokens=total, max_q_len=width)
    return StepInputs(token_ids=pack(prompt_ids.astype(jnp.int32), 0), positions=pack(pos, 0),
                      slot_mapping=pack(_slots(pages, block_size, pos), -1), num_tokens=jnp.sum(lens),
                      attention=attention, sample_index=q_start + lens - 1, num_samples=jnp.int32(num_seqs))


def decode_inputs(tokens: jax.Array, seq_lens: jax.Array, active: jax.Array, *, pages: int, block_size: int,
                  num_kv_heads: int, tile: int) -> StepInputs:
    """One token per ``active`` [B] bool sequence: ``tokens`` [B] int32 at position ``seq_lens`` [B] int32 (the
    KV already cached), packed at rows 0..sum(active)-1; inactive sequences write and attend nothing. Samples
    row b's token at row b (R = B; an inactive row's logits are meaningless)."""
    num_seqs = tokens.shape[0]
    active = jnp.asarray(active, bool)
    q_len = active.astype(jnp.int32)
    rank = jnp.cumsum(q_len) - q_len
    row = jnp.where(active, rank, num_seqs)                                               # inactive: dropped
    pack = lambda values, fill: jnp.full(num_seqs, fill, jnp.int32).at[row].set(values, mode="drop")  # noqa: E731
    tables = device_tiling.contiguous_block_tables(num_seqs, pages)
    attention = device_tiling.attention_metadata(rank, q_len, seq_lens + q_len, tables, num_kv_heads=num_kv_heads,
                                                 tile=tile, num_tokens=num_seqs, max_q_len=1)
    return StepInputs(token_ids=pack(tokens.astype(jnp.int32), 0), positions=pack(seq_lens, 0),
                      slot_mapping=pack(_slots(pages, block_size, seq_lens), -1), num_tokens=jnp.sum(q_len),
                      attention=attention, sample_index=jnp.where(active, rank, 0),
                      num_samples=jnp.int32(num_seqs))
