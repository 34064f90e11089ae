"""The ffi backend of meta_attention (C++ CPU kernel, jax.ffi custom call) against the xla backend and
float64 references: ragged hybrid batches, GQA, long histories, KV splits, tree masks, padding, layers under
lax.scan, errors."""

import dataclasses
import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (HAND_ROWS, SHAPES, SPLIT_TOL, Shapes, attention, contract_case, contract_seq, empty_tree_case,
                     hand_case, ragged_case, reference_attention)
from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import AttentionMetadata, TaskTable, meta_attention

TOL = dict(rtol=2e-5, atol=2e-5)


def check(q, kv, meta, expected, layer=1, **tol):
    out = np.asarray(attention(q, kv, layer, meta, backend="ffi"))
    oracle = np.asarray(attention(q, kv, layer, meta))
    chex.assert_trees_all_close(out, expected, **(tol or TOL))
    chex.assert_trees_all_close(out, oracle, **(tol or TOL))
    return out


def check_half(q, kv, meta):
    """The ffi kernel on bfloat16 q and/or cache against the float64 reference over the same values widened."""
    out = attention(q, kv, 1, meta, backend="ffi")
    widened = KVCache(k=kv.k.astype(jnp.float32), v=kv.v.astype(jnp.float32))
    expected = reference_attention(np.asarray(q.astype(jnp.float32)), widened, 1, meta)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, rtol=2e-2, atol=2e-2)
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 150)), min_size=1, max_size=5),
       st.sampled_from([1, 4, 16]), st.integers(0, 2**31))
def test_ffi_matches_xla_and_reference(seqs, tile, seed):
    """Prefill (history 0), chunked prefill with history (up to > 128 positions) and decodes, mixed."""
    rng = np.random.default_rng(seed)
    q_lens = [n for n, _ in seqs]
    q, kv, meta, expected = ragged_case(rng, q_lens, [h for _, h in seqs], heads=6, kv_heads=2, block_size=16,
                                        T=100, S=5, pages=12, num_blocks=64, tile=tile)
    out = check(q, kv, meta, expected)
    assert not out[sum(q_lens):].any(), "rows no task covers must be exactly zero"


@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 3, 16), (4, 4, 20), (8, 1, 64), (2, 1, 128)])
def test_decodes_gqa_groups_and_head_dims(heads, kv_heads, dim):
    """Decode-only batches over every GQA grouping (G = 2, 1 (MHA), 8 (MQA)) and head dims that take the
    specialised (64, 128), vector (16) and scalar-tail (20) paths."""
    rng = np.random.default_rng(dim)
    q, kv, meta, expected = ragged_case(rng, [1, 1, 1], [0, 7, 30], heads=heads, kv_heads=kv_heads, dim=dim)
    check(q, kv, meta, expected)


# Every kernel copy this CPU can run, capped through XYJAX_ATTENTION_KERNEL ("" = the widest).
KERNEL_COPIES = ["generic", "avx2", ""]
# Families where tasks of 4-64 query rows x heads take both the row path and the tile path (8-float
# vectors in the AVX2 copy, 16 with AVX-512), head dims that fill whole strips (64, 128) or leave a
# remainder (80), block sizes 16 and 32 (tile-path chunks span blocks).
COPY_SHAPES = [Shapes(heads=2, kv_heads=2, dim=64, block_size=16, tile=16),
               Shapes(heads=6, kv_heads=2, dim=128, block_size=32, pages=12, num_blocks=64, tile=16),
               Shapes(heads=8, kv_heads=1, dim=64, block_size=32, pages=12, num_blocks=64),
               Shapes(heads=4, kv_heads=2, dim=80, block_size=16, tile=16)]
COPY_SEQS = [(1, 300, 3, False), (20, 150, 2, False), (13, 40, 1, False), (8, 100, 2, True), (5, 0, 1, True),
             (1, 0, 1, False)]


