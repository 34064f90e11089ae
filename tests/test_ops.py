"""xla backends of meta_attention / smooth_gemm and the KV write, against float64 numpy references.

Also the shared builders of attention cases (imported by test_attention_ffi.py): ``ragged_case`` (tables from
xyjax.ops.attention.tiling), ``contract_case`` (tables built here: KV splits, TREE masks, shuffled task order) and the float64
``task_reference`` straight from the tile contract."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import AttentionMetadata, TaskTable, meta_attention, smooth_gemm
from xyjax.ops.attention.tiling import attention_metadata

attention = jax.jit(meta_attention, static_argnames="backend")


def reference_attention(q, k_seq, v_seq, q_len, kv_len):
    """float64 causal-with-offset attention of one sequence. q [n, H, D], k/v [kv_len, Hkv, D]."""
    n, heads, dim = q.shape
    group = heads // k_seq.shape[1]
    k = np.repeat(k_seq, group, axis=1).astype(np.float64)
    v = np.repeat(v_seq, group, axis=1).astype(np.float64)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), k) / np.sqrt(dim)
    pos = kv_len - q_len + np.arange(n)
    s = np.where(np.arange(kv_len)[None, None] <= pos[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v)


def paged_batch(rng, q_lens, kv_lens, *, layers, heads, kv_heads, dim, block_size, T, S, pages, num_blocks):
    """Random q [T, H, D] and paged k/v [layers, NB, Hkv, BS, D] with each sequence's KV in shuffled blocks, at
    fixed (bucket) shapes; per-sequence q_start, q_len, kv_len [S] and block tables [S, pages] (numpy)."""
    assert sum(q_lens) <= T and len(q_lens) <= S and max(kv_lens) <= pages * block_size
    assert sum(-(-n // block_size) for n in kv_lens) <= num_blocks
    order = rng.permutation(num_blocks)
    k = rng.standard_normal((layers, num_blocks, kv_heads, block_size, dim)).astype(np.float32)
    v = rng.standard_normal((layers, num_blocks, kv_heads, block_size, dim)).astype(np.float32)
    q = rng.standard_normal((T, heads, dim)).astype(np.float32)
    tables = np.zeros((S, pages), np.int32)
    q_start, q_len, kv_len = (np.zeros(S, np.int32) for _ in range(3))
    row, used = 0, 0
    for i, (n, total) in enumerate(zip(q_lens, kv_lens)):
        nb = -(-total // block_size)
        tables[i, :nb] = order[used:used + nb]
        used += nb
        q_start[i], q_len[i], kv_len[i] = row, n, total
        row += n
    return q, k, v, q_start, q_len, kv_len, tables


def ragged_case(rng, q_lens, histories, heads=4, kv_heads=2, dim=16, block_size=4, T=64, S=8, pages=8, num_blocks=64,
                tile=4):
    """Random cache with each sequence's KV in shuffled blocks, padded to fixed (bucket) shapes so one
    compiled program serves every case; returns the op inputs and the float64 reference of layer 1."""
    kv_lens = [q + h for q, h in zip(q_lens, histories)]
    q, k, v, q_start, q_len, kv_len, tables = paged_batch(
        rng, q_lens, kv_lens, layers=2, heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size, T=T, S=S,
        pages=pages, num_blocks=num_blocks)
    expected = np.zeros((T, heads, dim))
    for i, (n, total) in enumerate(zip(q_lens, kv_lens)):
        nb = -(-total // block_size)
        ks = k[1, tables[i, :nb]].transpose(0, 2, 1, 3).reshape(-1, kv_heads, dim)[:total]
        vs = v[1, tables[i, :nb]].transpose(0, 2, 1, 3).reshape(-1, kv_heads, dim)[:total]
        expected[q_start[i]:q_start[i] + n] = reference_attention(q[q_start[i]:q_start[i] + n], ks, vs, n, total)
    meta = attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=kv_heads, tile=tile, num_tokens=T)
    return jnp.asarray(q), KVCache(k=jnp.asarray(k), v=jnp.asarray(v)), meta, expected


def task_reference(q, kv, layer, meta, scale=None):
    """float64 attention straight from the tile contract (rows >= num_tasks ignored): the positions a (row,
    head) sees are the union over its tasks (its KV splits) of the positions in [kv_start, kv_end) its mask
    shows it; softmax over that union, zeros where it is empty."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, kv.k, kv.v))
    tables = np.asarray(meta.block_tables)
    tree = None if meta.tree_mask is None else np.asarray(meta.tree_mask)
    _, num_heads, dim = q.shape
    group, block_size = num_heads // k.shape[2], k.shape[3]
    scale = dim ** -0.5 if scale is None else scale
    seen = {}   # (row, kv_head) -> (seq, set of positions)
    for g in meta.groups:
        for t in np.asarray(g.tasks)[:int(g.num_tasks)]:
            for i in range(t[Field.Q_LEN]):
                row, pos = t[Field.Q_START] + i, np.arange(t[Field.KV_START], t[Field.KV_END])
                if t[Field.MASK_KIND] == MaskKind.CAUSAL:
                    pos = pos[pos <= t[Field.Q_POS] + i]
                else:
                    col, width = pos - t[Field.MASK_BASE], 0 if tree is None else tree.shape[1]
                    bit = (col >= 0) & (col < width) & (tree[row, np.clip(col, 0, max(width - 1, 0))] != 0
                                                        if width else False)
                    pos = pos[(col < 0) | bit]
                seen.setdefault((row, t[Field.KV_HEAD]), (t[Field.SEQ], set()))[1].update(pos.tolist())
    out = np.zeros(q.shape)
    for (row, head), (seq, positions) in seen.items():
        if not positions:
            continue
        pos = np.array(sorted(positions))
        blocks, offsets = tables[seq, pos // block_size], pos % block_size
        keys, values = k[layer, blocks, head, offsets], v[layer, blocks, head, offsets]
        for h in range(head * group, (head + 1) * group):
            s = keys @ q[row, h] * scale
            p = np.exp(s - s.max())
            out[row, h] = p @ values / p.sum()
    return out


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static shapes of a family of cases (one compiled program each)."""

    heads: int = 4
    kv_heads: int = 2
    dim: int = 16
    block_size: int = 16
    T: int = 64
    S: int = 6
    pages: int = 24
    num_blocks: int = 128
    tile: int = 8
    tree_cols: int = 8            # MT, the tree mask's columns
    capacity: tuple = (48, 96)    # task-table rows of the decode (tile 1) and chunk groups


def random_tree(rng, n):
    """[n, n] bool: row j marks node j and its ancestors in a random tree over nodes in topological order."""
    mask = np.eye(n, dtype=bool)
    for j in range(1, n):
        mask[j] |= mask[rng.integers(0, j)]
    return mask


def contract_case(rng, seqs, shapes: Shapes = Shapes(), *, with_mask=True):
    """A batch built straight in the tile contract. ``seqs``: (q_len, history, num_splits, tree) per sequence;
    tree False: CAUSAL rows (1-row tiles for a decode, ``tile`` rows otherwise); tree True: q_len tree tokens
    verified over the history (TREE tasks, a random tree, KV range [0, history + q_len) so only the mask
    decides). Each tile x KV head is cut into up to num_splits KV splits at random block boundaries; the task
    order is shuffled within each group. Returns q, kv, meta and the float64 dense reference (each sequence's
    rows against its whole KV under the same per-row mask)."""
    sh = shapes
    k = rng.standard_normal((2, sh.num_blocks, sh.kv_heads, sh.block_size, sh.dim)).astype(np.float32)
    v = rng.standard_normal((2, sh.num_blocks, sh.kv_heads, sh.block_size, sh.dim)).astype(np.float32)
    q = rng.standard_normal((sh.T, sh.heads, sh.dim)).astype(np.float32)
    tables = np.zeros((sh.S, sh.pages), np.int32)
    tree_mask = np.zeros((sh.T, sh.tree_cols), np.uint8)
    order = rng.permutation(sh.num_blocks)
    groups, expected = ([], []), np.zeros((sh.T, sh.heads, sh.dim))
    row = used = 0
    group = sh.heads // sh.kv_heads
    for seq, (n, history, num_splits, tree) in enumerate(seqs):
        total = history + n
        nb = -(-total // sh.block_size)
        assert row + n <= sh.T and seq < sh.S and nb <= sh.pages and (not tree or n <= sh.tree_cols)
        tables[seq, :nb] = order[used:used + nb]
        used += nb
        visible = np.arange(total)[None] <= history + np.arange(n)[:, None]        # [n, total], causal
        if tree:
            bits = random_tree(rng, n)
            tree_mask[row:row + n, :n] = bits
            visible[:, history:] = bits
        ks = k[1, tables[seq, :nb]].transpose(0, 2, 1, 3).reshape(-1, sh.kv_heads, sh.dim)[:total].astype(np.float64)
        vs = v[1, tables[seq, :nb]].transpose(0, 2, 1, 3).reshape(-1, sh.kv_heads, sh.dim)[:total].astype(np.float64)
        for h in range(sh.heads):
            s = q[row:row + n, h].astype(np.float64) @ ks[:, h // group].T / np.sqrt(sh.dim)
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            expected[row:row + n, h] = p / p.sum(-1, keepdims=True) @ vs[:, h // group]
        size = 1 if n == 1 else sh.tile
        for off in range(0, n, size):
            m = min(size, n - off)
            kv_end = total if tree else history + off + m
            cuts = np.arange(sh.block_size, kv_end, sh.block_size)
            cuts = np.sort(rng.choice(cuts, min(num_splits - 1, len(cuts)), replace=False))
            bounds = [0, *cuts.tolist(), kv_end]
            for head in range(sh.kv_heads):
                for split in range(len(bounds) - 1):
                    groups[size > 1].append(
                        (seq, row + off, m, history + off, bounds[split], bounds[split + 1], head,
                         MaskKind.TREE if tree else MaskKind.CAUSAL, history if tree else 0, split, len(bounds) - 1))
        row += n
    tables_out = []
    for rows, cap, tile in zip(groups, sh.capacity, (1, sh.tile)):
        assert len(rows) <= cap, (len(rows), cap)
        table = np.zeros((cap, NUM_FIELDS), np.int32)
        if rows:
            table[:len(rows)] = np.asarray(rows, np.int32)[rng.permutation(len(rows))]
        tables_out.append(TaskTable(table, np.int32(len(rows)), tile))
    meta = AttentionMetadata(block_tables=tables, groups=tuple(tables_out),
                             tree_mask=tree_mask if with_mask else None)
    return jnp.asarray(q), KVCache(k=jnp.asarray(k), v=jnp.asarray(v)), meta, expected


# Families of contract cases: GQA groups 1, 3, 8; head dims 64, 128; block sizes 16, 32.
SHAPES = {
    "g1-d64-b16": Shapes(heads=2, kv_heads=2, dim=64, block_size=16),
    "g3-d128-b32": Shapes(heads=6, kv_heads=2, dim=128, block_size=32, pages=12, num_blocks=64),
    "g8-d64-b32": Shapes(heads=8, kv_heads=1, dim=64, block_size=32, pages=12, num_blocks=64),
    "g3-d64-b16": Shapes(heads=3, kv_heads=1, dim=64, block_size=16, tile=4),
}
SPLIT_TOL = dict(rtol=2e-5, atol=2e-5)

# One sequence: (q_len, history, num_splits, tree). Decodes with long histories split too.
contract_seq = st.one_of(
    st.tuples(st.just(1), st.integers(0, 330), st.integers(1, 4), st.just(False)),        # decode
    st.tuples(st.integers(2, 20), st.integers(0, 160), st.integers(1, 4), st.just(False)),  # chunk
    st.tuples(st.integers(1, 8), st.integers(0, 200), st.integers(1, 4), st.just(True)))    # tree verify


@pytest.mark.parametrize("family", list(SHAPES))
@settings(max_examples=6, deadline=None)
@given(seqs=st.lists(contract_seq, min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_kv_splits_and_tree_masks_match_reference(family, seqs, seed):
    """Ragged mixes of unsplit and 2-4-way KV split tasks (prefill chunks, decodes, tree verify runs), task
    order shuffled: the log-sum-exp merge gives the float64 dense masked attention."""
    q, kv, meta, expected = contract_case(np.random.default_rng(seed), seqs, SHAPES[family])
    out = np.asarray(attention(q, kv, 1, meta))
    np.testing.assert_allclose(out, expected, **SPLIT_TOL)
    assert not out[sum(s[0] for s in seqs):].any(), "padding rows must be exactly zero"


def test_tree_verify_over_history_split_across_kv():
    """A 7-token tree verified over 45 positions of history, over 2 query tiles, unsplit and split in 3 at
    block boundaries 16 and 48 (the second inside the tree tokens 45..51: rows see nothing there or part)."""
    rng = np.random.default_rng(11)
    sh = Shapes(heads=4, kv_heads=2, dim=32, block_size=16, tile=4)
    q, kv, meta, expected = contract_case(rng, [(7, 45, 1, True), (1, 60, 1, False)], sh)
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, meta)), expected, **SPLIT_TOL)
    tasks = np.asarray(meta.groups[1].tasks)[:int(meta.groups[1].num_tasks)]
    split = []
    for t in tasks:   # [0, 52) -> [0, 16), [16, 48), [48, 52)
        for s, (lo, hi) in enumerate([(0, 16), (16, 48), (48, 52)]):
            split.append(np.concatenate([t[:Field.KV_START], [lo, hi], t[Field.KV_HEAD:Field.SPLIT], [s, 3]]))
    table = np.zeros((sh.capacity[1], NUM_FIELDS), np.int32)
    table[:len(split)] = split
    meta = dataclasses.replace(meta, groups=(meta.groups[0], TaskTable(table, np.int32(len(split)), sh.tile)))
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, meta)), expected, **SPLIT_TOL)
    np.testing.assert_allclose(task_reference(q, kv, 1, meta), expected, rtol=1e-12, atol=1e-12)


def hand_case(rows, *, tree_mask=None, tile=8, seed=3):
    """A small cache (4 heads over 2 KV heads, head_dim 16, block size 4) and one group of hand-written
    tasks: ``rows`` of (seq, q_start, q_len, q_pos, kv_start, kv_end, kv_head[, mask_kind, mask_base, split,
    num_splits])."""
    rng = np.random.default_rng(seed)
    q, kv, meta, _ = ragged_case(rng, [6, 2], [20, 3], heads=4, kv_heads=2, dim=16, block_size=4)
    tasks = np.zeros((len(rows) + 2, NUM_FIELDS), np.int32)
    for i, r in enumerate(rows):
        tasks[i, :len(r)] = r
        if len(r) < NUM_FIELDS:
            tasks[i, Field.NUM_SPLITS] = 1
    group = TaskTable(tasks, np.int32(len(rows)), tile)
    return q, kv, AttentionMetadata(block_tables=meta.block_tables, groups=(group,), tree_mask=tree_mask)


# seq 0: 6 rows at flat rows 0..5 over history 20; seq 1: 2 rows at 6..7 over history 3.
HAND_ROWS = [
    (0, 0, 6, 20, 5, 23, 0),                      # kv_start inside a block; kv_end below the last rows' bound
    (0, 0, 6, 20, 0, 12, 1, 0, 0, 0, 3),          # KV head 1 in 3 splits at 12 and 24 (block size 4)
    (0, 0, 6, 20, 12, 24, 1, 0, 0, 1, 3),
    (0, 0, 6, 20, 24, 26, 1, 0, 0, 2, 3),
    (1, 6, 2, 3, 4, 5, 0),                        # row 6 (position 3) sees nothing: zeros
    (1, 6, 2, 3, 4, 8, 1, 0, 0, 0, 2),            # split with nothing for row 6 in either split
    (1, 6, 2, 3, 8, 12, 1, 0, 0, 1, 2),
]


def test_kv_window_inside_blocks_splits_and_empty_rows():
    """The contract beyond what tiling emits: kv_start inside a block, kv_end below the causal bound, a row
    that sees nothing (zeros, also when all its KV splits are empty), scale given."""
    q, kv, meta = hand_case(HAND_ROWS)
    out = np.asarray(jax.jit(lambda q, kv, m: meta_attention(q, kv, 1, m, scale=0.3))(q, kv, meta))
    np.testing.assert_allclose(out, task_reference(q, kv, 1, meta, scale=0.3), **SPLIT_TOL)
    assert not out[6].any() and out[7].all() and out[:6].all() and not out[8:].any()


def test_splits_of_one_tile_in_different_groups_merge():
    q, kv, meta = hand_case(HAND_ROWS)
    tasks = np.asarray(meta.groups[0].tasks)
    moved = TaskTable(tasks[[3, 6]], np.int32(2), 8)
    kept = TaskTable(np.delete(tasks, [3, 6], axis=0), np.int32(len(HAND_ROWS) - 2), 8)
    split_meta = dataclasses.replace(meta, groups=(kept, moved))
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, split_meta)), task_reference(q, kv, 1, meta), **SPLIT_TOL)


def empty_tree_case():
    """Three TREE rows over a 20-token history: rows 0 and 1 see tree tokens, row 2 none; head 0 unsplit, head 1
    split at the history's end (so row 2 sees nothing in either split of head 1). Returns (q, kv, meta, mask)."""
    mask = np.zeros((64, 4), np.uint8)
    mask[0, 0] = mask[1, :2] = 1
    rows = [(0, 0, 3, 20, 0, 23, 0, MaskKind.TREE, 20, 0, 1),
            (0, 0, 3, 20, 0, 20, 1, MaskKind.TREE, 0, 0, 2), (0, 0, 3, 20, 20, 24, 1, MaskKind.TREE, 0, 1, 2)]
    return (*hand_case(rows, tree_mask=mask), mask)


def test_tree_rows_with_an_empty_mask_and_no_history_are_zero():
    """TREE rows whose tree mask is clear and that have no history see nothing: zeros, unsplit or split."""
    q, kv, meta, _ = empty_tree_case()
    out = np.asarray(attention(q, kv, 1, meta))
    np.testing.assert_allclose(out, task_reference(q, kv, 1, meta), **SPLIT_TOL)
    assert out[:2].all() and out[2, :2].all() and not out[2, 2:].any()


def test_tree_tasks_without_a_mask_see_only_the_history_in_xla():
    """The xla backend reads a missing tree mask as all columns clear (the ffi backend rejects it)."""
    rows = [(0, 0, 3, 20, 0, 23, h, MaskKind.TREE, 20, 0, 1) for h in range(2)]
    q, kv, meta = hand_case(rows)
    out = np.asarray(attention(q, kv, 1, meta))
    causal = hand_case([(0, 0, 3, 20, 0, 20, h) for h in range(2)])[2]
    np.testing.assert_allclose(out, task_reference(q, kv, 1, causal), **SPLIT_TOL)


def test_tree_mask_shape_and_dtype_are_checked():
    q, kv, meta = hand_case(HAND_ROWS[:1])
    with pytest.raises(AssertionError):
        meta_attention(q, kv, 1, dataclasses.replace(meta, tree_mask=np.zeros((63, 4), np.uint8)))
    with pytest.raises(TypeError, match="uint8"):
        meta_attention(q, kv, 1, dataclasses.replace(meta, tree_mask=np.zeros((64, 4), np.float32)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 20)), min_size=1, max_size=5), st.integers(0, 2**31))
