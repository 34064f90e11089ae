"""xyjax.functional: generation as pure functions under the caller's jit, against the engine."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import gguf_block_bytes
from models.weights import DENSE
from xyjax import LLM, SamplingParams
from xyjax import functional as F
from xyjax.ops import Backends
from xyjax.ops.gemm.formats import GGUFBlocks

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
                                                    45, 46, 47, 48]]


def padded(prompts, width):
    ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    return jnp.asarray(ids), jnp.asarray([len(p) for p in prompts], jnp.int32)


@functools.lru_cache(maxsize=None)
def jitted(cfg, max_new_tokens, tile=16):
    return jax.jit(functools.partial(F.generate, cfg=cfg, max_new_tokens=max_new_tokens, tile=tile))


@pytest.fixture(scope="module")
def engine_greedy(tiny_model):
    llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=32, max_num_seqs=8, progress=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("tile", [4, 16])
def test_greedy_generate_equals_the_engine_on_ragged_prompts(tiny_model, engine_greedy, tile):
    ids, lens = padded(PROMPTS, 24)
    tokens, lengths, steps = jitted(tiny_model.config, 8, tile)(tiny_model.params, ids, lens)
    assert np.asarray(tokens).tolist() == engine_greedy
    assert np.asarray(lengths).tolist() == [8] * len(PROMPTS) and int(steps) == 8


def test_eos_stops_its_row_and_the_loop_exits_when_every_row_stopped(tiny_model, engine_greedy):
    ids, lens = padded(PROMPTS, 24)
    run = jitted(tiny_model.config, 8)
    eos = [engine_greedy[0][2], engine_greedy[2][4]]                 # row 0's third, row 2's fifth token
    tokens, lengths, steps = run(tiny_model.params, ids, lens, eos_ids=jnp.asarray(eos, jnp.int32))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row, want in enumerate(engine_greedy):
        stop = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
        assert lengths[row] == stop
        assert tokens[row, :stop].tolist() == want[:stop] and (tokens[row, stop:] == -1).all()
    assert int(steps) == 8
    firsts = jnp.asarray([want[0] for want in engine_greedy], jnp.int32)
    tokens, lengths, steps = run(tiny_model.params, ids, lens, eos_ids=firsts)
    assert int(steps) == 1 and np.asarray(lengths).tolist() == [1] * len(PROMPTS)


def test_new_prompts_of_the_same_padded_shape_reuse_one_trace(tiny_model):
    rng = np.random.default_rng(0)
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, ids, lens, sampling, key):
        return F.generate(params, ids, lens, cfg=tiny_model.config, max_new_tokens=3, sampling=sampling, key=key)

    for _ in range(3):
        prompts = [rng.integers(1, 1000, int(rng.integers(1, 12))).tolist() for _ in range(3)]
        ids, lens = padded(prompts, 12)
        sampling = F.Sampling(temperature=jnp.float32(rng.uniform(0.5, 1)), top_k=jnp.int32(5))
        run(tiny_model.params, ids, lens, sampling, jax.random.key(int(rng.integers(100))))


def test_seeded_sampling_is_reproducible_and_depends_on_the_key(tiny_model):
    ids, lens = padded(PROMPTS, 24)
    run = jax.jit(functools.partial(F.generate, cfg=tiny_model.config, max_new_tokens=6))
    sampling = F.Sampling(temperature=jnp.float32(1.0), top_p=jnp.float32(0.9), top_k=jnp.int32(50))
    a, b, c = (np.asarray(run(tiny_model.params, ids, lens, sampling=sampling, key=jax.random.key(k))[0])
               for k in (1, 1, 2))
    assert (a == b).all() and (a != c).any()


def test_prefill_and_decode_steps_under_jit_with_a_donated_cache(tiny_model, engine_greedy):
    cfg = tiny_model.config
    ids, lens = padded(PROMPTS, 24)
    prefill = jax.jit(functools.partial(F.prefill, cfg=cfg), donate_argnums=1)
    step = jax.jit(functools.partial(F.decode_step, cfg=cfg, max_new_tokens=4), donate_argnums=1)
    state, cache = prefill(tiny_model.params, F.init_cache(cfg, len(PROMPTS), 24 + 4), ids, lens)
    out = []
    for _ in range(4):
        state, cache = step(tiny_model.params, cache, state, jax.random.key(0))
        out.append(np.asarray(state.token))
    assert np.stack(out, 1).tolist() == [want[:4] for want in engine_greedy]
    assert np.asarray(state.done).all() and np.asarray(state.seq_lens).tolist() == [len(p) + 3 for p in PROMPTS]


@pytest.mark.parametrize("attention", ["ffi", "pallas"])
def test_every_attention_backend_serves_the_device_planned_steps(tiny_model, engine_greedy, attention):
    ids, lens = padded(PROMPTS, 24)
    run = jax.jit(functools.partial(F.generate, cfg=tiny_model.config, max_new_tokens=3,
                                    backends=Backends(attention=attention)))
    tokens, _, _ = run(tiny_model.params, ids, lens)
    assert np.asarray(tokens).tolist() == [want[:3] for want in engine_greedy]


def test_a_row_whose_cache_is_full_stops(tiny_model, engine_greedy):
    cfg = tiny_model.config
    ids, lens = padded(PROMPTS, 24)
    step = jax.jit(functools.partial(F.decode_step, cfg=cfg))
    state, cache = F.prefill(tiny_model.params, F.init_cache(cfg, len(PROMPTS), 20, block_size=4), ids, lens, cfg=cfg)
    for _ in range(3):                                    # the 19-token prompt has room to feed one token
        state, cache = step(tiny_model.params, cache, state, jax.random.key(0))
    assert np.asarray(state.done).tolist() == [False, False, False, True]
    assert int(state.num_generated[3]) == 2 and int(state.seq_lens[3]) == 20
    assert np.asarray(state.token).tolist()[:3] == [want[2] for want in engine_greedy[:3]]


def test_generate_runs_the_engines_held_gguf_blocks_with_its_backends(tiny_model):
    """The engine's held params (every matrix, the embedding too, as Q4_1 GGUF blocks read in place by ffi) and its
    backends: generate's greedy tokens are the engine's."""
    rng = np.random.default_rng(3)
    blocks = lambda w: GGUFBlocks(gguf_block_bytes("Q4_1", np.asarray(w, np.float32), rng), "Q4_1",  # noqa: E731
                                  w.shape[-1])
    params = tiny_model.params
    layers = {name: blocks(w) if name in DENSE else w for name, w in params["layers"].items()}
    model = dataclasses.replace(tiny_model, params=dict(params, embed=blocks(params["embed"]), layers=layers))
    llm = LLM(model, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, gemm_backend="ffi",
              weight_layout="blocks", progress=False)
    want = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))]
    ids, lens = padded(PROMPTS, 24)
    run = jax.jit(functools.partial(F.generate, cfg=model.config, max_new_tokens=5, backends=llm.engine.backends))
    tokens, _, _ = run(llm.engine.runner.params, ids, lens)
    assert isinstance(llm.engine.runner.params["embed"], GGUFBlocks)
    assert np.asarray(tokens).tolist() == want
