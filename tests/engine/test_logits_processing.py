"""Logits processing through the engine (logit_bias, allowed_token_ids, bad_words, penalties, min_p): what each
does to greedy output, penalties unchanged by speculative decoding (verify rows see their drafts as history),
bad values refused, no compile while serving."""

import dataclasses

import jax
import numpy as np
import pytest

from models.llama import init_params
from xyjax import LLM, SamplingParams


@pytest.fixture(scope="module")
def loopy(tiny_model):
    """24 token ids: greedy text soon repeats, so penalties and n-gram drafts both matter."""
    cfg = dataclasses.replace(tiny_model.config, vocab_size=24)
    return dataclasses.replace(tiny_model, name="loopy", config=cfg,
                               params=init_params(cfg, jax.random.key(1), scale=0.2))


OPTIONS = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, progress=False)
PROMPTS = [[5, 6, 7, 8] * 3, [9, 3, 17], [20, 21, 4, 4, 4, 11, 12]]


def greedy(llm, **params):
    sampling = SamplingParams(**{"max_tokens": 12, "temperature": 0, "ignore_eos": True, **params})
    return [o.token_ids for o in llm.generate(PROMPTS, sampling)]


def test_each_processing_step_shapes_greedy_output(loopy):
    llm = LLM(loopy, **OPTIONS)
    compiles = llm.stats["compiles"]
    plain = greedy(llm)
    assert all(t == [13] * 12 for t in greedy(llm, logit_bias={13: 100.0}))
    assert all(set(t) <= {3, 19} for t in greedy(llm, allowed_token_ids=[3, 19]))
    favourite = max(set(plain[0]), key=plain[0].count)
    word = llm.tokenizer.decode([favourite])
    assert all(favourite not in t for t in greedy(llm, bad_words=[word]))
    penalized = greedy(llm, repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=1.0)
    assert penalized != plain
    assert max(len(set(t)) for t in penalized) > max(len(set(t)) for t in plain)    # fewer repeats
    assert greedy(llm, min_p=1.0) == plain          # greedy ignores min_p
    assert llm.stats["compiles"] == compiles


def test_penalties_are_exact_under_speculative_decoding(loopy):
    """Greedy output with penalties (which change it) is the same with n-gram drafts verified and accepted (each
    verify row penalizes the drafts before it, as a plain decode would have) as without."""
    spec = LLM(loopy, speculative={"num_draft_tokens": 3, "min_n": 1, "max_n": 3, "adaptive": False}, **OPTIONS)
    plain = LLM(loopy, **OPTIONS)
    unpenalized = greedy(plain, max_tokens=16)
    for params in (dict(repetition_penalty=1.1), dict(frequency_penalty=0.1), dict(presence_penalty=0.3),
                   dict(repetition_penalty=1.2, logit_bias={7: 1.0})):
        expected = greedy(plain, max_tokens=16, **params)
        assert expected != unpenalized, params
        assert greedy(spec, max_tokens=16, **params) == expected, params
    assert spec.stats["spec_accepted_tokens"] > 0


def test_bad_values_are_refused_by_name(loopy):
    llm = LLM(loopy, max_logit_bias=2, **OPTIONS)
    for params, message in ((dict(logit_bias={1: 1.0, 2: 1.0, 3: 1.0}), "logit_bias has 3 entries; the engine's "
                             "max_logit_bias is 2"),
                            (dict(logit_bias={99: 1.0}), "logit_bias token id 99 is outside the vocabulary"),
                            (dict(allowed_token_ids=[30]), "allowed_token_ids token id 30 is outside")):
        out = llm.generate([[5, 6]], SamplingParams(max_tokens=2, **params))[0]
        assert out.finish_reason == "error" and message in out.error, out.error
    for params, message in ((dict(presence_penalty=3), "presence_penalty must be in [-2, 2]"),
                            (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
                            (dict(logit_bias={1: 101}), "biases in [-100, 100]"), (dict(min_p=2), "min_p must be"),
                            (dict(allowed_token_ids=[]), "non-empty list"), (dict(bad_words=[""]), "non-empty")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            SamplingParams(**params)


def test_bad_word_tokens_and_the_token_bitmask():
    """A bad word's last token is masked where the output (and drafts) end with the rest of it; a one-token word
    always. The bitmask sets the allowed tokens' bits and clears the masked ones, little-endian within words."""
    from xyjax.engine.planner import token_bitmask
    from xyjax.engine.request import Request

    req = Request(request_id="r", prompt=None, prompt_token_ids=[1, 2], params=SamplingParams(), seed=0, arrival=0,
                  metrics=None, bad_word_ids=[[7, 8, 9], [4]])
    req.token_ids += [5, 7]
    assert req.bad_word_tokens([]) == [4] and req.bad_word_tokens([8]) == [9, 4]
    req.token_ids += [8]
    assert req.bad_word_tokens([]) == [9, 4]
    bits = token_bitmask(70, [0, 33, 69], [33])
    assert bits.dtype == np.int32 and bits.shape == (3,)
    assert [int(b) & 0xFFFFFFFF for b in bits] == [1, 0, 1 << 5]
    assert np.all(token_bitmask(64, None, []) == -1) and token_bitmask(40, None, [0])[0] == -2