def test_meta_attention_matches_reference(seqs, seed):
    """Prefill (history 0), chunked prefill / cached prefix (history > 0) and decode (q_len 1) mixed."""
    rng = np.random.default_rng(seed)
    q, kv, meta, expected = ragged_case(rng, [s[0] for s in seqs], [s[1] for s in seqs])
    out = np.asarray(attention(q, kv, 1, meta))
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)   # padding rows: expected zeros


def test_meta_attention_decode_only_and_gqa_groups():
    rng = np.random.default_rng(0)
    q, kv, meta, expected = ragged_case(rng, [1, 1, 1], [0, 7, 30], heads=6, kv_heads=3)
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, meta)), expected, rtol=2e-5, atol=2e-5)


def test_meta_attention_many_tasks_and_long_histories():
    """More tasks than one work block and KV longer than one online-softmax chunk."""
    rng = np.random.default_rng(1)
    q_lens = [1] * 40 + [37, 5]
    histories = list(rng.integers(0, 300, 40)) + [250, 0]
    q, kv, meta, expected = ragged_case(rng, q_lens, histories, block_size=16, T=128, S=48, pages=20,
                                        num_blocks=900, tile=16)
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, meta)), expected, rtol=2e-5, atol=2e-5)


def test_meta_attention_checks_contract():
    rng = np.random.default_rng(0)
    q, kv, meta, _ = ragged_case(rng, [2], [1])
    with pytest.raises(ValueError, match="backend"):
        meta_attention(q, kv, 0, meta, backend="nope")
    with pytest.raises(AssertionError):
        meta_attention(q[:, :, :8], kv, 0, meta)     # head_dim disagrees with the cache


