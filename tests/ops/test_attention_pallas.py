"""The Pallas Meta-Attention kernel (xyjax/ops/attention_pallas.py, interpret mode on CPU) against float64
references and the xla backend: ragged hybrid batches (prefill, chunked prefill with history, decode), GQA,
head dims, block sizes, long histories, padding, empty tables, layers under lax.scan, KV splits, tree
masks, bfloat16, contract errors, and lowering to Triton IR for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abstract_gpu import abstract_cuda_device
from hypothesis import given, settings, strategies as st
from helpers import paged_batch, reference_attention, task_meta

from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import TaskTable, meta_attention
from xyjax.ops.attention.pallas import attend_pallas, meta_attention_pallas
from xyjax.ops.attention.tiling import attention_metadata

TOL = dict(rtol=2e-5, atol=2e-5)
pallas = jax.jit(meta_attention_pallas, static_argnames=("lowering",))
xla = jax.jit(meta_attention, static_argnames="backend")
attend = jax.jit(attend_pallas, static_argnames=("tile", "interpret", "return_lse", "block_kv"))


def live_tasks(group: TaskTable) -> np.ndarray:
    """The group's table with rows >= num_tasks turned into padding (Q_LEN 0)."""
    t = np.array(group.tasks)
    t[int(group.num_tasks):, Field.Q_LEN] = 0
    return t


def make_case(rng, q_lens, histories, *, heads=4, kv_heads=2, dim=16, block_size=4, T=64, S=8, pages=16,
              num_blocks=96, tile=4, layers=2, **tiling):
    """Random cache with each sequence's KV in shuffled blocks, at fixed (bucket) shapes; returns q, the cache,
    the AttentionMetadata of xyjax.ops.attention.tiling and the float64 expected output of every layer [L, T, H, D]."""
    kv_lens = [n + h for n, h in zip(q_lens, histories)]
    q, k, v, q_start, q_len, kv_len, tables = paged_batch(
        rng, q_lens, kv_lens, layers=layers, heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size, T=T,
        S=S, pages=pages, num_blocks=num_blocks)
    meta = attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=kv_heads, tile=tile, num_tokens=T,
                              **tiling)
    kv = KVCache(k=jnp.asarray(k), v=jnp.asarray(v))
    expected = np.stack([reference_attention(q, kv, layer, meta) for layer in range(layers)])
    return jnp.asarray(q), kv, meta, expected


def uncovered_rows(meta, num_tokens):
    covered = np.zeros(num_tokens, bool)
    for g in meta.groups:
        for t in live_tasks(g):
            covered[t[Field.Q_START]:t[Field.Q_START] + t[Field.Q_LEN]] = True
    return ~covered


# prefill (history 0), chunked prefill with history (several blocks), decodes with short and long histories
MIXED = ([9, 7, 1, 1, 4, 1], [0, 23, 37, 0, 5, 60])


@pytest.mark.parametrize("heads,kv_heads,dim,block_size,tile", [
    (4, 4, 16, 4, 4),      # MHA (group 1), head dim 16, block size 4
    (6, 2, 64, 16, 16),    # GQA group 3, head dim 64, block size 16
    (6, 2, 16, 4, 8),      # GQA group 3, block size 4
    (8, 1, 128, 32, 4),    # GQA group 8, head dim 128, block size 32
])
def test_mixed_batch_matches_references(heads, kv_heads, dim, block_size, tile):
    rng = np.random.default_rng(heads + dim + block_size)
    q, kv, meta, expected = make_case(rng, *MIXED, heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size,
                                      tile=tile)
    out = np.asarray(pallas(q, kv, 1, meta, lowering="interpret"))
    np.testing.assert_allclose(out, expected[1], **TOL)
    np.testing.assert_allclose(out, np.asarray(xla(q, kv, 1, meta)), **TOL)
    assert not out[uncovered_rows(meta, q.shape[0])].any(), "rows no task covers must be exactly zero"


def test_lead_wiring_and_num_tasks_argument():
    """The documented backend="pallas" wiring: per group, rows >= num_tasks zeroed, outputs summed; the same
    with ``num_tasks=`` instead of zeroing; and several KV chunks per task (block_kv=8, history 60)."""
    rng = np.random.default_rng(7)
    q, kv, meta, expected = make_case(rng, *MIXED, heads=6, kv_heads=2)
    scale = 16 ** -0.5

    @jax.jit
    def wired(q, kv, layer, meta):
        out = jnp.zeros(q.shape, jnp.float32)
        for g in meta.groups:
            live = jnp.arange(g.tasks.shape[0]) < g.num_tasks
            tasks = jnp.asarray(g.tasks).at[:, Field.Q_LEN].set(jnp.where(live, g.tasks[:, Field.Q_LEN], 0))
            out = out + attend_pallas(q, kv.k, kv.v, layer, meta.block_tables, tasks, scale, tile=g.tile,
                                      interpret=jax.default_backend() == "cpu")
        return out

    np.testing.assert_allclose(np.asarray(wired(q, kv, 1, meta)), expected[1], **TOL)

    @jax.jit
    def counted(q, kv, layer, meta):
        return sum(attend_pallas(q, kv.k, kv.v, layer, meta.block_tables, g.tasks, scale, tile=g.tile,
                                 interpret=True, num_tasks=g.num_tasks, block_kv=8) for g in meta.groups)

    np.testing.assert_allclose(np.asarray(counted(q, kv, 0, meta)), expected[0], **TOL)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 40)), min_size=1, max_size=5), st.integers(0, 2**31))
