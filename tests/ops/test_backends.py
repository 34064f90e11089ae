"""Every backend of both ops through one test each (chex.variants: under jax.jit and eagerly), against float64
references: Meta-Attention on a hybrid batch with KV splits and a tree, SmoothGEMM on every weight format."""

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import ascend_ffi
from helpers import SHAPES, SPLIT_TOL, contract_case
from xyjax.ops import meta_attention, smooth_gemm
from xyjax.ops.gemm.formats import pack_tiles, quantize_blocks

BACKENDS = ("xla", "ffi", "pallas")
# (q_len, history, num_splits, tree): a prefill chunk over history split 2 ways, a decode split 3 ways, a tree
SEQS = [(9, 40, 2, False), (1, 70, 3, False), (4, 20, 1, True)]


class BackendsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*BACKENDS)
    def test_meta_attention(self, backend):
        q, kv, meta, expected = contract_case(np.random.default_rng(0), SEQS, SHAPES["g3-d64-b16"])
        attend = self.variant(lambda q, kv, meta: meta_attention(q, kv, 1, meta, backend=backend))
        chex.assert_trees_all_close(np.asarray(attend(q, kv, meta)), expected, **SPLIT_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(backend=BACKENDS, fmt=("plain", "split", "tiles"))
    def test_smooth_gemm_formats(self, backend, fmt):
        """Rows < m of x @ w[layer].T for a stack of 4-bit weights held plain, split or as tiles; zeros below."""
        if fmt == "tiles" and backend == "ffi" and not ascend_ffi.load().xyjax_gemm_amx():
            self.skipTest("the ffi backend reads TileWeights on CPUs with AMX-BF16 only")
        rng = np.random.default_rng(1)
        split = quantize_blocks(rng.standard_normal((2, 48, 64)).astype(np.float32))
        w = {"plain": jnp.asarray(split.dense()), "split": split, "tiles": pack_tiles(split)}[fmt]
        x = rng.standard_normal((16, 64)).astype(np.float32)
        gemm = self.variant(lambda x, w, m: smooth_gemm(x, w, m, layer=1, transpose_w=True, backend=backend))
        out = np.asarray(gemm(x, w, jnp.int32(5)))
        expected = x[:5].astype(np.float64) @ np.asarray(split.dense(), np.float64)[1].T
        chex.assert_trees_all_close(out[:5], expected, rtol=1e-5, atol=1e-4)
        chex.assert_trees_all_equal(out[5:], np.zeros((11, 48), np.float32))
