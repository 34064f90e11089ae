"""The device planner (jnp) builds the host planner's attention tables and a step's inputs for traced lengths."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

from xyjax.ops import device_planner
from xyjax.ops.attention import device_tiling, tiling


def assert_same_metadata(device, host):
    np.testing.assert_array_equal(device.block_tables, host.block_tables)
    for d, h in zip(device.groups, host.groups, strict=True):
        assert d.tile == h.tile
        assert int(d.num_tasks) == int(h.num_tasks)
        np.testing.assert_array_equal(np.asarray(d.tasks), h.tasks)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_device_tables_equal_the_host_planners_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    seqs, tile, kv_heads = int(rng.integers(1, 9)), int(rng.choice([4, 16])), int(rng.integers(1, 4))
    q_len = rng.choice([0, 1, 1, 2, 5, 17, 40], seqs).astype(np.int32)
    kv_len = (q_len + rng.integers(0, 30, seqs)).astype(np.int32)
    q_start = (np.cumsum(q_len) - q_len).astype(np.int32)
    num_tokens = int(q_len.sum()) + int(rng.integers(0, 8))
    tables = rng.integers(0, 100, (seqs, 5)).astype(np.int32)
    host = tiling.attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=kv_heads, tile=tile,
                                     num_tokens=num_tokens, lanes=4, max_splits=1)
    plan = jax.jit(device_tiling.attention_metadata,
                   static_argnames=("num_kv_heads", "tile", "num_tokens", "max_q_len"))
    device = plan(q_start, q_len, kv_len, tables, num_kv_heads=kv_heads, tile=tile, num_tokens=num_tokens,
                  max_q_len=40)
    assert_same_metadata(device, host)


def test_prefill_and_decode_inputs_pack_tokens_like_the_host_planner():
    ids = jnp.asarray([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]], jnp.int32)
    lens = np.array([3, 1, 4], np.int32)
    kw = dict(pages=2, block_size=4, num_kv_heads=2, tile=2)
    step = device_planner.prefill_inputs(ids, jnp.asarray(lens), **kw)
    np.testing.assert_array_equal(step.token_ids[:8], [5, 6, 7, 8, 9, 10, 11, 12])
    np.testing.assert_array_equal(step.positions[:8], [0, 1, 2, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(step.slot_mapping, [0, 1, 2, 8, 16, 17, 18, 19] + [-1] * 4)
    np.testing.assert_array_equal(step.sample_index, [2, 3, 7])
    assert int(step.num_tokens) == 8
    tables = np.arange(6).reshape(3, 2)
    host = tiling.attention_metadata([0, 3, 4], lens, lens, tables, num_kv_heads=2, tile=2, num_tokens=12)
    assert_same_metadata(step.attention, host)

    seq_lens, active = jnp.asarray([3, 1, 7], jnp.int32), jnp.asarray([True, False, True])
    step = device_planner.decode_inputs(jnp.asarray([4, 5, 6], jnp.int32), seq_lens, active, **kw)
    np.testing.assert_array_equal(step.token_ids, [4, 6, 0])
    np.testing.assert_array_equal(step.positions, [3, 7, 0])
    np.testing.assert_array_equal(step.slot_mapping, [3, 23, -1])
    np.testing.assert_array_equal(step.sample_index, [0, 0, 1])
    host = tiling.attention_metadata([0, 1, 1], [1, 0, 1], [4, 1, 8], tables, num_kv_heads=2, tile=2, num_tokens=3)
    assert_same_metadata(step.attention, host)


class DecodeInputsVariantsTest(chex.TestCase):
    """decode_inputs under jax.jit and eagerly, on random batches, against the packing rule and the host planner."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, 1, 2)
    def test_decode_inputs_on_random_batches(self, seed):
        rng = np.random.default_rng(seed)
        seqs, pages, block = int(rng.integers(1, 7)), int(rng.integers(1, 4)), int(rng.choice([2, 4]))
        tokens = rng.integers(1, 100, seqs).astype(np.int32)
        seq_lens = rng.integers(0, pages * block, seqs).astype(np.int32)
        active = rng.random(seqs) < 0.6
        plan = self.variant(functools.partial(device_planner.decode_inputs, pages=pages, block_size=block,
                                              num_kv_heads=2, tile=2))
        step = plan(jnp.asarray(tokens), jnp.asarray(seq_lens), jnp.asarray(active))
        live = np.flatnonzero(active)
        pad = seqs - len(live)
        np.testing.assert_array_equal(step.token_ids, np.r_[tokens[live], np.zeros(pad)])
        np.testing.assert_array_equal(step.positions, np.r_[seq_lens[live], np.zeros(pad)])
        np.testing.assert_array_equal(step.slot_mapping, np.r_[live * pages * block + seq_lens[live], -np.ones(pad)])
        rank = np.cumsum(active) - active
        np.testing.assert_array_equal(step.sample_index, np.where(active, rank, 0))
        assert int(step.num_tokens) == len(live)
        host = tiling.attention_metadata(rank, active.astype(np.int32), seq_lens + active,
                                         np.arange(seqs * pages).reshape(seqs, pages), num_kv_heads=2, tile=2,
                                         num_tokens=seqs)
        assert_same_metadata(step.attention, host)