def test_random_ragged_batches(seqs, seed):
    rng = np.random.default_rng(seed)
    q, kv, meta, expected = make_case(rng, [s[0] for s in seqs], [s[1] for s in seqs])
    out = np.asarray(pallas(q, kv, 1, meta, lowering="interpret"))
    np.testing.assert_allclose(out, expected[1], **TOL)       # expected zeros on padding rows


def test_decode_only_gqa3_long_histories():
    rng = np.random.default_rng(3)
    q, kv, meta, expected = make_case(rng, [1] * 6, [0, 3, 17, 40, 61, 63], heads=9, kv_heads=3, tile=4,
                                      num_blocks=128)
    assert int(meta.groups[1].num_tasks) == 0              # decode group only: the chunk table is all padding
    out = np.asarray(pallas(q, kv, 1, meta, lowering="interpret"))
    np.testing.assert_allclose(out, expected[1], **TOL)
    assert not out[6:].any()


def test_tables_without_real_tasks_give_zeros():
    rng = np.random.default_rng(4)
    q, kv, meta, _ = make_case(rng, [5, 1], [3, 9])
    scale = 0.25
    for g in meta.groups:
        # every row real-looking, but num_tasks = 0: nothing may be read
        out = attend(q, kv.k, kv.v, 1, meta.block_tables, g.tasks, scale, tile=g.tile, interpret=True,
                     num_tasks=0)
        assert not np.asarray(out).any()
        zeroed = np.array(g.tasks)
        zeroed[:, Field.Q_LEN] = 0
        out = attend(q, kv.k, kv.v, 1, meta.block_tables, zeroed, scale, tile=g.tile, interpret=True)
        assert not np.asarray(out).any()
    empty = np.zeros((0, NUM_FIELDS), np.int32)
    out, lse = attend_pallas(q, kv.k, kv.v, 0, meta.block_tables, empty, scale, tile=1, interpret=True,
                             return_lse=True)
    assert out.shape == q.shape and not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()
    # a whole step of padding (both groups empty) through the wiring
    meta0 = attention_metadata(np.zeros(8, np.int32), np.zeros(8, np.int32), np.zeros(8, np.int32),
                               meta.block_tables, num_kv_heads=2, tile=4, num_tokens=64)
    assert not np.asarray(pallas(q, kv, 1, meta0, lowering="interpret")).any()


def test_layers_under_scan_with_traced_layer():
    rng = np.random.default_rng(5)
    q, kv, meta, expected = make_case(rng, [6, 1, 3], [10, 30, 0])

    @jax.jit
    def run(q, kv, meta):
        def layer_step(carry, layer):
            return carry, meta_attention_pallas(q, kv, layer, meta, lowering="interpret")
        return jax.lax.scan(layer_step, 0, jnp.arange(2, dtype=jnp.int32))[1]

    outs = np.asarray(run(q, kv, meta))
    np.testing.assert_allclose(outs, expected, **TOL)
    assert np.abs(outs[0] - outs[1]).max() > 0.1          # the layers really differ


def split_table(tasks, cuts_of):
    """Each real task's [kv_start, kv_end) cut at ``cuts_of(kv_end)`` (unaligned) into NUM_SPLITS tasks."""
    rows = []
    for t in tasks:
        if t[Field.Q_LEN] == 0:
            continue
        bounds = [t[Field.KV_START], *cuts_of(int(t[Field.KV_END])), t[Field.KV_END]]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            s = t.copy()
            s[Field.KV_START], s[Field.KV_END], s[Field.SPLIT], s[Field.NUM_SPLITS] = a, b, i, len(bounds) - 1
            rows.append(s)
    table = np.zeros((len(rows) + 5, NUM_FIELDS), np.int32)      # plus padding rows
    table[:len(rows)] = rows
    return table


