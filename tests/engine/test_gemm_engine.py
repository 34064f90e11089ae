"""The engine over the gemm backends, weight layouts and a saved gemm profile: greedy output unchanged."""

import dataclasses

import jax
import numpy as np
import pytest

import ascend_ffi
from helpers import gguf_block_bytes
from models.llama import linear_shapes
from models.weights import DENSE
from xyjax import LLM, SamplingParams
from xyjax.bench.profile import sample_weights
from xyjax.ops.gemm import format_name
from xyjax.ops.gemm import profile as gemm_profile
from xyjax.ops.gemm.formats import GGUFBlocks, quantize_blocks
from xyjax.ops.gemm.profile import GemmProfile

BACKENDS = ("ffi", "xla")


def test_engine_greedy_identical_with_ffi_and_xla_gemm(tiny_model):
    """Chunked prefill and decodes of a batch, the whole model's dense layers and tied LM head on each backend."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 49000, n).tolist() for n in (45, 3, 20, 9)]
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in BACKENDS:
        llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, gemm_backend=backend,
                  progress=False)
        assert llm.engine.config.gemm_backend == backend
        tokens[backend] = [out.token_ids for out in llm.generate(prompts, sampling)]
    assert tokens["ffi"] == tokens["xla"]
    assert all(len(t) == 8 for t in tokens["ffi"])


def test_engine_greedy_identical_with_split_and_merged_weights(tiny_model):
    """The tiny model's dense matrices block-quantized (SplitBlocks), held by the engine in the split layout on the
    ffi backend, as TileWeights on ffi (AMX CPUs), plain on ffi and xla: the engine's greedy tokens are the same."""
    layers = {name: quantize_blocks(np.asarray(w), 32) if name in DENSE else w
              for name, w in tiny_model.params["layers"].items()}
    model = dataclasses.replace(tiny_model, params=dict(tiny_model.params, layers=layers))
    runs = {"split-ffi": ("split", "ffi"), "plain-xla": ("auto", "xla"), "merged": ("plain", "ffi")}
    if ascend_ffi.load().xyjax_gemm_amx():
        runs["tiles-ffi"] = ("tiles", "ffi")
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 49000, n).tolist() for n in (45, 3, 20, 9)]
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for name, (layout, backend) in runs.items():
        llm = LLM(model, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, gemm_backend=backend,
                  weight_layout=layout, progress=False)
        tokens[name] = [out.token_ids for out in llm.generate(prompts, sampling)]
    assert all(t == tokens["merged"] for t in tokens.values()), tokens


def q4_1_model(tiny_model, rng):
    """The tiny model with its dense matrices quantized to Q4_1 GGUF blocks (gguf's quantizer)."""
    layers = {name: GGUFBlocks(gguf_block_bytes("Q4_1", np.asarray(w, np.float32), rng), "Q4_1", w.shape[-1])
              if name in DENSE else w for name, w in tiny_model.params["layers"].items()}
    return dataclasses.replace(tiny_model, params=dict(tiny_model.params, layers=layers))


def test_engine_greedy_identical_with_gguf_blocks_read_in_place(tiny_model):
    """The tiny model's dense matrices quantized to Q4_1 as GGUF blocks (gguf's quantizer), read in place by the ffi
    handler's block kernels (weight_layout="blocks") and dequantized to plain float32 on ffi: the same greedy
    tokens."""
    rng = np.random.default_rng(7)
    model = q4_1_model(tiny_model, rng)
    prompts = [rng.integers(3, 49000, n).tolist() for n in (45, 3, 20, 9)]
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for layout in ("blocks", "plain"):
        llm = LLM(model, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, gemm_backend="ffi",
                  weight_layout=layout, progress=False)
        tokens[layout] = [out.token_ids for out in llm.generate(prompts, sampling)]
    assert tokens["blocks"] == tokens["plain"]
    assert all(len(t) == 8 for t in tokens["blocks"])


