"""Structured outputs through the engine (llguidance): every sampled output of a JSON schema, regex, choice or Lark
grammar is a full match, also under speculative decoding (verify rows masked after their drafts) and preemption
(the grammar state survives recomputation); combined with allowed_token_ids; bad grammars refused by name; no
compile while serving."""

import json
import re

import jsonschema
import pytest

from xyjax import LLM, SamplingParams, StructuredOutputs

OPTIONS = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=8, progress=False)
SPEC = {"num_draft_tokens": 3, "min_n": 1, "max_n": 3, "adaptive": False}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "ok", "tag"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                         "tag": {"enum": ["red", "green", "blue"]}}}
EXAMPLE = '{"n":21,"ok":true,"tag":"red"}'
PROMPTS = [EXAMPLE + " " + EXAMPLE, "Hello there!", "The quick brown fox"]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, **OPTIONS)


@pytest.fixture(scope="module")
def spec_llm(tiny_model):
    return LLM(tiny_model, speculative=SPEC, **OPTIONS)


def sample(llm, structured, n=12, temperature=1.0, max_tokens=48, prompts=PROMPTS, **params):
    """n seeded requests (seeds 0..n-1) over ``prompts`` in one batch; their outputs."""
    compiles = llm.stats["compiles"]
    sampling = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, structured_outputs=structured,
                               **params) for i in range(n)]
    outs = llm.generate([prompts[i % len(prompts)] for i in range(n)], sampling)
    assert llm.stats["compiles"] == compiles
    return outs


def assert_schema(outs):
    for out in outs:
        assert out.finish_reason == "stop", (out.text, out.finish_reason, out.error)
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_outputs_match_their_grammar(llm):
    assert_schema(sample(llm, {"json": SCHEMA}))
    for out in sample(llm, StructuredOutputs(regex="[0-9]{3}-[a-z]{2}")):
        assert out.finish_reason == "stop" and re.fullmatch("[0-9]{3}-[a-z]{2}", out.text), out.text
    choices = ["yes", "no", "maybe later"]
    outs = sample(llm, {"choice": choices})
    assert all(out.finish_reason == "stop" and out.text in choices for out in outs)
    assert len({out.text for out in outs}) > 1                       # sampled, not forced
    for out in sample(llm, {"grammar": 'start: "(" item ("," item)* ")"\nitem: /[a-c]/'}, max_tokens=64):
        assert re.fullmatch(r"\([a-c](,[a-c])*\)", out.text) or out.finish_reason == "length", out.text
    for out in sample(llm, {"json": "object"}, n=4):               # any object: text a prefix of one, or one
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_greedy_output_follows_the_grammar_and_ends_it(llm):
    out = sample(llm, {"json": SCHEMA}, n=1, temperature=0)[0]
    assert_schema([out])
    assert out.token_ids[-1] not in llm.tokenizer.stop_token_ids      # complete: ended without EOS


def test_grammar_and_allowed_token_ids_combine(llm):
    digits = [llm.tokenizer.token_to_id(d) for d in "12"]
    for out in sample(llm, {"regex": "[0-9]{4}"}, allowed_token_ids=digits + sorted(llm.tokenizer.stop_token_ids)):
        assert out.finish_reason == "stop" and re.fullmatch("[12]{4}", out.text), out.text
    out = sample(llm, {"choice": ["abc"]}, n=1, allowed_token_ids=digits)[0]   # nothing left to sample
    assert out.finish_reason == "error" and "does not follow the structured_outputs grammar" in out.error


def test_speculative_decoding_keeps_outputs_exact_and_valid(llm, spec_llm):
    """Greedy output under a grammar is the same with n-gram drafts verified (each verify row masked after its
    drafts) as without, and sampled outputs still match."""
    accepted = spec_llm.stats["spec_accepted_tokens"]
    for structured in ({"json": SCHEMA}, {"regex": "([a-z]{2} ){3}[0-9]{2}"}):
        assert [o.token_ids for o in sample(spec_llm, structured, temperature=0)] == \
            [o.token_ids for o in sample(llm, structured, temperature=0)]
    assert spec_llm.stats["spec_accepted_tokens"] > accepted
    assert_schema(sample(spec_llm, {"json": SCHEMA}))


def test_preemption_leaves_the_grammar_state_intact(tiny_model, llm):
    """A pool of 12 blocks of 4 tokens cannot hold the batch: requests are preempted and recomputed, and their
    seeded outputs are those of a roomy pool."""
    small = LLM(tiny_model, block_size=4, kv_cache_memory=12 * 4 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=16,
                max_num_seqs=4, progress=False)
    prompts = ["Hello there!", "The quick brown fox", "Once upon a time", "What is the capital"]
    outs = sample(small, {"json": SCHEMA}, n=8, max_tokens=40, prompts=prompts)
    assert small.stats["preemptions"] > 0
    assert_schema(outs)
    assert [o.token_ids for o in outs] == [o.token_ids for o in sample(llm, {"json": SCHEMA}, n=8, max_tokens=40,
                                                                         prompts=prompts)]


def test_bad_grammars_are_refused_by_name(llm):
    for structured, message in (({"json": {"type": "foo"}}, "structured_outputs.json: Invalid type: foo"),
                                ({"regex": "[0-9"}, "structured_outputs.regex: at 1(8): invalid regex"),
                                ({"grammar": "start: foo"},
                                 'structured_outputs.grammar: at 1(8): unknown name: "foo"')):
        out = llm.generate(["Hello"], SamplingParams(max_tokens=4, structured_outputs=structured))[0]
        assert out.finish_reason == "error" and out.error.startswith(message), out.error
    assert sample(llm, {"choice": ["ok"]}, n=1)[0].text == "ok"    # the engine goes on
    for structured, message in (({}, "exactly one of json, regex, choice or grammar, got none"),
                                ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
                                ({"json": "array"}, 'json must be a JSON schema'),
                                ({"choice": []}, "choice must be a non-empty list"), ({"lark": "x"}, "unknown fields")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(structured_outputs=structured)