def test_kv_splits_merge_by_log_sum_exp():
    """Splits at unaligned cuts, including ranges some rows see nothing of (lse -inf there), merge to the
    unsplit result; the merged lse matches the unsplit one."""
    rng = np.random.default_rng(6)
    q, kv, meta, expected = make_case(rng, [9, 4, 1, 1], [0, 21, 30, 2], tile=4)
    scale = 16 ** -0.5
    run = attend
    for g in meta.groups:
        tasks = live_tasks(g)
        whole, lse_whole = run(q, kv.k, kv.v, 1, meta.block_tables, tasks, scale, tile=g.tile, interpret=True,
                               return_lse=True, block_kv=8)
        split = split_table(tasks, lambda end: sorted({max(1, end // 3), max(1, (2 * end) // 3 + 1)} - {end}))
        parts, lse_parts = run(q, kv.k, kv.v, 1, meta.block_tables, split, scale, tile=g.tile, interpret=True,
                               return_lse=True, block_kv=8)
        ref = reference_attention(q, kv, 1, task_meta(meta.block_tables, split), scale)
        np.testing.assert_allclose(np.asarray(parts), ref, **TOL)
        np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), **TOL)
        np.testing.assert_allclose(np.asarray(lse_parts), np.asarray(lse_whole), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref, reference_attention(q, kv, 1, task_meta(meta.block_tables, tasks), scale), **TOL)
    # one split alone, a range the first rows of its tile see nothing of: zeros and lse -inf there
    chunks = live_tasks(meta.groups[1])
    prefill = chunks[(chunks[:, Field.SEQ] == 0) & (chunks[:, Field.Q_POS] == 0)][:1]   # rows 0..3 of the prefill
    assert prefill[0, Field.Q_POS] == 0 and prefill[0, Field.Q_LEN] == 4
    prefill[0, Field.KV_START], prefill[0, Field.SPLIT], prefill[0, Field.NUM_SPLITS] = 3, 1, 2
    out, lse = run(q, kv.k, kv.v, 1, meta.block_tables, prefill, scale, tile=4, interpret=True, return_lse=True,
                   block_kv=8)
    out, lse = np.asarray(out), np.asarray(lse)
    heads = slice(prefill[0, Field.KV_HEAD] * 2, prefill[0, Field.KV_HEAD] * 2 + 2)
    assert not out[:3].any() and np.isneginf(lse[:3]).all()
    page, offset = divmod(3, kv.block_size)
    value = np.asarray(kv.v[1, meta.block_tables[0, page], prefill[0, Field.KV_HEAD], offset])
    np.testing.assert_allclose(out[3, heads], np.broadcast_to(value, (2, 16)), **TOL)
    assert np.isfinite(lse[3, heads]).all()


def tree_case(rng, *, heads=6, kv_heads=2, dim=16, block_size=4, T=32, tile=8, tree=7, history=13, width=16):
    """One sequence: ``history`` cached positions then ``tree`` draft tokens (positions history..) verified with
    a random topological tree mask [T, width]; plus a causal chunk of another sequence in the same table."""
    q, kv, meta, _ = make_case(rng, [tree, 5], [history, 11], heads=heads, kv_heads=kv_heads, dim=dim,
                               block_size=block_size, T=T, tile=tile)
    mask = np.zeros((T, width), np.uint8)
    for i in range(tree):
        mask[i, i] = 1
        if i:
            parent = rng.integers(0, i)
            mask[i, :i] = mask[parent, :i]
            mask[i, parent] = 1
    tasks = live_tasks(meta.groups[1])
    first = tasks[:, Field.SEQ] == 0
    tasks[first, Field.MASK_KIND] = MaskKind.TREE
    tasks[first, Field.MASK_BASE] = history
    return q, kv, meta, tasks, mask


def test_tree_masks_and_split_tree_tasks():
    rng = np.random.default_rng(8)
    q, kv, meta, tasks, mask = tree_case(rng)
    scale = 16 ** -0.5
    run = attend
    out = np.asarray(run(q, kv.k, kv.v, 1, meta.block_tables, tasks, scale, tile=8, interpret=True,
                         tree_mask=mask, block_kv=8))
    expected = reference_attention(q, kv, 1, task_meta(meta.block_tables, tasks, tree_mask=mask), scale)
    np.testing.assert_allclose(out, expected, **TOL)
    # the tree rows differ from plain causal ones (the mask matters)
    causal = reference_attention(q, kv, 1, task_meta(meta.block_tables, live_tasks(meta.groups[1])), scale)
    assert np.abs(causal[:7] - expected[:7]).max() > 1e-3
    # split the tree tasks inside the tree, and the causal ones anywhere
    split = split_table(tasks, lambda end: [end - 4])
    out = np.asarray(run(q, kv.k, kv.v, 1, meta.block_tables, split, scale, tile=8, interpret=True,
                         tree_mask=mask, block_kv=8))
    np.testing.assert_allclose(out, expected, **TOL)


def test_planner_splits_and_trees_end_to_end():
    """Tables as xyjax.ops.attention.tiling builds them with straggler KV splits (lanes, max_splits) and a speculative token
    tree (trees=, meta.tree_mask), through the meta_attention wiring."""
    rng = np.random.default_rng(12)
    parents = [-1, 0, 0, 1, 2, 1]
    q, kv, meta, expected = make_case(rng, [9, 1, 6, 1], [40, 60, 23, 5], heads=6, kv_heads=2, tile=4,
                                      lanes=4, max_splits=3, min_split_kv=8, block_size=4,
                                      trees={2: parents}, max_tree=8)
    real = np.concatenate([live_tasks(g) for g in meta.groups])
    assert (real[:, Field.NUM_SPLITS] > 1).any() and (real[:, Field.MASK_KIND] == MaskKind.TREE).any()
    out = np.asarray(pallas(q, kv, 1, meta, lowering="interpret"))
    np.testing.assert_allclose(out, expected[1], **TOL)
    np.testing.assert_allclose(out, np.asarray(xla(q, kv, 1, meta)), **TOL)
    assert not out[17:].any()


def test_tree_tasks_need_the_mask():
    rng = np.random.default_rng(9)
    q, kv, meta, tasks, _ = tree_case(rng)
    with pytest.raises(ValueError, match="tree_mask"):
        attend_pallas(q, kv.k, kv.v, 1, meta.block_tables, tasks, 0.25, tile=8, interpret=True)
    # a traced table cannot be checked: the tree rows come out NaN, the causal rows stay right
    out = np.asarray(attend(q, kv.k, kv.v, 1, meta.block_tables, tasks, 0.25, tile=8, interpret=True))
    assert np.isnan(out[:7]).all() and np.isfinite(out[7:]).all()


def test_bfloat16_against_xla_backend():
    rng = np.random.default_rng(10)
    q, kv, meta, expected = make_case(rng, *MIXED, heads=6, kv_heads=2, dim=64, block_size=16, tile=16)
    qb = q.astype(jnp.bfloat16)
    kvb = KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))
    out = np.asarray(pallas(qb, kvb, 1, meta, lowering="interpret"))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(xla(qb, kvb, 1, meta)).astype(np.float32), rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(out, expected[1], rtol=5e-2, atol=5e-2)


