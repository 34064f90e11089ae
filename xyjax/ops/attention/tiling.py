"""Task decomposition and reordering (host, numpy): a step's sequences -> attention task tables.

Decomposition. Each sequence's query rows this step are cut into tiles; each tile x KV head is one task
row of the tile contract (``xyjax.ops.attention.contract.Field`` columns). Tasks go in two groups, each with its own static
tile size, so no stage is padded to another's shape: ``decode`` (1-token tiles: decodes and 1-token
chunks, the specialised path) and ``chunk`` (tiles of ``tile`` tokens: prefill chunks, cached-prefix
chunks and verify runs). The G query heads of a KV head are packed as the tile's rows, so a task reads
its KV once.

KV splits (XY-Serve Eq. 1 in spirit). A task's cost is its query rows x KV length. With ``lanes`` workers
the step cannot finish before ``max(total / lanes, largest task)``; a task costing more than a lane's
fair share ``total / lanes`` is a straggler, so it is split along KV into ``ceil(cost / share)`` pieces
(at most ``max_splits``, each at least ``min_split_kv`` positions, block aligned) whose partial results
the backend merges by log-sum-exp. Everything else stays unsplit (a split costs a merge).

Order. The tables list tasks in sequence order; the order tasks run in belongs to the backend that runs them
(the C++ kernel deals them out largest cost first to its threads; the Pallas grid runs one task per program).
"""

from __future__ import annotations

import numpy as np

from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.attention import AttentionMetadata, TaskTable


def capacities(num_tokens: int, num_seqs: int, num_kv_heads: int, tile: int, lanes: int = 1,
               max_splits: int = 1) -> tuple[int, int]:
    """Task-table rows (decode group, chunk group) that always suffice for a step of at most ``num_tokens``
    tokens in at most ``num_seqs`` sequences. A chunk sequence has >= 2 rows and wastes at most one
    partial tile, so chunk tiles <= num_tokens // tile + min(num_seqs, num_tokens // 2). Only a tile costing
    more than total / lanes is split, so fewer than ``lanes`` are, each into at most ``max_splits``."""
    extra = (lanes - 1) * (max_splits - 1)
    decode = min(num_seqs, num_tokens) + extra
    chunk = num_tokens // tile + min(num_seqs, num_tokens // 2) + extra
    return decode * num_kv_heads, max(chunk, 1) * num_kv_heads


def _tiles(q_start, q_len, kv_len, seqs, size):
    """(seq, q_start, q_len, q_pos, kv_end) of every tile of ``size`` tokens of sequences ``seqs``."""
    rows = []
    for s in seqs:
        history = kv_len[s] - q_len[s]
        for off in range(0, q_len[s], size):
            n = min(size, q_len[s] - off)
            rows.append((s, q_start[s] + off, n, history + off, history + off + n))
    return np.asarray(rows, np.int64).reshape(-1, 5)


