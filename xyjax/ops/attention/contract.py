"""The tile contract's Python mirror: one attention task per row of an ``int32[W, NUM_FIELDS]`` table, read by
every attention backend. Its definition, with the exact meaning of each field and mask kind, is the C header
``ascend_ffi/include/xyjax/tile_contract.h``; ``tests/ops/test_contract.py`` checks the two agree through the
compiled library."""

from __future__ import annotations

import enum

class Field(enum.IntEnum):
    """Column of a task row (the header's XYJAX_TASK_*)."""

    SEQ = 0  # sequence slot: row of block_tables
    Q_START = 1  # first row of the tile in the flat token array
    Q_LEN = 2  # query rows in the tile, <= tile size; 0 = padding task
    Q_POS = 3  # absolute position of the tile's first query row
    KV_START = 4  # first KV position this task reads
    KV_END = 5  # one past the last KV position this task reads
    KV_HEAD = 6  # KV head (GQA group) of the task
    MASK_KIND = 7  # a MaskKind
    MASK_BASE = 8  # TREE: KV position of the tree mask's column 0; CAUSAL: 0
    SPLIT = 9  # index of this KV split
    NUM_SPLITS = 10  # KV splits merged by log-sum-exp; 1 = no split


NUM_FIELDS = len(Field)
"""XYJAX_TASK_NUM_FIELDS: the width of the task table."""


class MaskKind(enum.IntEnum):
    """Value of the MASK_KIND column (the header's XYJAX_MASK_*)."""

    CAUSAL = 0  # row i sees p <= q_pos + i: prefill, chunked/prefix prefill, decode, chain verify
    TREE = 1  # row i sees p < mask_base, or p where its per-row tree mask bit is set


NUM_MASK_KINDS = len(MaskKind)
