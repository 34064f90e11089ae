"""The attention op's inputs: task tables of the tile contract, the step's metadata, and the two pieces every
backend shares: padding-task masking and the log-sum-exp merge of partial results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from xyjax.ops.attention.contract import Field

TASK_COLS = 16   # the Pallas kernels' task rows: NUM_FIELDS int32 padded to a power of two


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



def live_tasks(group: TaskTable) -> jax.Array:
    """``group.tasks`` [W, NUM_FIELDS] int32 with rows >= num_tasks made padding tasks (Q_LEN 0)."""
    tasks = jnp.asarray(group.tasks, jnp.int32)
    live = jnp.arange(tasks.shape[0]) < group.num_tasks
    return tasks.at[:, Field.Q_LEN].set(jnp.where(live, tasks[:, Field.Q_LEN], 0))


def packed_rows(tasks, num_tokens: int, group: int, tile: int, rows: int):
    """The Pallas kernels' packing of a task's G query heads as rows r = i * G + g (query row i, head g): the flat
    token and query head of each packed row, [W, R] each; token = num_tokens (out of range) past the task's rows."""
    r = jnp.arange(rows, dtype=jnp.int32)
    q_len = jnp.minimum(tasks[:, Field.Q_LEN], tile)
    live = r[None, :] < q_len[:, None] * group
    token = jnp.where(live, tasks[:, Field.Q_START, None] + r[None, :] // group, num_tokens)
    head = tasks[:, Field.KV_HEAD, None] * group + r[None, :] % group
    return token, head


def merge_partials(shape, parts) -> tuple[jax.Array, jax.Array]:
    """Scatter per-task partial outputs into [T, H, D], merging those on the same (row, head) by log-sum-exp
    weights. ``parts``: (token, head, partial, lse), token and head index arrays that broadcast to lse's shape
    (token T: dropped), partial [..., D] float32 normalised over its KV, lse its log-sum-exp (-inf: saw
    nothing). An unsplit row's weight is exactly 1, so it comes out unchanged. Returns (out [T, H, D] float32,
    lse [T, H], -inf where nothing was seen)."""
    num_tokens, num_heads, _ = shape
    peak = jnp.full((num_tokens, num_heads), -jnp.inf, jnp.float32)
    for token, head, _, lse in parts:
        peak = peak.at[token, head].max(lse, mode="drop")
    num = jnp.zeros(shape, jnp.float32)
    den = jnp.zeros((num_tokens, num_heads), jnp.float32)
    for token, head, partial, lse in parts:
        top = peak.at[token, head].get(mode="fill", fill_value=-jnp.inf)
        weight = jnp.where(lse > -jnp.inf, jnp.exp(lse - jnp.where(top > -jnp.inf, top, 0.0)), 0.0)
        num = num.at[token, head].add(weight[..., None] * partial, mode="drop")
        den = den.at[token, head].add(weight, mode="drop")
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out, jnp.where(den > 0, peak + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
