"""Task decomposition (host, numpy): a step's sequences -> attention task tables of the tile contract.

Each sequence's query rows this step are cut into tiles; each tile x KV head is one task row
(``ascend_ffi.Field`` columns). Tasks go in two groups with their own static tile size, so no stage is
padded to another's shape: ``decode`` (1-row tiles: decodes and 1-token chunks) and ``chunk`` (tiles of
``tile`` rows: prefill chunks and verify runs). Within a group tasks are sorted by cost (rows x KV
length), largest first, so tasks of similar length share a backend's work block.
"""

from __future__ import annotations

import numpy as np

from ascend_ffi import NUM_FIELDS, Field, MaskKind
from xyjax.ops.attention import AttentionMetadata, TaskTable


def capacities(num_tokens: int, num_seqs: int, num_kv_heads: int, tile: int) -> tuple[int, int]:
    """Task-table rows (decode group, chunk group) that always suffice for a step of at most ``num_tokens``
    tokens in at most ``num_seqs`` sequences. A chunk sequence has >= 2 rows and wastes at most one
    partial tile, so chunk tiles <= num_tokens // tile + min(num_seqs, num_tokens // 2)."""
    decode = min(num_seqs, num_tokens)
    chunk = num_tokens // tile + min(num_seqs, num_tokens // 2)
    return decode * num_kv_heads, max(chunk, 1) * num_kv_heads


def build_tasks(q_start: np.ndarray, q_len: np.ndarray, kv_len: np.ndarray, *, num_kv_heads: int, tile: int,
                capacity: tuple[int, int]) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Task tables for sequences s with ``q_len[s] > 0`` rows at flat rows ``q_start[s]:`` whose KV after
    this step is ``kv_len[s]`` (causal with offset). Returns (decode_tasks [Wd, F], num_decode,
    chunk_tasks [Wc, F], num_chunk), int32, padding rows zero."""
    groups = []
    for is_decode, cap in zip((True, False), capacity):
        seqs = np.flatnonzero((q_len == 1) if is_decode else (q_len > 1))
        size = 1 if is_decode else tile
        rows = []
        for s in seqs:
            history = kv_len[s] - q_len[s]
            for off in range(0, q_len[s], size):
                n = min(size, q_len[s] - off)
                rows.append((s, q_start[s] + off, n, history + off, 0, history + off + n))
        rows.sort(key=lambda r: -r[2] * r[5])
        table = np.zeros((cap, NUM_FIELDS), np.int32)
        num = len(rows) * num_kv_heads
        if num > cap:
            raise ValueError(f"{num} {'decode' if is_decode else 'chunk'} attention tasks exceed the capacity {cap}")
        if rows:
            base = np.repeat(np.asarray(rows, np.int32), num_kv_heads, axis=0)
            cols = [Field.SEQ, Field.Q_START, Field.Q_LEN, Field.Q_POS, Field.KV_START, Field.KV_END]
            table[:num, cols] = base
            table[:num, Field.KV_HEAD] = np.tile(np.arange(num_kv_heads), len(rows))
            table[:num, Field.MASK_KIND] = MaskKind.CAUSAL
            table[:num, Field.NUM_SPLITS] = 1
        groups += [table, num]
    return tuple(groups)


def attention_metadata(q_start, q_len, kv_len, block_tables, *, num_kv_heads: int, tile: int = 16,
                       num_tokens: int | None = None) -> AttentionMetadata:
    """AttentionMetadata for per-sequence arrays [S] (convenience for tests and the planner).
    ``num_tokens``: the token bucket the capacities are derived from (default: sum of q_len)."""
    q_start, q_len, kv_len = (np.asarray(a, np.int32) for a in (q_start, q_len, kv_len))
    num_tokens = int(q_len.sum()) if num_tokens is None else num_tokens
    cap = capacities(num_tokens, len(q_len), num_kv_heads, tile)
    dec, nd, chunk, nc = build_tasks(q_start, q_len, kv_len, num_kv_heads=num_kv_heads, tile=tile, capacity=cap)
    return AttentionMetadata(block_tables=np.asarray(block_tables, np.int32),
                             groups=(TaskTable(dec, np.int32(nd), 1), TaskTable(chunk, np.int32(nc), tile)))