def test_engine_with_int8_activations(tiny_model):
    """activation_quant="int8" on GGUF blocks (xla: the reference): only the dense layers take int8 inputs, the
    mode is in LLM.stats, every step program is compiled at start, and a prompt's greedy tokens do not depend on
    its batch (the activations are quantized per token). A layout other than blocks, or an unknown mode, is
    refused by name."""
    rng = np.random.default_rng(8)
    layers = {name: GGUFBlocks(gguf_block_bytes("Q8_0", np.asarray(w, np.float32), rng), "Q8_0", w.shape[-1])
              if name in DENSE else w for name, w in tiny_model.params["layers"].items()}
    model = dataclasses.replace(tiny_model, params=dict(tiny_model.params, layers=layers))
    prompts = [rng.integers(3, 49000, n).tolist() for n in (45, 3, 20, 9)]
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    options = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, gemm_backend="xla", progress=False)
    llm = LLM(model, activation_quant="int8", **options)
    held = llm.engine.runner.params
    assert all(held["layers"][name].act_quant == "int8" for name in DENSE)
    assert not isinstance(held["embed"], GGUFBlocks) or held["embed"].act_quant == "none"
    compiles = llm.stats["compiles"]
    tokens = [o.token_ids for o in llm.generate(prompts, sampling)]
    assert llm.stats["activation_quant"] == "int8" and llm.stats["compiles"] == compiles
    assert tokens == [llm.generate([p], sampling)[0].token_ids for p in prompts]
    with pytest.raises(ValueError, match="activation_quant='int8' needs weight_layout 'blocks'"):
        LLM(model, activation_quant="int8", weight_layout="plain", **options)
    with pytest.raises(ValueError, match="activation_quant must be one of none, int8, got 'int4'"):
        LLM(model, activation_quant="int4", **options)


def test_engine_runs_the_profiled_tunables(monkeypatch, tmp_path, tiny_model):
    """A saved profile for this device, keyed by the formats the engine holds (``xyjax profile``'s samples: Q4_1
    blocks in the layers, the plain tied head), is loaded at start and its tunables reach every GEMM (here ones no
    default uses: one lane, row split, m rounded up to 16, no streaming or AMX kernel): greedy output unchanged; no
    profile: defaults."""
    monkeypatch.setenv("XYJAX_CACHE_DIR", str(tmp_path))
    model = q4_1_model(tiny_model, np.random.default_rng(8))
    shapes, samples = linear_shapes(model.config), sample_weights(model, "ffi", "auto")
    assert format_name(samples["qkv"]) == "blocks:Q4_1" and format_name(samples["lm_head"]) == "plain"
    odd = (("amx_rows", 0), ("lanes", 1), ("m_align", 16), ("split_rows", True), ("stream_rows", 0))
    table = GemmProfile(device=jax.devices()[0].device_kind, backend="ffi", entries=tuple(
        ((format_name(samples[name]), T, K, N, tr), odd) for name, (K, N, tr) in shapes.items() for T in (16, 32)))
    prompts = [[5, 9, 200, 7, 11, 3, 90, 4, 8, 1000, 33], [17, 4]]
    sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    options = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, progress=False)
    plain = LLM(model, gemm_backend="ffi", **options)
    assert plain.engine.backends.gemm_profile is None
    expected = [o.token_ids for o in plain.generate(prompts, sampling)]
    table.save(gemm_profile.default_path(table.device, "ffi"))
    tuned = LLM(model, gemm_backend="ffi", **options)
    assert tuned.engine.backends.gemm_profile == table
    for name in ("qkv", "lm_head"):
        hlo = jax.jit(lambda x, w: tuned.engine.backends.smooth_gemm(x, w, 3, transpose_w=True)).lower(
            jax.numpy.zeros((16, shapes[name][0])), samples[name]).as_text()
        assert all(f"{key} = {str(value).lower()}" in hlo for key, value in odd), name
    assert [o.token_ids for o in tuned.generate(prompts, sampling)] == expected
