"""xla backends of meta_attention / smooth_gemm and the KV write, against float64 numpy references.

The attention cases (``ragged_case``: tables from xyjax.ops.attention.tiling; ``contract_case``: tables built by
hand with KV splits, TREE masks, shuffled task order) and the float64 ``reference_attention`` are in helpers.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import (HAND_ROWS, SHAPES, SPLIT_TOL, Shapes, attention, contract_case, contract_seq, empty_tree_case,
                     hand_case, ragged_case, reference_attention)
from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import TaskTable, meta_attention, smooth_gemm


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
    np.testing.assert_allclose(reference_attention(q, kv, 1, meta), expected, rtol=1e-12, atol=1e-12)


def test_kv_window_inside_blocks_splits_and_empty_rows():
    """The contract beyond what tiling emits: kv_start inside a block, kv_end below the causal bound, a row
    that sees nothing (zeros, also when all its KV splits are empty), scale given."""
    q, kv, meta = hand_case(HAND_ROWS)
    out = np.asarray(jax.jit(lambda q, kv, m: meta_attention(q, kv, 1, m, scale=0.3))(q, kv, meta))
    np.testing.assert_allclose(out, reference_attention(q, kv, 1, meta, scale=0.3), **SPLIT_TOL)
    assert not out[6].any() and out[7].all() and out[:6].all() and not out[8:].any()


def test_splits_of_one_tile_in_different_groups_merge():
    q, kv, meta = hand_case(HAND_ROWS)
    tasks = np.asarray(meta.groups[0].tasks)
    moved = TaskTable(tasks[[3, 6]], np.int32(2), 8)
    kept = TaskTable(np.delete(tasks, [3, 6], axis=0), np.int32(len(HAND_ROWS) - 2), 8)
    split_meta = dataclasses.replace(meta, groups=(kept, moved))
    np.testing.assert_allclose(np.asarray(attention(q, kv, 1, split_meta)), reference_attention(q, kv, 1, meta), **SPLIT_TOL)


def test_tree_rows_with_an_empty_mask_and_no_history_are_zero():
    """TREE rows whose tree mask is clear and that have no history see nothing: zeros, unsplit or split."""
    q, kv, meta, _ = empty_tree_case()
    out = np.asarray(attention(q, kv, 1, meta))
    np.testing.assert_allclose(out, reference_attention(q, kv, 1, meta), **SPLIT_TOL)
    assert out[:2].all() and out[2, :2].all() and not out[2, 2:].any()


def test_tree_tasks_without_a_mask_see_only_the_history_in_xla():
    """The xla backend reads a missing tree mask as all columns clear (the ffi backend rejects it)."""
    rows = [(0, 0, 3, 20, 0, 23, h, MaskKind.TREE, 20, 0, 1) for h in range(2)]
    q, kv, meta = hand_case(rows)
    out = np.asarray(attention(q, kv, 1, meta))
    causal = hand_case([(0, 0, 3, 20, 0, 20, h) for h in range(2)])[2]
    np.testing.assert_allclose(out, reference_attention(q, kv, 1, causal), **SPLIT_TOL)


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
