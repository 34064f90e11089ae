"""The Mosaic GPU ports of the Pallas kernels (``xyjax/ops/{attention,gemm}/pallas_mosaic.py``): run in Pallas' GPU
interpreter on CPU (shared memory, TMA copies and barriers simulated, with its race detector) against float64
references and the xla backend, the backend's choice between the Mosaic and Triton-style kernels, and lowering
for CUDA from this CPU host. Compiling the Mosaic GPU modules to cubins and running them needs a Hopper GPU
(examples/gpu_check.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abstract_gpu import abstract_cuda_device
from test_attention_pallas import live_tasks, make_case, split_table
from helpers import reference_attention, task_meta

from xyjax.ops import meta_attention, pallas_lowering, smooth_gemm
from xyjax.ops.attention import pallas_mosaic as attention_mosaic
from xyjax.ops.attention.contract import NUM_FIELDS
from xyjax.ops.attention.pallas import meta_attention_pallas
from xyjax.ops.gemm import pallas as gemm_pallas, pallas_mosaic as gemm_mosaic
from xyjax.ops.kv_cache import KVCache

from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpreter

BF16 = dict(rtol=3e-2, atol=3e-2)
# jax 0.11's GPU interpreter has no rule for a wgmma whose A operand is in registers (the attention's P V)
needs_register_wgmma = pytest.mark.skipif(jax.__version_info__ < (0, 12),
                                          reason="jax < 0.12: the GPU interpreter cannot run wgmma from registers")
pallas = jax.jit(meta_attention_pallas, static_argnames=("lowering",))
xla = jax.jit(meta_attention, static_argnames="backend")


@pytest.fixture(autouse=True)
def no_races():
    """Every interpreted Mosaic kernel of a test runs race-free (the interpreter's happens-before detector)."""
    yield
    try:
        races = gpu_interpreter.get_races()
    except AssertionError:      # jax 0.11: no state before the first interpreted kernel
        return
    assert not races.races_found, "the GPU interpreter found a data race"


def bf16_case(seed, q_lens, histories, **kw):
    q, kv, meta, expected = make_case(np.random.default_rng(seed), q_lens, histories, **kw)
    return q.astype(jnp.bfloat16), KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16)), meta, expected


