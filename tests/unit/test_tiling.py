"""Task decomposition, KV splits and reordering (host only)."""

import collections

import numpy as np
from hypothesis import given, settings, strategies as st

from xyjax.ops.attention.contract import Field
from xyjax.ops.attention import tiling


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 3000)), min_size=1, max_size=12),
       lanes=st.integers(1, 4), max_splits=st.integers(1, 4), tile=st.sampled_from([4, 16]),
       block=st.sampled_from([16, 32]), kv_heads=st.sampled_from([1, 3]))
def test_tasks_cover_every_row_once_and_splits_partition_kv(seqs, lanes, max_splits, tile, block, kv_heads):
    q_len = np.array([q for q, _ in seqs])
    kv_len = np.array([q + h for q, h in seqs])
    q_start = np.concatenate([[0], np.cumsum(q_len)[:-1]])
    T = int(q_len.sum())
    cap = tiling.capacities(T, len(seqs), kv_heads, tile, lanes, max_splits)
    dec, nd, chunk, nc = tiling.build_tasks(q_start, q_len, kv_len, num_kv_heads=kv_heads, tile=tile, capacity=cap,
                                            lanes=lanes, block_size=block, max_splits=max_splits, min_split_kv=64)
    assert nd <= cap[0] and nc <= cap[1]
    assert not dec[nd:].any() and not chunk[nc:].any()
    tasks = np.concatenate([dec[:nd], chunk[:nc]])
    assert (dec[:nd, Field.Q_LEN] == 1).all() and (chunk[:nc, Field.Q_LEN] <= tile).all()
    covered = collections.Counter()
    splits = collections.defaultdict(list)
    for t in tasks:
        s = t[Field.SEQ]
        history = kv_len[s] - q_len[s]
        assert t[Field.Q_POS] == history + t[Field.Q_START] - q_start[s]
        for r in range(t[Field.Q_START], t[Field.Q_START] + t[Field.Q_LEN]):
            covered[r, t[Field.KV_HEAD]] += t[Field.SPLIT] == 0
        splits[t[Field.Q_START], t[Field.KV_HEAD]].append(t)
    assert covered == collections.Counter({(r, h): 1 for r in range(T) for h in range(kv_heads)})
    for parts in splits.values():
        parts.sort(key=lambda t: t[Field.SPLIT])
        n = len(parts)
        assert [t[Field.SPLIT] for t in parts] == list(range(n)) and all(t[Field.NUM_SPLITS] == n for t in parts)
        assert parts[0][Field.KV_START] == 0 and parts[-1][Field.KV_END] == parts[0][Field.Q_POS] + parts[0][Field.Q_LEN]
        for a, b in zip(parts, parts[1:]):
            assert a[Field.KV_END] == b[Field.KV_START] and a[Field.KV_END] % block == 0
        assert n <= max_splits
    if max_splits == 1 or lanes == 1:
        assert (tasks[:, Field.NUM_SPLITS] == 1).all()


def test_a_lone_long_decode_is_split_to_feed_every_lane():
    """One decode over 4000 positions and a short one: on 2 lanes the long one alone exceeds a lane's share."""
    q_len, kv_len = np.array([1, 1]), np.array([4000, 100])
    meta = tiling.attention_metadata([0, 1], q_len, kv_len, np.zeros((2, 250)), num_kv_heads=1, lanes=2, max_splits=4,
                                     min_split_kv=256)
    dec = meta.groups[0].tasks[:int(meta.groups[0].num_tasks)]
    assert sorted(dec[:, Field.NUM_SPLITS].tolist()) == [1, 2, 2]
    unsplit = tiling.attention_metadata([0, 1], q_len, kv_len, np.zeros((2, 250)), num_kv_heads=1, lanes=2)
    assert int(unsplit.groups[0].num_tasks) == 2


def test_tree_rows_get_tree_tasks_and_ancestor_masks():
    parents = [-1, 0, 0, 1, 3]                      # root, two children, a grandchild, a great-grandchild
    mask = tiling.tree_mask_rows(parents)
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    meta = tiling.attention_metadata([0, 2], [2, 5], [30, 45], np.zeros((2, 4)), num_kv_heads=1, tile=4,
                                     trees={1: parents}, max_tree=8)
    chunk = meta.groups[1].tasks[:int(meta.groups[1].num_tasks)]
    tree = chunk[chunk[:, Field.SEQ] == 1]
    assert (tree[:, Field.MASK_KIND] == 1).all() and (tree[:, Field.MASK_BASE] == 40).all()
    assert (chunk[chunk[:, Field.SEQ] == 0][:, Field.MASK_KIND] == 0).all()
    assert meta.tree_mask.shape == (7, 8) and (meta.tree_mask[2:7, :5] == mask).all() and not meta.tree_mask[:2].any()
    with np.testing.assert_raises(ValueError):
        tiling.tree_mask_rows([-1, 2, 0])
