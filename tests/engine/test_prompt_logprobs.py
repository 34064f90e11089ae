"""Prompt logprobs (SamplingParams.prompt_logprobs): scored in the hybrid steps, equal to one reference pass over
the prompt, whatever the chunking, the batch, the prefix cache or preemption; max_tokens 0 scores only."""

import numpy as np
import pytest
from helpers import reference_greedy, reference_prompt_logprobs

from xyjax import LLM, SamplingParams


def prompts(rng, lengths):
    return [rng.integers(3, 49000, n).tolist() for n in lengths]


def check(model, prompt, entries, n):
    """``entries`` are the reference's: None first, then each token's logprob and the top n."""
    ref = reference_prompt_logprobs(model.config, model.params, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for pos in range(1, len(prompt)):
        entry, logp = entries[pos], ref[pos - 1]
        top = np.argsort(-logp)[:n].tolist()
        assert set(entry) == {prompt[pos], *top}
        np.testing.assert_allclose([entry[t] for t in entry], logp[list(entry)], atol=2e-4)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, block_size=4, max_num_batched_tokens=16, max_num_seqs=4, progress=False)


def test_chunked_in_a_batch_with_others(llm, tiny_model):
    rng = np.random.default_rng(11)
    ps = prompts(rng, [37, 5, 20, 9])
    compiles = llm.stats["compiles"]
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=n) for n in (3, None, 0)]
    outs = llm.generate(ps, params + [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                     prompt_logprobs=2, logprobs=1)])
    for p, out, n in zip(ps, outs, (3, None, 0, 2)):
        assert out.token_ids == reference_greedy(tiny_model, p, len(out.token_ids))
        if n is None:
            assert out.prompt_logprobs is None
        else:
            check(tiny_model, p, out.prompt_logprobs, n)
    assert len(outs[3].logprobs) == 6
    assert llm.stats["compiles"] == compiles
    assert llm.stats["kv_blocks_free"] == llm.stats["kv_blocks_total"]


def test_a_cached_prefix_is_still_scored(llm, tiny_model):
    rng = np.random.default_rng(12)
    shared, rest = prompts(rng, [24, 6])
    llm.generate([shared], SamplingParams(max_tokens=1, temperature=0))
    hits = llm.stats["prefix_hit_tokens"]
    out = llm.generate([shared + rest], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))[0]
    check(tiny_model, shared + rest, out.prompt_logprobs, 1)
    assert llm.stats["prefix_hit_tokens"] == hits
    again = llm.generate([shared + rest], SamplingParams(max_tokens=2, temperature=0))[0]   # others still hit
    assert llm.stats["prefix_hit_tokens"] > hits and again.token_ids == out.token_ids


def test_max_tokens_0_scores_the_prompt_only(llm, tiny_model):
    p = prompts(np.random.default_rng(13), [19])[0]
    out = llm.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    check(tiny_model, p, out.prompt_logprobs, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_seeded_sampling_is_unchanged_by_scoring(llm):
    p = prompts(np.random.default_rng(14), [21])[0]
    s = dict(max_tokens=8, temperature=1.0, top_k=40, seed=5, ignore_eos=True)
    plain, scored = llm.generate([p, p], [SamplingParams(**s), SamplingParams(**s, prompt_logprobs=1)])
    assert scored.token_ids == plain.token_ids


def test_too_many_prompt_logprobs_is_an_error(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(prompt_logprobs=21))[0]
    assert out.finish_reason == "error" and "prompt_logprobs=21" in out.error


def test_preemption_does_not_score_a_position_twice(tiny_model):
    # 12 blocks of 4 tokens: the prompts cannot all fit, so requests get preempted and recomputed.
    llm = LLM(tiny_model, block_size=4, kv_cache_memory=12 * 4 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=16,
              max_num_seqs=4, progress=False)
    ps = prompts(np.random.default_rng(15), [30, 26, 33])
    outs = llm.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=2))
    assert llm.stats["preemptions"] > 0
    for p, out in zip(ps, outs):
        assert out.token_ids == reference_greedy(tiny_model, p, 8)
        check(tiny_model, p, out.prompt_logprobs, 2)
    assert llm.stats["kv_blocks_free"] == llm.stats["kv_blocks_total"]