@pytest.mark.parametrize("kernel", KERNEL_COPIES)
@pytest.mark.parametrize("shapes", COPY_SHAPES, ids=lambda s: f"g{s.heads // s.kv_heads}-d{s.dim}-b{s.block_size}")
def test_kernel_copies_on_both_paths(monkeypatch, kernel, shapes):
    """Each kernel copy (the portable SSE2 one runs on CPUs without AVX2/FMA) against the float64 reference:
    decodes with long split histories, chunks with and without splits, tree verify runs (split and not)."""
    monkeypatch.setenv("XYJAX_ATTENTION_KERNEL", kernel)
    q, kv, meta, expected = contract_case(np.random.default_rng(shapes.dim + shapes.heads), COPY_SEQS, shapes)
    out = check(q, kv, meta, expected, **SPLIT_TOL)
    assert not out[sum(s[0] for s in COPY_SEQS):].any()


@pytest.mark.parametrize("kernel", KERNEL_COPIES)
def test_kernel_copies_bfloat16(monkeypatch, kernel):
    monkeypatch.setenv("XYJAX_ATTENTION_KERNEL", kernel)
    shapes = COPY_SHAPES[1]
    q, kv, meta, _ = contract_case(np.random.default_rng(6), COPY_SEQS, shapes)
    half_q, half_kv = q.astype(jnp.bfloat16), KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))
    assert check_half(half_q, half_kv, meta).dtype == jnp.bfloat16


def test_many_tasks_and_long_histories():
    rng = np.random.default_rng(1)
    q_lens = [1] * 40 + [37, 5]
    histories = list(rng.integers(0, 300, 40)) + [250, 0]
    q, kv, meta, expected = ragged_case(rng, q_lens, histories, block_size=16, T=128, S=48, pages=20,
                                        num_blocks=900, tile=16)
    check(q, kv, meta, expected)


def test_rows_past_num_tasks_are_padding():
    """Garbage rows at index >= num_tasks (here: copies of real tasks at other rows) must not be read."""
    rng = np.random.default_rng(2)
    q, kv, meta, expected = ragged_case(rng, [3, 1], [5, 9])
    groups = []
    for g in meta.groups:
        tasks, n = np.array(g.tasks), int(g.num_tasks)
        if n:
            junk = tasks[:n].copy()
            junk[:, Field.Q_START] += 40          # rows 40.. are padding in the real batch
            tasks[n:n + len(junk)] = junk[:len(tasks) - n]
        groups.append(TaskTable(tasks, g.num_tasks, g.tile))
    meta = AttentionMetadata(block_tables=meta.block_tables, groups=tuple(groups))
    out = check(q, kv, meta, expected)
    assert not out[4:].any()


def test_kv_window_inside_blocks_matches_task_reference():
    """The contract beyond what tiling emits: kv_start inside a block, kv_end below the causal bound
    (rows past it see only [kv_start, kv_end)), a row that sees nothing (zeros), scale given."""
    rng = np.random.default_rng(3)
    q, kv, meta, _ = ragged_case(rng, [6, 2], [20, 3], heads=4, kv_heads=2, dim=16, block_size=4)
    rows = [  # seq, q_start, q_len, q_pos, kv_start, kv_end, kv_head
        (0, 0, 6, 20, 5, 23, 0), (0, 0, 6, 20, 0, 26, 1),
        (1, 6, 2, 3, 4, 5, 0), (1, 6, 2, 3, 1, 5, 1)]    # row 0 of the third task sees nothing
    tasks = np.zeros((6, NUM_FIELDS), np.int32)
    tasks[:4, :7] = rows
    tasks[:4, Field.NUM_SPLITS] = 1
    meta = AttentionMetadata(block_tables=meta.block_tables, groups=(TaskTable(tasks, np.int32(4), 8),))
    out = np.asarray(jax.jit(functools.partial(meta_attention, scale=0.3, backend="ffi"))(q, kv, 1, meta))
    expected = reference_attention(q, kv, 1, meta, scale=0.3)
    np.testing.assert_allclose(out, expected, **TOL)
    assert not out[6, :2].any() and out[6, 2:].any()
    oracle = jax.jit(functools.partial(meta_attention, scale=0.3))(q, kv, 1, meta)
    np.testing.assert_allclose(out, np.asarray(oracle), **TOL)


