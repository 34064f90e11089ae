"""Engine behaviour on a tiny random-weight model: paging, chunked prefill, preemption, sampling, stops, errors,
and the stats snapshot."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import reference_greedy

from models.llama import init_params
from xyjax import LLM, SamplingParams


def prompts(rng, lengths):
    return [rng.integers(3, 49000, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def small_pool_llm(tiny_model):
    # 12 blocks of 4 tokens: the batch below cannot all fit, so requests get preempted and recomputed.
    return LLM(tiny_model, block_size=4, kv_cache_memory=12 * 4 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=16,
               max_num_seqs=4, progress=False)


@pytest.fixture(scope="module")
def tiny_llm(tiny_model):
    return LLM(tiny_model, block_size=4, max_num_batched_tokens=32, max_num_seqs=8, progress=False)


def test_greedy_batch_matches_reference_with_chunked_prefill(tiny_llm, tiny_model):
    rng = np.random.default_rng(1)
    ps = prompts(rng, [1, 5, 37, 70, 9])          # 37 and 70 tokens are prefilled in several chunks
    outs = tiny_llm.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, out in zip(ps, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == 8
        assert out.token_ids == reference_greedy(tiny_model, p, 8)
    assert tiny_llm.stats["kv_blocks_free"] == tiny_llm.stats["kv_blocks_total"]


def test_preemption_recomputes_without_corruption(small_pool_llm, tiny_model):
    rng = np.random.default_rng(2)
    ps = prompts(rng, [10, 12, 9, 11])
    before = small_pool_llm.stats["preemptions"]
    outs = small_pool_llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert small_pool_llm.stats["preemptions"] > before
    for p, out in zip(ps, outs):
        assert out.token_ids == reference_greedy(tiny_model, p, 10)
    assert small_pool_llm.stats["kv_blocks_free"] == small_pool_llm.stats["kv_blocks_total"]


def test_chunked_prefills_under_a_short_pool_preempt_and_finish(small_pool_llm, tiny_model):
    rng = np.random.default_rng(6)
    ps = prompts(rng, [30, 26, 33])              # each needs 2-3 prefill chunks; two do not fit together
    outs = small_pool_llm.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, out in zip(ps, outs):
        assert out.token_ids == reference_greedy(tiny_model, p, 8)
    assert small_pool_llm.engine.max_model_len == 48   # capped by the pool: 12 blocks of 4
    assert small_pool_llm.stats["kv_blocks_free"] == small_pool_llm.stats["kv_blocks_total"]


def test_seeded_sampling_is_independent_of_batch(tiny_llm):
    rng = np.random.default_rng(3)
    p = prompts(rng, [6])[0]
    s = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = tiny_llm.generate([p], s)[0].token_ids
    others = prompts(rng, [3, 20, 8])
    mixed = tiny_llm.generate(others[:2] + [p] + others[2:],
                              [SamplingParams(max_tokens=5, temperature=0.7, seed=7)] * 2 + [s]
                              + [SamplingParams(max_tokens=15, temperature=1.0)])
    assert mixed[2].token_ids == alone
    other_seed = tiny_llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9,
                                                       seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_max_tokens_stop_token_ids_and_min_tokens(tiny_llm, tiny_model):
    rng = np.random.default_rng(4)
    p = prompts(rng, [7])[0]
    greedy = reference_greedy(tiny_model, p, 6)
    stop_at = greedy[3]
    k = greedy.index(stop_at) + 1                    # the first time that token appears
    out = tiny_llm.generate([p], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[:k]
    # min_tokens masks the stop token until it is reached
    out = tiny_llm.generate([p], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_at],
                                                min_tokens=6))[0]
    assert len(out.token_ids) == 6 and stop_at not in out.token_ids[:6] and out.finish_reason == "length"


def test_stop_strings_cut_text(tiny_llm, tokenizer):
    rng = np.random.default_rng(5)
    p = prompts(rng, [5])[0]
    full = tiny_llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    out = tiny_llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]


def test_bad_prompts_error_and_others_complete(tiny_llm):
    ok = [5, 6, 7]
    too_long = list(range(10, 10 + tiny_llm.engine.max_model_len))
    outs = tiny_llm.generate([ok, too_long, [], [10**9], "hello"], SamplingParams(max_tokens=3, temperature=0))
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "error", "length"]
    assert "context length" in outs[1].error and "empty" in outs[2].error and "vocabulary" in outs[3].error
    assert len(outs[0].token_ids) == 3 and len(outs[4].token_ids) == 3
    assert tiny_llm.stats["kv_blocks_free"] == tiny_llm.stats["kv_blocks_total"]


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -3),
                                         ("max_tokens", 0), ("min_tokens", 99), ("seed", -1), ("stop", [""]),
                                         ("stop_token_ids", [-2]), ("temperature", float("nan"))])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{"max_tokens": 8, field: value})


def test_unknown_engine_option_and_model(tiny_model, tmp_path):
    with pytest.raises(TypeError, match="block_sise"):
        LLM(tiny_model, block_sise=8)
    with pytest.raises(FileNotFoundError, match="tried"):
        LLM(str(tmp_path / "missing.gguf"))


def test_stream_concatenates_to_text(tiny_llm):
    s = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    pieces = list(tiny_llm.stream([11, 12, 13], s))
    assert "".join(pieces) == tiny_llm.generate([[11, 12, 13]], s)[0].text


def test_abort_frees_blocks_and_others_finish(tiny_llm):
    engine = tiny_llm.engine
    keep = engine.add_request([21, 22, 23], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    drop = engine.add_request([31, 32, 33, 34], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    outs = {}
    for _ in range(2):
        outs.update((o.request_id, o) for o in engine.step())
    assert engine.requests[drop].block_table
    engine.abort(drop)
    engine.abort("no-such-request")                        # unknown ids: a no-op
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
    assert outs[drop].finish_reason == "abort" and outs[keep].finish_reason == "length"
    assert tiny_llm.stats["kv_blocks_free"] == tiny_llm.stats["kv_blocks_total"]


STATS_KEYS = {"steps", "mean_step_time", "tokens_per_step", "real_tokens", "padded_tokens", "padding_ratio",
              "prefill_tokens", "decode_tokens", "verify_tokens", "step_seconds", "host_plan_seconds",
              "device_seconds", "host_output_seconds", "generated_tokens", "preemptions", "finished", "errors",
              "aborted", "running", "waiting", "compiles", "compile_seconds", "startup_seconds", "kv_blocks_total",
              "kv_blocks_free", "kv_blocks_cached", "prefix_lookups", "prefix_lookup_tokens", "prefix_hit_tokens",
              "prefix_cache_hit_rate", "prefix_block_hit_tokens", "prefix_copies", "prefix_evicted_blocks",
              "spec_verify_runs", "spec_drafted_tokens", "spec_accepted_tokens", "spec_acceptance_rate",
              "spec_mean_accepted_length", "weight_bytes", "peak_rss_bytes", "activation_quant"}


def test_stats_snapshot_has_the_documented_keys_and_counters_add_up(tiny_model):
    """LLM.stats (EngineStats.snapshot) has exactly the keys its docstring names, and after a generate with
    speculation, a bad prompt and a prefix hit its counters agree with each other and with the outputs. The
    model has 24 token ids, so its greedy text soon loops and prompt-lookup drafts get verified."""
    cfg = dataclasses.replace(tiny_model.config, vocab_size=24)
    loopy = dataclasses.replace(tiny_model, name="loopy", config=cfg,
                                params=init_params(cfg, jax.random.key(1), scale=0.2))
    llm = LLM(loopy, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, progress=False,
              speculative={"num_draft_tokens": 3, "min_n": 1, "max_n": 3, "adaptive": False})
    rng = np.random.default_rng(7)
    ps = [rng.integers(3, 24, n).tolist() for n in (5, 17, 40)] + [[5, 6, 7, 8] * 5]
    ps.append(ps[2][:30] + [11, 12])                            # shares whole blocks with an earlier prompt
    outs = llm.generate(ps + [[]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    s = llm.stats
    assert set(s) == STATS_KEYS and all(key in type(llm).stats.__doc__ for key in s)
    assert s["prefill_tokens"] + s["decode_tokens"] + s["verify_tokens"] == s["real_tokens"] > 0
    assert s["weight_bytes"] == sum(leaf.nbytes for leaf in jax.tree.leaves(llm.engine.runner.params))
    assert s["peak_rss_bytes"] > s["weight_bytes"] > 0
    assert s["verify_tokens"] == s["spec_verify_runs"] + s["spec_drafted_tokens"] and s["spec_accepted_tokens"] > 0
    # every request's first token ends its prompt; then one per decode, 1 + accepted drafts per verify run
    assert s["generated_tokens"] == sum(len(o.token_ids) for o in outs) == len(ps) * 12
    assert s["generated_tokens"] == len(ps) + s["decode_tokens"] + s["spec_verify_runs"] + s["spec_accepted_tokens"]
    assert s["prefill_tokens"] == sum(map(len, ps)) - s["prefix_hit_tokens"] and s["prefix_hit_tokens"] > 0
    assert s["prefix_lookups"] == len(ps) and s["prefix_lookup_tokens"] == sum(map(len, ps))
    assert (s["finished"], s["errors"], s["aborted"], s["running"], s["waiting"], s["preemptions"]) == (
        len(ps), 1, 0, 0, 0, 0)
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["compiles"] == len(llm.engine.config.token_buckets)
    assert s["tokens_per_step"] == s["real_tokens"] / s["steps"]
    assert s["padding_ratio"] == s["padded_tokens"] / s["real_tokens"]
    assert s["step_seconds"] >= s["device_seconds"] > 0 and s["host_plan_seconds"] > 0 and s["host_output_seconds"] > 0


def test_gpu_refuses_the_cpu_only_ffi_backends(monkeypatch):
    """On a GPU (jax's default backend "gpu", simulated: the check reads only that) the defaults are xla, and the ffi
    backends (C++ CPU custom calls, MKL) fail at once with an error naming the option, not inside XLA's compile."""
    from xyjax.engine.config import EngineConfig

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = EngineConfig()
    assert (config.attention_backend, config.gemm_backend) == ("xla", "xla")
    EngineConfig(attention_backend="pallas", gemm_backend="pallas", weight_layout="blocks", activation_quant="int8")
    for options, named in (({"attention_backend": "ffi"}, "attention_backend='ffi'"),
                           ({"gemm_backend": "ffi", "attention_backend": "pallas"}, "gemm_backend='ffi'")):
        with pytest.raises(ValueError, match=f"{named}.*C\\+\\+ CPU kernels.*'gpu'"):
            EngineConfig(**options)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    EngineConfig(attention_backend="ffi")