def test_contract_errors():
    rng = np.random.default_rng(11)
    q, kv, meta, _ = make_case(rng, [6, 1], [3, 4], tile=4)
    tasks = live_tasks(meta.groups[1])
    bt = meta.block_tables
    with pytest.raises(ValueError, match="head_dim"):
        attend_pallas(q[:, :, :8], kv.k, kv.v, 0, bt, tasks, 1.0, tile=4, interpret=True)
    with pytest.raises(ValueError, match="multiple"):
        attend_pallas(q[:, :3], kv.k, kv.v, 0, bt, tasks, 1.0, tile=4, interpret=True)
    with pytest.raises(ValueError, match=r"\[W, 11\]"):
        attend_pallas(q, kv.k, kv.v, 0, bt, tasks[:, :9], 1.0, tile=4, interpret=True)
    with pytest.raises(ValueError, match="tile"):
        attend_pallas(q, kv.k, kv.v, 0, bt, tasks, 1.0, tile=2, interpret=True)   # a task has 4 rows
    k24 = jnp.zeros(kv.k.shape[:-1] + (24,))
    with pytest.raises(ValueError, match="power-of-two"):
        attend_pallas(jnp.zeros(q.shape[:2] + (24,)), k24, k24, 0, bt, tasks, 1.0, tile=4, interpret=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_cuda(dtype):
    """Lowering (not compiling or running) for CUDA from this CPU host: the kernel goes through the Pallas
    Triton lowering into one Triton custom call. PTX compilation and execution need a GPU."""
    T, H, Hkv, D, L, NB, BS, S, P, W, MT = 64, 6, 2, 64, 2, 64, 16, 8, 8, 24, 16
    shapes = [((T, H, D), dtype), ((L, NB, Hkv, BS, D), dtype), ((L, NB, Hkv, BS, D), dtype), ((), jnp.int32),
              ((S, P), jnp.int32), ((W, NUM_FIELDS), jnp.int32), ((T, MT), jnp.uint8)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]

    def fn(q, k, v, layer, tables, tasks, mask):
        return attend_pallas(q, k, v, layer, tables, tasks, 0.125, tile=16, interpret=False, tree_mask=mask)

    try:
        with abstract_cuda_device():
            exported = jax.export.export(
                jax.jit(fn), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    except (ImportError, NotImplementedError) as e:     # a jaxlib without the Triton dialect
        pytest.skip(f"no Triton lowering here: {e}")
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 1
