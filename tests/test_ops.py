"""xla backends of meta_attention / smooth_gemm and the KV write, against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from xyjax.kv_cache import KVCache
from xyjax.ops import meta_attention, smooth_gemm
from xyjax.tiling import attention_metadata

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


def ragged_case(rng, q_lens, histories, heads=4, kv_heads=2, dim=16, block_size=4, T=64, S=8, pages=8, num_blocks=64,
                tile=4):
    """Random cache with each sequence's KV in shuffled blocks, padded to fixed (bucket) shapes so one
    compiled program serves every case; returns the op inputs and the float64 reference."""
    kv_lens = [q + h for q, h in zip(q_lens, histories)]
    assert sum(q_lens) <= T and len(q_lens) <= S and max(kv_lens) <= pages * block_size
    order = rng.permutation(num_blocks)
    k = rng.standard_normal((2, num_blocks, kv_heads, block_size, dim)).astype(np.float32)
    v = rng.standard_normal((2, num_blocks, kv_heads, block_size, dim)).astype(np.float32)
    q = rng.standard_normal((T, heads, dim)).astype(np.float32)
    tables = np.zeros((S, pages), np.int32)
    q_start, q_len, kv_len = (np.zeros(S, np.int32) for _ in range(3))
    expected = np.zeros((T, heads, dim))
    row, used = 0, 0
    for i, (n, total) in enumerate(zip(q_lens, kv_lens)):
        nb = -(-total // block_size)
        tables[i, :nb] = order[used:used + nb]
        used += nb
        q_start[i], q_len[i], kv_len[i] = row, n, total
        ks = k[1, tables[i, :nb]].transpose(0, 2, 1, 3).reshape(-1, kv_heads, dim)[:total]
        vs = v[1, tables[i, :nb]].transpose(0, 2, 1, 3).reshape(-1, kv_heads, dim)[:total]
        expected[row:row + n] = reference_attention(q[row:row + n], ks, vs, n, total)
        row += n
    meta = attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=kv_heads, tile=tile, num_tokens=T)
    return jnp.asarray(q), KVCache(k=jnp.asarray(k), v=jnp.asarray(v)), meta, expected


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
    with pytest.raises(AssertionError):
        smooth_gemm(jnp.zeros((4, 3)), jnp.zeros((4, 3)), 2)


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
