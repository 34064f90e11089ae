"""The host side of the Ascend Meta-Attention kernel (``ascend_ffi/ascendc/kernels/meta_attention.py``), numpy:
from the planner's task tables to the token table (XY-Serve §4.2), the deal of tasks to AI cores (§4.3), the
pipeline choice (§5.2), the launch's tiling (``AttentionTiling``, the ctypes mirror of
``ascend_ffi/include/xyjax/ascend_tiling.h``) and the kernel's packed operands.

One launch per task group (each group has its own static tile). Nothing here needs CANN; the kernel it feeds
has been interpreted and translated on CPU, never run on an NPU."""

from __future__ import annotations

import ctypes

import numpy as np

from xyjax.ops.attention.contract import Field, MaskKind

PIPELINE_2STAGE, PIPELINE_3STAGE, PIPELINE_4STAGE = 2, 3, 4
STAGE_P, STAGE_D, STAGE_V = 0, 1, 2        # token-table stage ids: prefill chunk, decode, (tree) verify
# Defaults of the pipeline rule. The paper gives no values; these are placeholders until measured on a 910B:
# float32 scores, and each of the 24 AI cores' 512 KiB L1.
ALPHA = 4.0
CACHE_BYTES = 24 * 512 * 1024


class AttentionTiling(ctypes.Structure):
    """XyjaxAscendAttentionTiling (field meanings in the header)."""

    _fields_ = [(name, ctypes.c_int32) for name in (
        "num_tasks", "num_cores", "pipeline", "rows", "group", "head_dim", "block_size", "max_pages",
        "num_kv_heads", "q_pad_rows", "tree_cols", "q_rows", "kv_rows", "num_tables", "num_slots",
        "tree_rows", "score_cols")] + [("scale", ctypes.c_float)]


def _live(tasks, num_tasks) -> np.ndarray:
    return np.asarray(tasks, np.int32)[:int(num_tasks)]


def token_table(groups) -> np.ndarray:
    """§4.2's token table [E, 5] int32, one entry per (sequence, group): (stage, start, token_num, kv_len of
    history, tile). ``groups``: (tasks [W, F], num_tasks, tile) per group. Stage: D for 1-row tiles, V for
    TREE tasks, else P (a chain verify is causal, so it reads as P)."""
    entries = []
    for tasks, num, tile in groups:
        live = _live(tasks, num)
        first = live[(live[:, Field.KV_HEAD] == 0) & (live[:, Field.SPLIT] == 0)]
        for seq in np.unique(first[:, Field.SEQ]):
            tiles = first[first[:, Field.SEQ] == seq]
            stage = (STAGE_V if tiles[0, Field.MASK_KIND] == MaskKind.TREE else STAGE_D if tile == 1 else STAGE_P)
            entries.append((stage, tiles[:, Field.Q_START].min(), tiles[:, Field.Q_LEN].sum(),
                            tiles[:, Field.Q_POS].min(), tile))
    return np.asarray(entries, np.int32).reshape(-1, 5)


def task_loads(tasks, num_tasks, group: int) -> np.ndarray:
    """Load of each real task: its query rows (q_len x G) x the KV positions it reads."""
    live = _live(tasks, num_tasks)
    return live[:, Field.Q_LEN].astype(np.int64) * group * (live[:, Field.KV_END] - live[:, Field.KV_START])