def _split(tiles, share: float, *, block_size: int, max_splits: int, min_split_kv: int):
    """Rows (seq, q_start, q_len, q_pos, kv_start, kv_end, split, num_splits) with stragglers split."""
    out = []
    for seq, start, n, pos, end in tiles:
        pieces = 1
        if max_splits > 1 and n * end > share:
            pieces = int(min(max_splits, np.ceil(n * end / share), end // min_split_kv))
        pieces = max(pieces, 1)
        step = -(-end // pieces)
        step = -(-step // block_size) * block_size                    # block-aligned boundaries
        bounds = [b for b in range(0, end, step)] + [end]
        for i in range(len(bounds) - 1):
            out.append((seq, start, n, pos, bounds[i], bounds[i + 1], i, len(bounds) - 1))
    return np.asarray(out, np.int64).reshape(-1, 8)


def build_tasks(q_start, q_len, kv_len, *, num_kv_heads: int, tile: int, capacity: tuple[int, int],
                lanes: int = 1, block_size: int = 16, max_splits: int = 1, min_split_kv: int = 256,
                tree: np.ndarray | None = None):
    """Task tables for sequences s with ``q_len[s] > 0`` rows at flat rows ``q_start[s]:`` whose KV after
    this step is ``kv_len[s]`` (causal with offset, or TREE where ``tree[s]``: the sequence's rows are tree
    tokens whose first KV position, kv_len - q_len, is the mask base). Returns (decode_tasks [Wd, F],
    num_decode, chunk_tasks [Wc, F], num_chunk), int32, padding rows zero, tasks in sequence order."""
    tree = np.zeros(len(q_len), bool) if tree is None else np.asarray(tree, bool)
    parts = [_tiles(q_start, q_len, kv_len, np.flatnonzero(q_len == 1), 1),
             _tiles(q_start, q_len, kv_len, np.flatnonzero(q_len > 1), tile)]
    total = sum(float((t[:, 2] * t[:, 4]).sum()) for t in parts) * num_kv_heads
    share = total / max(lanes, 1) / num_kv_heads          # per task row (one KV head)
    groups = []
    for name, tiles, cap in zip(("decode", "chunk"), parts, capacity):
        rows = _split(tiles, share, block_size=block_size, max_splits=max_splits, min_split_kv=min_split_kv)
        rows = np.repeat(rows, num_kv_heads, axis=0)
        heads = np.tile(np.arange(num_kv_heads), len(rows) // num_kv_heads)
        num = len(rows)
        if num > cap:
            raise ValueError(f"{num} {name} attention tasks exceed the capacity {cap}")
        table = np.zeros((cap, NUM_FIELDS), np.int32)
        cols = [Field.SEQ, Field.Q_START, Field.Q_LEN, Field.Q_POS, Field.KV_START, Field.KV_END, Field.SPLIT,
                Field.NUM_SPLITS]
        table[:num, cols] = rows
        table[:num, Field.KV_HEAD] = heads
        seqs = table[:num, Field.SEQ]
        table[:num, Field.MASK_KIND] = np.where(tree[seqs], MaskKind.TREE, MaskKind.CAUSAL)
        table[:num, Field.MASK_BASE] = np.where(tree[seqs], (kv_len - q_len)[seqs], 0)
        groups += [table, num]
    return tuple(groups)


def tree_mask_rows(parents: list[int]) -> np.ndarray:
    """Ancestor matrix [n, n] uint8 of a token tree in topological order (``parents[j] < j``, -1 = root):
    row j marks j and its ancestors, the tree tokens row j may attend to."""
    mask = np.zeros((len(parents), len(parents)), np.uint8)
    for j, parent in enumerate(parents):
        if parent >= j:
            raise ValueError(f"tree node {j} has parent {parent}; parents must come first")
        if parent >= 0:
            mask[j] = mask[parent]
        mask[j, j] = 1
    return mask


def attention_metadata(q_start, q_len, kv_len, block_tables, *, num_kv_heads: int, tile: int = 16,
                       num_tokens: int | None = None, lanes: int = 1, block_size: int = 16, max_splits: int = 1,
                       min_split_kv: int = 256, trees: dict[int, list[int]] | None = None,
                       max_tree: int = 0) -> AttentionMetadata:
    """AttentionMetadata for per-sequence arrays [S] (the planner's entry; handy in tests).
    ``num_tokens``: the token bucket the capacities are derived from (default: sum of q_len).
    ``trees``: {sequence: parents} for sequences whose rows this step are a token tree (speculative tree
    verify, ``len(parents) == q_len``); they get TREE tasks and rows of ``tree_mask`` [num_tokens, max_tree]."""
    q_start, q_len, kv_len = (np.asarray(a, np.int64) for a in (q_start, q_len, kv_len))
    num_tokens = int(q_len.sum()) if num_tokens is None else num_tokens
    cap = capacities(num_tokens, len(q_len), num_kv_heads, tile, lanes, max_splits)
    trees = trees or {}
    tree = np.zeros(len(q_len), bool)
    mask = np.zeros((num_tokens, max_tree), np.uint8) if trees or max_tree else None
    for s, parents in trees.items():
        if len(parents) != q_len[s] or len(parents) > max_tree:
            raise ValueError(f"tree of sequence {s} has {len(parents)} nodes for {q_len[s]} rows (max_tree {max_tree})")
        tree[s] = True
        mask[q_start[s]:q_start[s] + q_len[s], :q_len[s]] = tree_mask_rows(parents)
    dec, nd, chunk, nc = build_tasks(q_start, q_len, kv_len, num_kv_heads=num_kv_heads, tile=tile, capacity=cap,
                                     lanes=lanes, block_size=block_size, max_splits=max_splits,
                                     min_split_kv=min_split_kv, tree=tree)
    return AttentionMetadata(block_tables=np.asarray(block_tables, np.int32),
                             groups=(TaskTable(dec, np.int32(nd), 1), TaskTable(chunk, np.int32(nc), tile)),
                             tree_mask=mask)
