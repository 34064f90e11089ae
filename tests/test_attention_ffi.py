"""The ffi backend of meta_attention (C++ CPU kernel, jax.ffi custom call) against the xla backend and
float64 references: ragged hybrid batches, GQA, long histories, padding, layers under lax.scan, errors."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ascend_ffi import NUM_FIELDS, Field, MaskKind
from test_ops import ragged_case
from xyjax.kv_cache import KVCache
from xyjax.ops import AttentionMetadata, TaskTable, meta_attention

attention = jax.jit(meta_attention, static_argnames="backend")
TOL = dict(rtol=2e-5, atol=2e-5)


def task_reference(q, kv, layer, meta, scale=None):
    """float64 attention straight from the task tables (rows >= num_tasks ignored): row i of a task sees
    positions [kv_start, min(kv_end, q_pos + i + 1)) of its sequence through the block table."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, kv.k, kv.v))
    tables = np.asarray(meta.block_tables)
    _, num_heads, dim = q.shape
    group, block_size = num_heads // k.shape[2], k.shape[3]
    scale = dim ** -0.5 if scale is None else scale
    out = np.zeros(q.shape)
    for g in meta.groups:
        for t in np.asarray(g.tasks)[:int(g.num_tasks)]:
            if t[Field.Q_LEN] == 0:
                continue
            pos = np.arange(t[Field.KV_START], t[Field.KV_END])
            blocks, offsets = tables[t[Field.SEQ], pos // block_size], pos % block_size
            keys, values = k[layer, blocks, t[Field.KV_HEAD], offsets], v[layer, blocks, t[Field.KV_HEAD], offsets]
            for i in range(t[Field.Q_LEN]):
                seen = pos <= t[Field.Q_POS] + i
                if not seen.any():
                    continue
                for h in range(t[Field.KV_HEAD] * group, (t[Field.KV_HEAD] + 1) * group):
                    s = keys[seen] @ q[t[Field.Q_START] + i, h] * scale
                    p = np.exp(s - s.max())
                    out[t[Field.Q_START] + i, h] = p @ values[seen] / p.sum()
    return out


def check(q, kv, meta, expected, layer=1, **tol):
    out = np.asarray(attention(q, kv, layer, meta, backend="ffi"))
    oracle = np.asarray(attention(q, kv, layer, meta))
    np.testing.assert_allclose(out, expected, **(tol or TOL))
    np.testing.assert_allclose(out, oracle, **(tol or TOL))
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


@pytest.mark.parametrize("dim", [16, 20, 64])
def test_baseline_kernel_copy(monkeypatch, dim):
    """The portable (SSE2) copy of the kernel, which CPUs without AVX2/FMA run, computes the same."""
    monkeypatch.setenv("XYJAX_ATTENTION_KERNEL", "generic")
    rng = np.random.default_rng(dim + 1)
    q, kv, meta, expected = ragged_case(rng, [1, 9, 1], [40, 3, 0], dim=dim, block_size=8, T=16, pages=8, tile=4)
    check(q, kv, meta, expected)


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
    expected = task_reference(q, kv, 1, meta, scale=0.3)
    np.testing.assert_allclose(out, expected, **TOL)
    assert not out[6, :2].any() and out[6, 2:].any()


def test_bfloat16_q_and_cache():
    rng = np.random.default_rng(4)
    q, kv, meta, _ = ragged_case(rng, [5, 1, 9], [4, 30, 0])
    for q_, kv_ in [(q.astype(jnp.bfloat16), kv),
                    (q, KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))),
                    (q.astype(jnp.bfloat16), KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16)))]:
        out = attention(q_, kv_, 1, meta, backend="ffi")
        assert out.dtype == q_.dtype
        expected = task_reference(np.asarray(q_.astype(jnp.float32)),
                                  KVCache(k=kv_.k.astype(jnp.float32), v=kv_.v.astype(jnp.float32)), 1, meta)
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, rtol=2e-2, atol=2e-2)


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
        expected = task_reference(np.asarray(q) * (layer + 1), kv_ffi, layer, meta)
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
    (dict(MASK_KIND=MaskKind.TREE), 1, "only CAUSAL"),
    (dict(NUM_SPLITS=2), 1, "splits are not implemented"),
    (dict(SPLIT=1, NUM_SPLITS=2), 1, "splits are not implemented"),
    (dict(KV_HEAD=2), 1, "kv_head outside"),
    (dict(Q_START=63), 1, "query rows outside"),
    (dict(KV_END=40, Q_POS=38), 1, "beyond the block table"),
    ({}, 2, "layer 2 outside"),
])
def test_unsupported_or_invalid_tasks_fail_loudly(fields, layer, message):
    q, kv, meta = _one_task(**fields)
    with pytest.raises(Exception, match=message):
        np.asarray(attention(q, kv, layer, meta, backend="ffi"))


def test_block_table_entry_outside_the_cache_fails():
    q, kv, meta = _one_task()
    tables = np.array(meta.block_tables)
    tables[0, 1] = kv.num_blocks
    with pytest.raises(Exception, match="block table entry"):
        np.asarray(attention(q, kv, 1, AttentionMetadata(tables, meta.groups), backend="ffi"))


def test_eager_call_with_host_metadata():
    """Outside jit, with the metadata as numpy arrays (as xyjax.tiling builds it)."""
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
