"""Prefix caching in the engine on the tiny model: caching on vs off gives the same tokens; hits, copies,
evictions and preemptions as counted by the stats."""

import jax
import numpy as np
import pytest

from xyjax import LLM, SamplingParams

PER_BLOCK = 4 * 2 * 2 * 2 * 16 * 4      # bytes of a 4-token block of the tiny model


@pytest.fixture(scope="module")
def engines(tiny_model):
    """Caching on, caching off, and caching on over a 16-block pool (evicts and preempts)."""
    options = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=6, progress=False)
    return dict(on=LLM(tiny_model, **options), off=LLM(tiny_model, enable_prefix_caching=False, **options),
                small=LLM(tiny_model, kv_cache_memory=16 * PER_BLOCK, **options))


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run(llm, prompts, n=6):
    before = dict(llm.stats)
    outs = [o.token_ids for o in llm.generate(prompts, greedy(n))]
    after = llm.stats
    return outs, {k: after[k] - before[k] for k in ("prefix_hit_tokens", "prefix_block_hit_tokens", "prefix_copies",
                                                    "prefix_evicted_blocks", "preemptions", "prefill_tokens")}


def test_shared_system_prompt_hits_token_wise_and_matches_no_caching(engines):
    rng = np.random.default_rng(0)
    system = rng.integers(3, 49000, 22).tolist()            # 22 tokens: 5 full blocks and 2 tokens of a 6th
    prompts = [system + rng.integers(3, 49000, n).tolist() for n in (5, 1, 9, 14, 3)]
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(kw.get("fun_name")) if event.endswith("backend_compile_duration")
        else None)
    first, _ = run(engines["on"], prompts[:1])               # caches the system prompt
    rest, delta = run(engines["on"], prompts[1:])
    assert compiles == []                                     # the copy-on-write program was compiled at start
    assert first + rest == run(engines["off"], prompts)[0]
    assert delta["prefix_hit_tokens"] == 4 * 22 and delta["prefix_block_hit_tokens"] == 4 * 20
    assert delta["prefix_copies"] == 4
    assert engines["on"].stats["kv_blocks_free"] == engines["on"].stats["kv_blocks_total"]


def test_multi_turn_conversations_hit_the_previous_answer(engines):
    """Each turn's prompt is the previous prompt, its answer and a new user message."""
    rng = np.random.default_rng(1)
    convs = [rng.integers(3, 49000, n).tolist() for n in (7, 13, 6)]
    for turn in range(3):
        answers, delta = run(engines["on"], convs, n=5)
        assert answers == run(engines["off"], convs, n=5)[0]
        if turn:                                              # all of it but the last answer token (no KV yet)
            assert delta["prefix_hit_tokens"] == sum(len(c) - 3 for c in convs)
        convs = [c + a + rng.integers(3, 49000, 2).tolist() for c, a in zip(convs, answers)]


def test_partial_block_overlaps_and_full_prompt_hits(engines):
    """Prompts forking from one stem at every offset inside a block, and repeats of whole prompts (the last
    prompt token is computed again for its logits)."""
    rng = np.random.default_rng(2)
    stem = rng.integers(3, 49000, 13).tolist()
    prompts = [stem] + [stem[:k] + rng.integers(3, 49000, 3).tolist() for k in range(4, 13)] + [stem, stem[:9]]
    on, delta = run(engines["on"], prompts[:1])
    more, delta = run(engines["on"], prompts[1:])
    assert on + more == run(engines["off"], prompts)[0]
    assert delta["prefix_hit_tokens"] == sum(range(4, 13)) + 12 + 8 and delta["prefix_copies"] > 0


def test_a_short_pool_evicts_before_preempting_and_stays_exact(engines):
    rng = np.random.default_rng(3)
    system = rng.integers(3, 49000, 10).tolist()
    prompts = [system + rng.integers(3, 49000, n).tolist() for n in (6, 2, 11, 4, 7, 9, 3, 5)]
    prompts += [rng.integers(3, 49000, 12).tolist() for _ in range(3)]
    outs, delta = run(engines["small"], prompts, n=10)
    assert outs == run(engines["off"], prompts, n=10)[0]
    assert delta["prefix_evicted_blocks"] > 0 and delta["preemptions"] > 0 and delta["prefix_hit_tokens"] > 0
    stats = engines["small"].stats
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