@pytest.mark.parametrize("T,K,N", [(16, 8, 5), (33, 17, 12), (64, 64, 64)])
def test_smooth_gemm_real_rows_and_zero_padding(T, K, N):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    full = x.astype(np.float64) @ w.astype(np.float64)
    for m in sorted({0, 1, T // 3, T - 1, T}):
        out = np.asarray(jax.jit(smooth_gemm)(jnp.asarray(x), jnp.asarray(w), jnp.int32(m)))
        np.testing.assert_allclose(out[:m], full[:m], rtol=1e-4, atol=1e-4)
        assert not out[m:].any(), f"padding rows must be zero (m={m})"


def test_smooth_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"x \(4, 3\) and w \(4, 3\) do not chain"):
        smooth_gemm(jnp.zeros((4, 3)), jnp.zeros((4, 3)), 2)
    with pytest.raises(ValueError, match=r"w must be \[L, K, N\]"):
        smooth_gemm(jnp.zeros((4, 3)), jnp.zeros((3, 4)), 2, layer=0)


def test_kv_write_through_slot_mapping_and_padding_writes_nothing():
    kv = KVCache.create(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=2)
    k = jnp.arange(5 * 2 * 2, dtype=jnp.float32).reshape(5, 2, 2) + 1
    slots = jnp.array([5, 0, -1, 11, -1], jnp.int32)
    out = kv.write(1, k, -k, slots)
    expected = np.zeros((2, 3, 2, 4, 2), np.float32)
    for t, s in enumerate(np.asarray(slots)):
        if s >= 0:
            expected[1, s // 4, :, s % 4] = np.asarray(k[t])
    np.testing.assert_array_equal(np.asarray(out.k), expected)
    np.testing.assert_array_equal(np.asarray(out.v), -expected)