@pytest.mark.parametrize("family", list(SHAPES))
@settings(max_examples=6, deadline=None)
@given(seqs=st.lists(contract_seq, min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_kv_splits_and_tree_masks(family, seqs, seed):
    """Ragged mixes of unsplit and 2-4-way KV split tasks (prefill chunks, decodes with long histories, tree
    verify runs), shuffled: ffi == xla == float64 dense masked reference; padding rows zero."""
    q, kv, meta, expected = contract_case(np.random.default_rng(seed), seqs, SHAPES[family])
    out = check(q, kv, meta, expected, **SPLIT_TOL)
    assert not out[sum(s[0] for s in seqs):].any()


def test_long_decodes_split_and_a_split_tree():
    """Decodes with histories past 1000 in 2-4 splits, a tree split across KV, a chunk."""
    sh = Shapes(heads=6, kv_heads=2, dim=64, block_size=16, pages=80, num_blocks=512, capacity=(48, 96))
    seqs = [(1, 1200, 4, False), (1, 1010, 2, False), (1, 700, 1, False), (6, 900, 3, True), (12, 300, 2, False)]
    q, kv, meta, expected = contract_case(np.random.default_rng(12), seqs, sh)
    assert (np.asarray(meta.groups[0].tasks)[:, Field.NUM_SPLITS] > 1).sum() >= 8
    check(q, kv, meta, expected, **SPLIT_TOL)


def test_tables_from_tiling_with_splits_and_a_tree():
    """What xyjax.ops.attention.tiling emits for 2 lanes with splits allowed (long decodes split, block-aligned) and a tree."""
    from xyjax.ops.attention import tiling

    rng = np.random.default_rng(13)
    q, kv, meta, _ = ragged_case(rng, [1, 1, 5, 9], [1500, 90, 40, 30], heads=6, kv_heads=2, dim=64, block_size=16,
                                 T=32, S=4, pages=100, num_blocks=200, tile=4)
    q_len, kv_len = np.array([1, 1, 5, 9]), np.array([1501, 91, 45, 39])
    meta = tiling.attention_metadata([0, 1, 2, 7], q_len, kv_len, meta.block_tables, num_kv_heads=2, tile=4,
                                     num_tokens=32, lanes=2, block_size=16, max_splits=4, min_split_kv=64,
                                     trees={2: [-1, 0, 0, 1, 1]}, max_tree=8)
    tasks = np.concatenate([np.asarray(g.tasks)[:int(g.num_tasks)] for g in meta.groups])
    assert (tasks[:, Field.NUM_SPLITS] > 1).any() and (tasks[:, Field.MASK_KIND] == MaskKind.TREE).any()
    check(q, kv, meta, reference_attention(q, kv, 1, meta), **SPLIT_TOL)


def test_hand_written_splits_windows_and_empty_rows():
    """Splits at block boundaries next to unsplit windows starting inside a block; a row that sees nothing in
    any split is zero (not NaN); splits of one tile in different groups; bfloat16 q."""
    q, kv, meta = hand_case(HAND_ROWS)
    expected = reference_attention(q, kv, 1, meta)
    out = check(q, kv, meta, expected)
    assert not out[6].any() and out[7].all() and not out[8:].any()
    tasks = np.asarray(meta.groups[0].tasks)
    moved = dataclasses.replace(meta, groups=(TaskTable(np.delete(tasks, [3, 6], axis=0), np.int32(5), 8),
                                              TaskTable(tasks[[3, 6]], np.int32(2), 8)))
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, moved, backend="ffi")), out, **TOL)
    half = np.asarray(attention(q.astype(jnp.bfloat16), kv, 1, meta, backend="ffi").astype(jnp.float32))
    np.testing.assert_allclose(half, reference_attention(np.asarray(q.astype(jnp.bfloat16).astype(jnp.float32)), kv, 1,
                                                    meta), rtol=2e-2, atol=2e-2)
    assert not half[6].any()