def deal(loads, num_cores: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest-first symmetric round-robin (§4.3): tasks by load, descending, go to cores 0, 1, ..., C-1,
    C-1, ..., 0, 0, 1, ... Returns (order [N] int32: task indices grouped by core, offsets [C + 1] int32):
    core c runs order[offsets[c]:offsets[c + 1]], largest first."""
    if num_cores < 1:
        raise ValueError(f"num_cores must be >= 1, got {num_cores}")
    ranked = np.argsort(-np.asarray(loads, np.int64), kind="stable")
    k = np.arange(len(ranked))
    lap, pos = np.divmod(k, num_cores)
    core = np.where(lap % 2 == 0, pos, num_cores - 1 - pos)
    by_core = np.argsort(core, kind="stable")
    offsets = np.searchsorted(core[by_core], np.arange(num_cores + 1))
    return ranked[by_core].astype(np.int32), offsets.astype(np.int32)


def choose_pipeline(groups, num_cores: int, group: int, *, alpha: float = ALPHA,
                    cache_bytes: int = CACHE_BYTES) -> int:
    """§5.2: 2-stage when every real task is a 1-row decode tile; else 3-stage when cache_bytes > alpha x the
    sum over cores of the largest score tile (rows x KV length) each core holds under ``deal``; else 4-stage."""
    if all(tile == 1 or int(num) == 0 for _, num, tile in groups):
        return PIPELINE_2STAGE
    held = 0
    for tasks, num, _ in groups:
        loads = task_loads(tasks, num, group)
        order, offsets = deal(loads, num_cores)
        held += sum(int(loads[order[a:b]].max()) for a, b in zip(offsets[:-1], offsets[1:]) if b > a)
    return PIPELINE_3STAGE if cache_bytes > alpha * held else PIPELINE_4STAGE


def attention_tiling(tasks, num_tasks, *, tile: int, num_cores: int, pipeline: int, num_tokens: int,
                     num_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                     block_tables: np.ndarray, max_tree: int, scale: float,
                     score_cols: int | None = None) -> AttentionTiling:
    """The launch's tiling for one group (shapes as ``attention_operands`` lays the operands out). ``score_cols``:
    the 3-stage workspace width, a static setting >= every task's KV range in whole blocks (a kernel is compiled
    per width; default: exactly the longest task's)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    pad = num_tokens + tile
    live = _live(tasks, num_tasks)
    blocks = -(-live[:, Field.KV_END] // block_size) - live[:, Field.KV_START] // block_size
    needed = block_size * max(int(blocks.max(initial=1)), 1)
    if pipeline != PIPELINE_3STAGE:
        score_cols = block_size
    elif score_cols is None:
        score_cols = needed
    elif score_cols < needed or score_cols % block_size:
        raise ValueError(f"score_cols={score_cols} must be a multiple of {block_size} and >= {needed}, "
                         "the longest task's KV range in whole blocks")
    return AttentionTiling(
        num_tasks=int(num_tasks), num_cores=num_cores, pipeline=pipeline, rows=tile * group, group=group,
        head_dim=head_dim, block_size=block_size, max_pages=block_tables.shape[1], num_kv_heads=num_kv_heads,
        q_pad_rows=pad, tree_cols=max_tree + 2 * block_size, q_rows=num_kv_heads * pad * group,
        kv_rows=num_blocks * num_kv_heads * block_size, num_tables=block_tables.size,
        num_slots=np.asarray(tasks).shape[0], tree_rows=pad * group, score_cols=score_cols, scale=scale)


def attention_operands(q, k, v, block_tables, tasks, tree_mask, tiling: AttentionTiling) -> list[np.ndarray]:
    """The kernel's array operands (its docstring has the layouts), from q [T, H, D], one layer's k/v
    [NB, KVH, P, D] (float16), block tables [S, P'] and the group's tasks [W, F]; tree_mask [T, MT] or None."""
    t = tiling
    num_tokens = q.shape[0]
    qp = np.zeros((t.num_kv_heads, t.q_pad_rows, t.group, t.head_dim), np.float16)
    qp[:, :num_tokens] = np.asarray(q, np.float16).reshape(num_tokens, t.num_kv_heads, t.group,
                                                           t.head_dim).transpose(1, 0, 2, 3)
    tree = np.zeros((t.q_pad_rows, t.tree_cols), np.int32)
    if tree_mask is not None:
        mt = tree_mask.shape[1]
        tree[:num_tokens, t.block_size:t.block_size + mt] = np.asarray(tree_mask) != 0
    cols = np.tile(np.arange(t.block_size, dtype=np.int32), (t.rows, 1))
    rtok = cols - (np.arange(t.rows, dtype=np.int32) // t.group)[:, None]
    order, offsets = deal(task_loads(tasks, t.num_tasks, t.group), t.num_cores)
    order = np.pad(order, (0, t.num_slots - len(order)))
    return [qp.reshape(-1, t.head_dim), np.asarray(k, np.float16).reshape(-1, t.head_dim),
            np.asarray(v, np.float16).reshape(-1, t.head_dim), np.asarray(block_tables, np.int32).reshape(-1),
            np.asarray(tasks, np.int32).reshape(-1), order, offsets, cols, rtok,
            np.repeat(tree, t.group, axis=0)]


def workspaces(t: AttentionTiling) -> list[np.ndarray]:
    """The kernel's per-core GM workspaces (S, P, PV; the cube-vector hand-off), zeroed."""
    rows = t.num_cores * t.rows
    return [np.zeros((rows, t.score_cols), np.float32), np.zeros((rows, t.score_cols), np.float16),
            np.zeros((rows, t.head_dim), np.float32)]


def kernel_stages(pipeline: int) -> int:
    """The kernel form that runs a pipeline choice: 3 or 4 (a 2-stage choice runs the 4-stage form)."""
    return PIPELINE_3STAGE if pipeline == PIPELINE_3STAGE else PIPELINE_4STAGE


def scalar_arguments(t: AttentionTiling) -> list:
    """The kernel's runtime scalars, then its ConstExpr values, in its parameter order."""
    return [t.q_rows, t.kv_rows, t.num_tables, t.num_slots, t.tree_rows, t.max_pages, t.num_kv_heads, t.q_pad_rows,
            t.scale, t.rows, t.group, t.head_dim, t.block_size, t.tree_cols, kernel_stages(t.pipeline), t.score_cols]


def partial_parts(tasks, num_tasks, out, lse, tiling: AttentionTiling, num_tokens: int):
    """The kernel's per-slot outputs (out [W * R, D], lse [W * R]) as ``merge_partials`` parts: (token [W, R],
    head [W, R], partial [W, R, D], lse [W, R]); rows past a task's q_len and non-task slots get token T."""
    t = tiling
    w = np.asarray(tasks).shape[0]
    r = np.arange(t.rows)
    tok_in_tile, g = np.divmod(r, t.group)
    tasks = np.asarray(tasks)
    live = (np.arange(w) < int(num_tasks))[:, None] & (tok_in_tile[None] < tasks[:, Field.Q_LEN, None])
    token = np.where(live, tasks[:, Field.Q_START, None] + tok_in_tile[None], num_tokens)
    head = tasks[:, Field.KV_HEAD, None] * t.group + g[None]
    return token, head, out.reshape(w, t.rows, t.head_dim), np.where(live, lse.reshape(w, t.rows), -np.inf)