@needs_register_wgmma
@pytest.mark.parametrize("heads,kv_heads,tile", [(6, 2, 16), (9, 3, 32)])
def test_attention_mixed_batch(heads, kv_heads, tile):
    """Prefill, chunked prefill with history (several chunks), decodes; GQA 3 with tile 32 is the default model's
    prefill group (96 packed rows -> 128); both groups take the Mosaic kernel."""
    q, kv, meta, expected = bf16_case(heads, [9, 7, 1, 1, 4, 1], [0, 23, 137, 0, 5, 60], heads=heads,
                                      kv_heads=kv_heads, dim=64, block_size=16, tile=tile, pages=16, num_blocks=64)
    for g in meta.groups:
        assert attention_mosaic.unsupported(q.dtype, kv.k.dtype, 64, 16, heads // kv_heads, g.tile) is None
    out = np.asarray(pallas(q, kv, 1, meta, lowering="mosaic_interpret"))
    np.testing.assert_allclose(out, expected[1], **BF16)
    np.testing.assert_allclose(out, np.asarray(xla(q, kv, 1, meta)).astype(np.float32), **BF16)
    assert not out[23:].any(), "padding rows are zero"


@needs_register_wgmma
def test_attention_kv_splits_and_lse():
    """Splits at unaligned cuts merge to the unsplit result; the merged lse matches."""
    q, kv, meta, _ = bf16_case(6, [9, 4, 1, 1], [0, 21, 70, 2], heads=6, kv_heads=2, dim=64, block_size=16,
                               tile=16, num_blocks=48)
    scale = 0.125
    tasks = live_tasks(meta.groups[1])
    whole, lse_whole = attention_mosaic.attend_mosaic(q, kv.k, kv.v, 1, meta.block_tables, tasks, scale, tile=16,
                                                      interpret=True, return_lse=True)
    split = split_table(tasks, lambda end: sorted({max(1, end // 3), max(1, (2 * end) // 3 + 1)} - {end}))
    parts, lse_parts = attention_mosaic.attend_mosaic(q, kv.k, kv.v, 1, meta.block_tables, split, scale, tile=16,
                                                      interpret=True, return_lse=True)
    ref = reference_attention(q.astype(jnp.float32), KVCache(k=kv.k.astype(jnp.float32), v=kv.v.astype(jnp.float32)),
                              1, task_meta(meta.block_tables, tasks), scale)
    np.testing.assert_allclose(np.asarray(whole), ref, **BF16)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(lse_parts), np.asarray(lse_whole), rtol=1e-3, atol=1e-3)


def test_attention_falls_back_where_mosaic_does_not_take_it():
    """float32 (and head_dim 16) run the Triton-style kernel under "mosaic_interpret", exactly as "interpret"."""
    q, kv, meta, expected = make_case(np.random.default_rng(3), [5, 1, 1], [3, 9, 30])
    assert "float32" in attention_mosaic.unsupported(q.dtype, kv.k.dtype, 16, 4, 2, 4)
    assert "head_dim" in attention_mosaic.unsupported(jnp.bfloat16, jnp.bfloat16, 16, 4, 2, 4)
    assert "tree" in attention_mosaic.unsupported(jnp.bfloat16, jnp.bfloat16, 64, 16, 2, 4, has_tree=True)
    assert "rows" in attention_mosaic.unsupported(jnp.bfloat16, jnp.bfloat16, 64, 16, 8, 32)
    out = np.asarray(pallas(q, kv, 1, meta, lowering="mosaic_interpret"))
    np.testing.assert_array_equal(out, np.asarray(pallas(q, kv, 1, meta, lowering="interpret")))
    np.testing.assert_allclose(out, expected[1], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="KV cache dtype float32"):
        attention_mosaic.attend_mosaic(q, kv.k, kv.v, 0, meta.block_tables, live_tasks(meta.groups[0]), 1.0, tile=1)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_gemm_rows_below_m_and_zeros(transpose_w):
    """Buckets below and above one 64-row tile, m inside a tile, on a tile edge, 0 and T; N of 128-wide and
    64-wide tiles; against float64 and the xla backend."""
    rng = np.random.default_rng(1)
    for T, K, N, ms in ((16, 64, 192, (0, 1, 16)), (128, 128, 128, (64, 70, 128))):
        x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((N, K) if transpose_w else (K, N)), jnp.bfloat16)
        w64 = np.asarray(w, np.float64).T if transpose_w else np.asarray(w, np.float64)
        for m in ms:
            out = np.asarray(gemm_pallas.gemm(x, w, m, None, transpose_w, {}, lowering="mosaic_interpret"), np.float32)
            assert out.shape == (T, N) and not out[m:].any()
            np.testing.assert_allclose(out[:m], np.asarray(x, np.float64)[:m] @ w64, rtol=2e-2, atol=0.15)
            oracle = np.asarray(smooth_gemm(x, w, m, transpose_w=transpose_w, backend="xla"), np.float32)
            np.testing.assert_allclose(out, oracle, rtol=2e-2, atol=0.15)


def test_gemm_falls_back_where_mosaic_does_not_take_it():
    assert "float32" in gemm_mosaic.unsupported(jnp.float32, 64, 64)
    assert "K=48" in gemm_mosaic.unsupported(jnp.bfloat16, 48, 64)
    assert "N=40" in gemm_mosaic.unsupported(jnp.bfloat16, 64, 40)
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((16, 48)).astype(np.float32), rng.standard_normal((48, 40)).astype(np.float32)
    out = gemm_pallas.gemm(x, w, 9, None, False, {}, lowering="mosaic_interpret")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(gemm_pallas.gemm(x, w, 9, None, False, {},
                                                                               lowering="interpret")))
    with pytest.raises(ValueError, match="float32"):
        gemm_mosaic.smooth_gemm_mosaic(x, w, 9)


def test_default_lowering(monkeypatch):
    assert pallas_lowering.default_lowering() == "interpret"        # this CPU host
    monkeypatch.setenv(pallas_lowering.ENV, "mosaic_interpret")
    assert pallas_lowering.default_lowering() == "mosaic_interpret"
    monkeypatch.setenv(pallas_lowering.ENV, "cuda")
    with pytest.raises(ValueError, match="unknown Pallas lowering 'cuda'"):
        pallas_lowering.default_lowering()

    class Device:
        platform, device_kind = "gpu", "NVIDIA A100-SXM4-80GB"
    assert not pallas_lowering.is_hopper(Device())
    Device.compute_capability = "9.0"
    assert pallas_lowering.is_hopper(Device())


def custom_calls(fn, *args):
    with abstract_cuda_device():
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    return re.findall(r"custom_call @(\w+)", exported.mlir_module())


@pytest.mark.parametrize("tile", [1, 32])
def test_attention_lowers_for_cuda(tile):
    """The default model's shapes (9 heads over 3 KV heads, head_dim 64, blocks of 16) for the decode (tile 1)
    and prefill (tile 32) groups: one Mosaic GPU custom call. Building the cubin happens at XLA compile on a GPU."""
    T, H, Hkv, D, L, NB, BS, S, P, W = 64, 9, 3, 64, 2, 64, 16, 8, 8, 24
    shapes = [((T, H, D), jnp.bfloat16), ((L, NB, Hkv, BS, D), jnp.bfloat16), ((L, NB, Hkv, BS, D), jnp.bfloat16),
              ((), jnp.int32), ((S, P), jnp.int32), ((W, NUM_FIELDS), jnp.int32)]
    fn = lambda q, k, v, layer, bt, tasks: attention_mosaic.attend_mosaic(  # noqa: E731
        q, k, v, layer, bt, tasks, 0.125, tile=tile)
    calls = custom_calls(fn, *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    assert [c for c in calls if c.startswith("mosaic_gpu")] == [calls[0]] and len(calls) == 1


@pytest.mark.parametrize("transpose_w", [False, True])
def test_gemm_lowers_for_cuda(transpose_w):
    """The default model's QKV (576 -> 960) at bucket 16 (padded to one 64-row tile) and its tied LM head."""
    for T, K, N in ((16, 576, 960), (512, 576, 49152)):
        x = jax.ShapeDtypeStruct((T, K), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((N, K) if transpose_w else (K, N), jnp.bfloat16)
        fn = lambda x, w, m: gemm_mosaic.smooth_gemm_mosaic(x, w, m, transpose_w=transpose_w)  # noqa: E731
        calls = custom_calls(fn, x, w, jax.ShapeDtypeStruct((), jnp.int32))
        assert len(calls) == 1 and calls[0].startswith("mosaic_gpu")


@pytest.mark.parametrize("dtype,kernel", [("bfloat16", "mosaic_gpu"), ("float32", "__gpu$xla.gpu.triton")])
def test_model_step_lowers_for_cuda(monkeypatch, dtype, kernel):
    """A whole step of a 2-layer model with head_dim 64 (models.llama.forward, pallas backends, layers under
    lax.scan) on a Hopper: in bfloat16 every gemm and attention group is a Mosaic GPU kernel (4 gemms in the layer
    body, 2 attention groups, the LM head), in float32 the Triton-style ones."""
    import dataclasses
    import functools

    from helpers import TINY
    from models.llama import forward, init_params
    from xyjax.ops.attention.tiling import attention_metadata
    from xyjax.ops.backends import Backends
    from xyjax.ops.step_inputs import StepInputs

    monkeypatch.setenv(pallas_lowering.ENV, "mosaic")
    cfg = dataclasses.replace(TINY, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64)
    params = jax.tree.map(lambda a: a.astype(dtype), init_params(cfg, jax.random.key(0)))
    T, L = 64, 20
    kv = KVCache.create(cfg.num_layers, 16, 16, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    meta = attention_metadata([0], [L], [L], np.arange(16)[None], num_kv_heads=2, num_tokens=T, tile=32)
    pad = lambda a, fill: np.concatenate([a, np.full(T - L, fill)]).astype(np.int32)  # noqa: E731
    inputs = StepInputs(token_ids=pad(np.arange(L) + 100, 0), positions=pad(np.arange(L), 0),
                        slot_mapping=pad(np.arange(L), -1), num_tokens=jnp.int32(L), attention=meta,
                        sample_index=jnp.array([L - 1], jnp.int32), num_samples=jnp.int32(1))
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype), (params, kv, inputs))
    fn = jax.jit(functools.partial(forward, cfg=cfg, backends=Backends(attention="pallas", gemm="pallas")))
    with abstract_cuda_device():
        exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    calls = re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())
    assert len(calls) == 7 and all(c.startswith(kernel) for c in calls), calls


def test_gemm_reads_a_stacked_layer_in_place():
    """w [L, N, K] with a traced layer: the kernel reads that layer (no per-layer copy), as the xla backend's w[layer]."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.bfloat16)
    fn = jax.jit(lambda x, w, m, layer: gemm_pallas.gemm(x, w, m, layer, True, {}, lowering="mosaic_interpret"))
    for layer in (0, 2):
        out = np.asarray(fn(x, w, 40, layer), np.float32)
        oracle = np.asarray(smooth_gemm(x, w, 40, layer=layer, transpose_w=True, backend="xla"), np.float32)
        np.testing.assert_allclose(out, oracle, rtol=2e-2, atol=0.15)
        assert not out[40:].any()