def test_tree_rows_with_an_empty_mask_are_zero():
    q, kv, meta, mask = empty_tree_case()
    out = check(q, kv, meta, reference_attention(q, kv, 1, meta))
    assert out[:2].all() and out[2, :2].all() and not out[2, 2:].any()
    boolean = dataclasses.replace(meta, tree_mask=mask.astype(bool))
    np.testing.assert_array_equal(np.asarray(attention(q, kv, 1, boolean, backend="ffi")), out)


def test_bfloat16_q_and_cache():
    rng = np.random.default_rng(4)
    q, kv, meta, _ = ragged_case(rng, [5, 1, 9], [4, 30, 0])
    for q_, kv_ in [(q.astype(jnp.bfloat16), kv),
                    (q, KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))),
                    (q.astype(jnp.bfloat16), KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16)))]:
        assert check_half(q_, kv_, meta).dtype == q_.dtype


def test_scan_over_layers_with_traced_layer_and_donated_cache():
    """Inside jit: a lax.scan over 2 layers (layer index traced) that writes each layer's new K/V into the
    carried cache and attends to it; the cache is donated."""
    rng = np.random.default_rng(5)
    q, kv, meta, _ = ragged_case(rng, [4, 1], [6, 11], heads=4, kv_heads=2, dim=16, block_size=4)
    tables = np.asarray(meta.block_tables)
    slots = np.full(q.shape[0], -1, np.int32)            # the batch's rows: seq 0 at 6..9, seq 1 at 11
    for row, (seq, pos) in enumerate([(0, 6), (0, 7), (0, 8), (0, 9), (1, 11)]):
        slots[row] = tables[seq, pos // 4] * 4 + pos % 4
    new_k = jnp.asarray(rng.standard_normal((2, q.shape[0], 2, 16)), jnp.float32)
    new_v = jnp.asarray(rng.standard_normal((2, q.shape[0], 2, 16)), jnp.float32)

    def forward(q, kv, meta, backend):
        def layer_step(kv, xs):
            layer, k, v = xs
            kv = kv.write(layer, k, v, jnp.asarray(slots))
            return kv, meta_attention(q * (layer + 1), kv, layer, meta, backend=backend)
        return jax.lax.scan(layer_step, kv, (jnp.arange(2, dtype=jnp.int32), new_k, new_v))

    run = jax.jit(forward, static_argnames="backend", donate_argnums=1)
    copy = lambda c: KVCache(k=jnp.array(c.k, copy=True), v=jnp.array(c.v, copy=True))
    kv_ffi, out_ffi = run(q, copy(kv), meta, "ffi")
    kv_xla, out_xla = run(q, copy(kv), meta, "xla")
    np.testing.assert_array_equal(np.asarray(kv_ffi.k), np.asarray(kv_xla.k))
    np.testing.assert_allclose(np.asarray(out_ffi), np.asarray(out_xla), **TOL)
    for layer in range(2):
        expected = reference_attention(np.asarray(q) * (layer + 1), kv_ffi, layer, meta)
        np.testing.assert_allclose(np.asarray(out_ffi[layer]), expected, **TOL)
    assert np.asarray(out_ffi[:, :5]).any() and not np.asarray(out_ffi[:, 5:]).any()


def test_no_tasks_gives_zeros():
    rng = np.random.default_rng(6)
    q, kv, meta, _ = ragged_case(rng, [2], [1])
    empty = AttentionMetadata(block_tables=meta.block_tables,
                              groups=tuple(TaskTable(g.tasks, np.int32(0), g.tile) for g in meta.groups))
    assert not np.asarray(attention(q, kv, 0, empty, backend="ffi")).any()
    assert not np.asarray(meta_attention(q, kv, 0, AttentionMetadata(meta.block_tables, ()), backend="ffi")).any()


def _one_task(**fields):
    rng = np.random.default_rng(7)
    q, kv, meta, _ = ragged_case(rng, [2], [3])
    row = dict(SEQ=0, Q_START=0, Q_LEN=2, Q_POS=3, KV_START=0, KV_END=5, KV_HEAD=0, MASK_KIND=MaskKind.CAUSAL,
               NUM_SPLITS=1) | fields
    tasks = np.zeros((2, NUM_FIELDS), np.int32)
    for name, value in row.items():
        tasks[0, Field[name]] = value
    return q, kv, AttentionMetadata(block_tables=meta.block_tables, groups=(TaskTable(tasks, np.int32(1), 2),))


@pytest.mark.parametrize("fields,layer,message", [
    (dict(MASK_KIND=MaskKind.TREE, MASK_BASE=3), 1, "TREE mask task needs a tree mask"),
    (dict(MASK_KIND=7), 1, "unknown mask kind 7"),
    (dict(NUM_SPLITS=2), 1, "KV split 1 of 2 is missing"),
    (dict(SPLIT=1, NUM_SPLITS=2), 1, "its KV split 0 is missing"),
    (dict(SPLIT=2, NUM_SPLITS=2), 1, r"split 2 outside \[0, num_splits = 2\)"),
    (dict(NUM_SPLITS=0), 1, "outside"),
    (dict(KV_HEAD=2), 1, "kv_head outside"),
    (dict(Q_START=63), 1, "query rows outside"),
    (dict(KV_END=40, Q_POS=38), 1, "beyond the block table"),
    ({}, 2, "layer 2 outside"),
])
def test_unsupported_or_invalid_tasks_fail_loudly(fields, layer, message):
    q, kv, meta = _one_task(**fields)
    with pytest.raises(Exception, match=message):
        np.asarray(attention(q, kv, layer, meta, backend="ffi"))


def _split_pair(**second):
    """Two KV splits of one tile, [0, 4) and [4, 6) (block size 4), the second with ``second`` changed."""
    q, kv, meta = _one_task(KV_END=4, NUM_SPLITS=2, Q_POS=4)
    tasks = np.array(meta.groups[0].tasks)
    tasks[1] = tasks[0]
    tasks[1, [Field.KV_START, Field.KV_END, Field.SPLIT]] = (4, 6, 1)
    for name, value in second.items():
        tasks[1, Field[name]] = value
    return q, kv, dataclasses.replace(meta, groups=(TaskTable(tasks, np.int32(2), 2),))


@pytest.mark.parametrize("second,message", [
    ({}, None),
    (dict(SPLIT=0), "KV split 1 of 2 is missing or given twice"),
    (dict(KV_START=5), "starts at 5 but split 0 ends at 4 .splits must be contiguous"),
    (dict(KV_START=3), "starts at 3 but split 0 ends at 4"),
    (dict(Q_POS=3), "disagrees with its split 0"),
    (dict(SEQ=1), "disagrees with its split 0"),
    (dict(NUM_SPLITS=3), "disagrees with its split 0"),
    (dict(KV_HEAD=1), "KV split 1 of 2 is missing"),
])
def test_bad_split_groups_fail_with_clear_errors(second, message):
    q, kv, meta = _split_pair(**second)
    if message is None:   # the valid pair, for contrast
        np.testing.assert_allclose(np.asarray(attention(q, kv, 1, meta, backend="ffi")),
                                   reference_attention(q, kv, 1, meta), **TOL)
        return
    with pytest.raises(Exception, match=message):
        np.asarray(attention(q, kv, 1, meta, backend="ffi"))


def test_split_boundary_off_the_block_grid_fails():
    q, kv, meta = _one_task(KV_END=3, NUM_SPLITS=2, Q_POS=4)
    tasks = np.array(meta.groups[0].tasks)
    tasks[1] = tasks[0]
    tasks[1, [Field.KV_START, Field.KV_END, Field.SPLIT]] = (3, 6, 1)
    meta = dataclasses.replace(meta, groups=(TaskTable(tasks, np.int32(2), 2),))
    with pytest.raises(Exception, match="starts at 3, not a multiple of block_size 4"):
        np.asarray(attention(q, kv, 1, meta, backend="ffi"))
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, meta)), reference_attention(q, kv, 1, meta), **TOL)


def test_extra_split_and_overlapping_split_group_fail():
    q, kv, meta = _split_pair()
    tasks = np.array(meta.groups[0].tasks)
    extra = np.concatenate([tasks[:2], tasks[1:2]])
    extra[2, Field.SPLIT] = 2
    with pytest.raises(Exception, match=r"split 2 outside \[0, num_splits = 2\)"):
        np.asarray(attention(q, kv, 1, dataclasses.replace(meta, groups=(TaskTable(extra, np.int32(3), 2),)),
                             backend="ffi"))
    overlap = np.concatenate([tasks[:2], tasks[:1]])
    overlap[2, [Field.Q_START, Field.Q_LEN, Field.NUM_SPLITS, Field.KV_END]] = (1, 1, 1, 5)
    with pytest.raises(Exception, match="overlaps another task's rows"):
        np.asarray(attention(q, kv, 1, dataclasses.replace(meta, groups=(TaskTable(overlap, np.int32(3), 2),)),
                             backend="ffi"))


def test_tree_task_with_a_mask_reads_its_bits():
    """The TREE task of _one_task once a mask is given: row 0 sees only history, row 1 history + tree column 1."""
    q, kv, meta = _one_task(MASK_KIND=MaskKind.TREE, MASK_BASE=3)
    mask = np.zeros((q.shape[0], 2), np.uint8)
    mask[1, 1] = 1
    meta = dataclasses.replace(meta, tree_mask=mask)
    check(q, kv, meta, reference_attention(q, kv, 1, meta))


def test_block_table_entry_outside_the_cache_fails():
    q, kv, meta = _one_task()
    tables = np.array(meta.block_tables)
    tables[0, 1] = kv.num_blocks
    with pytest.raises(Exception, match="block table entry"):
        np.asarray(attention(q, kv, 1, AttentionMetadata(tables, meta.groups), backend="ffi"))


def test_eager_call_with_host_metadata():
    """Outside jit, with the metadata as numpy arrays (as xyjax.ops.attention.tiling builds it)."""
    rng = np.random.default_rng(8)
    q, kv, meta, expected = ragged_case(rng, [3, 1], [4, 10])
    np.testing.assert_allclose(np.asarray(meta_attention(q, kv, 1, meta, backend="ffi")), expected, **TOL)


def test_dtype_and_scale_errors_are_clear():
    q, kv, meta = _one_task()
    with pytest.raises(TypeError, match="scale must be a Python float"):
        jax.jit(lambda s: meta_attention(q, kv, 1, meta, scale=s, backend="ffi"))(0.3)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        meta_attention(q.astype(jnp.float16), kv, 1, meta, backend="ffi")
    with pytest.raises(TypeError, match="KV cache dtype"):
        meta_attention(q, KVCache(k=kv.k.astype(jnp.float16), v=kv.v.astype(jnp.float16)), 1, meta, backend="ffi")


def test_thread_count_follows_the_environment():
    code = "import ascend_ffi; print(ascend_ffi.load().xyjax_attention_threads())"
    for value, expected in [("3", 3), ("1", 1), (None, os.cpu_count())]:
        env = {k: v for k, v in os.environ.items() if k != "XYJAX_ATTENTION_THREADS"}
        if value is not None:
            env["XYJAX_ATTENTION_THREADS"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(out.stdout) == expected


POOL_HANDOFF = """
import time, numpy as np, jax, jax.numpy as jnp
from xyjax.ops import smooth_gemm
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((40, 64)), jnp.float32)
w = jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)
want = np.asarray(x @ w.T)
calls = {lanes: jax.jit(lambda x, w, lanes=lanes: smooth_gemm(x, w, 40, transpose_w=True, backend="ffi",
                                                              tuning=dict(lanes=lanes, stream_rows=0, amx_rows=0)))
         for lanes in (0, 2)}
for i in range(600):
    if i % 50 == 49:
        time.sleep(0.005)   # longer than an idle worker polls: the next call must wake it
    got = np.asarray(calls[(0, 2)[i % 2]](x, w))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_pool_hands_work_to_polling_sleeping_and_idle_workers():
    """Back-to-back calls (workers still polling), calls after a pause (workers asleep) and calls on fewer
    lanes than the pool has (idle workers), on a 4-lane pool: every result is right and nothing hangs."""
    env = dict(os.environ, XYJAX_ATTENTION_THREADS="4")
    out = subprocess.run([sys.executable, "-c", POOL_HANDOFF], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
