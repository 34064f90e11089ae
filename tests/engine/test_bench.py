"""Benchmark workloads, metrics and the naive padded baseline (tiny random-weight model)."""

import dataclasses
import functools
import json
import os
import sys

import jax
import numpy as np
import pytest

from helpers import gguf_block_bytes
from models.llama import forward
from models.weights import DENSE
from xyjax.bench import WORKLOADS, NaiveGenerator, Workload, make_requests, summarize
from xyjax.ops.gemm.formats import GGUFBlocks
from xyjax.ops.kv_cache import KVCache
from xyjax.ops.step_inputs import StepInputs
from xyjax.ops.attention.tiling import attention_metadata

VOCAB = 49152


def test_workload_is_deterministic_per_seed():
    w = dataclasses.replace(WORKLOADS["lognormal"], num_requests=16, rate=4.0)
    a, b = make_requests(w, VOCAB), make_requests(w, VOCAB)
    assert a == b
    c = make_requests(dataclasses.replace(w, seed=1), VOCAB)
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    assert [r.output_len for r in a] != [r.output_len for r in c]
    # the rate only moves arrivals
    d = make_requests(dataclasses.replace(w, rate=None), VOCAB)
    assert [(r.prompt_token_ids, r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len) for r in d]
    assert all(r.arrival == 0.0 for r in d)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_lengths_and_ids_within_bounds(name):
    w = dataclasses.replace(WORKLOADS[name], num_requests=300)
    reqs = make_requests(w, VOCAB)
    assert len(reqs) == 300
    tails = np.array([len(r.prompt_token_ids) - w.shared_prefix for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert tails.min() >= w.prompt_min and tails.max() <= w.prompt_max
    assert outs.min() >= w.output_min and outs.max() <= w.output_max
    assert abs(np.median(tails) - w.prompt_median) < 0.2 * w.prompt_median
    assert abs(np.median(outs) - w.output_median) < 0.2 * w.output_median
    ids = np.concatenate([r.prompt_token_ids for r in reqs])
    assert ids.min() >= w.token_low and ids.max() < VOCAB


def test_poisson_arrivals():
    w = Workload("poisson", num_requests=4000, rate=8.0)
    arrivals = np.array([r.arrival for r in make_requests(w, VOCAB)])
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 8.0) < 0.1 / 8.0
    assert abs(gaps.std() - 1 / 8.0) < 0.15 / 8.0   # exponential: std == mean


def test_shared_prefix():
    w = dataclasses.replace(WORKLOADS["shared-prefix"], num_requests=8)
    reqs = make_requests(w, VOCAB)
    prefix = reqs[0].prompt_token_ids[:256]
    assert all(r.prompt_token_ids[:256] == prefix for r in reqs)
    assert len({tuple(r.prompt_token_ids[256:]) for r in reqs}) == 8


def test_summarize_hand_computed():
    records = [
        dict(arrival=0.0, first_token=1.0, finish=3.0, prompt_len=10, output_len=5),   # ttft 1, tpot 0.5
        dict(arrival=1.0, first_token=1.5, finish=2.5, prompt_len=20, output_len=3),   # ttft 0.5, tpot 0.5
        dict(arrival=2.0, first_token=4.0, finish=4.0, prompt_len=30, output_len=1),   # ttft 2, no tpot
    ]
    s = summarize(records, wall_time=4.0)
    assert s["num_requests"] == 3 and s["prompt_tokens"] == 60 and s["output_tokens"] == 9
    assert s["total_tokens_per_s"] == pytest.approx(69 / 4)
    assert s["output_tokens_per_s"] == pytest.approx(9 / 4)
    assert s["ttft_p50"] == pytest.approx(1.0)
    assert s["ttft_p99"] == pytest.approx(1.0 + 0.98 * 1.0)   # between 1 and 2, 98% of the way
    assert s["tpot_p50"] == pytest.approx(0.5) and s["tpot_p99"] == pytest.approx(0.5)


@functools.lru_cache(maxsize=None)
def _model_step(cfg):
    return jax.jit(functools.partial(forward, cfg=cfg))


def _reference_greedy(model, prompt: list[int], n: int, bucket: int = 128, block: int = 16) -> list[int]:
    """Greedy continuation with ``models.llama.forward``, recomputing the whole sequence for every token."""
    cfg, ids = model.config, list(prompt)
    for _ in range(n):
        length = len(ids)
        kv = KVCache.create(cfg.num_layers, bucket // block, block, cfg.num_kv_heads, cfg.head_dim)
        pad = lambda a, fill: np.concatenate([a, np.full(bucket - length, fill)]).astype(np.int32)  # noqa: E731
        meta = attention_metadata([0], [length], [length], np.arange(bucket // block)[None],
                                  num_kv_heads=cfg.num_kv_heads, num_tokens=bucket)
        inputs = StepInputs(token_ids=pad(np.array(ids), 0), positions=pad(np.arange(length), 0),
                            slot_mapping=pad(np.arange(length), -1), num_tokens=np.int32(length), attention=meta,
                            sample_index=np.array([length - 1], np.int32), num_samples=np.int32(1))
        logits, _ = _model_step(cfg)(model.params, kv, inputs)
        ids.append(int(np.argmax(logits[0])))
    return ids[len(prompt):]


def test_naive_matches_model_despite_left_padding(tiny_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(256, VOCAB, n).tolist() for n in (5, 37, 70)]   # 70 pads the batch to 128
    output_lens = [6, 3, 8]
    gen = NaiveGenerator(tiny_model.config, tiny_model.params)
    outs = gen.generate(prompts, output_lens)
    assert [len(o) for o in outs] == output_lens
    for prompt, n, out in zip(prompts, output_lens, outs):
        assert out == _reference_greedy(tiny_model, prompt, n)


def test_naive_run_records(tiny_model):
    w = Workload("tiny", num_requests=5, prompt_median=20, prompt_min=4, prompt_max=40, output_median=4,
                 output_min=2, output_max=6)
    reqs = make_requests(w, VOCAB)
    records, stats = NaiveGenerator(tiny_model.config, tiny_model.params).run(reqs, batch_size=2, progress=False)
    assert [(r["prompt_len"], r["output_len"]) for r in records] == \
        [(len(r.prompt_token_ids), r.output_len) for r in reqs]
    for r in records:
        assert 0 <= r["arrival"] <= r["first_token"] <= r["finish"] <= stats["wall_time"]
    assert stats["real_tokens"] == sum(r["prompt_len"] + r["output_len"] for r in records)
    assert stats["computed_tokens"] > stats["real_tokens"] and stats["compile_time"] > 0
    assert summarize(records, stats["wall_time"])["num_requests"] == 5


def test_roofline_counts_the_workload_by_hand(tiny_model):
    """Dense FLOPs per token are twice the GEMM weights' parameters; a 3-token prompt with 2 outputs computes 4
    positions (the last output is never fed back), 1 + 2 + 3 + 4 causal pairs and 2 LM-head rows."""
    from models.weights import DENSE
    from xyjax.bench.roofline import dense_flops_per_token, params_bytes, roofline, workload_work
    from xyjax.bench.workload import BenchRequest

    cfg, params = tiny_model.config, tiny_model.params
    gemm_params = sum(params["layers"][name].size for name in DENSE)
    assert dense_flops_per_token(cfg) == 2 * gemm_params
    weight_bytes = params_bytes(params)
    assert weight_bytes == 4 * sum(x.size for x in jax.tree.leaves(params))
    requests = [BenchRequest([5, 6, 7], 2, 0.0), BenchRequest([5], 1, 0.0)]
    work = workload_work(cfg, requests, weight_bytes)
    assert work["tokens_computed"] == 4 + 1 and work["min_steps"] == 2
    assert work["dense_flops"] == 5 * 2 * gemm_params
    assert work["attention_flops"] == 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * (10 + 1)
    assert work["lm_head_flops"] == 2 * cfg.hidden_size * cfg.vocab_size * 3
    limits = dict(sgemm_gflops=work["flops"] / 1e9 / 2.0, read_gbps=weight_bytes / 1e9)   # 2 s and 2 x 1 s
    bound = roofline(work, limits, total_tokens=7)
    assert bound["compute_seconds"] == pytest.approx(2.0) and bound["memory_seconds"] == pytest.approx(2.0)
    assert bound["tokens_per_s"] == pytest.approx(3.5)


def test_peers_run_through_the_protocol_and_missing_ones_are_skipped(tiny_model, tmp_path, monkeypatch):
    """The hf peer (transformers, static batches) runs the identical workload in its own process from the
    exported HF directory; a vLLM peer that is not installed is skipped with how to install it."""
    import json

    import ref_venv

    ref_venv.python()   # the hf peers run in the HF reference environment; skips without it
    from xyjax import LLM
    from xyjax.bench.peers import PEERS, Peer
    from xyjax.bench.runs import bench

    monkeypatch.setenv("XYJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XYJAX_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    monkeypatch.setitem(PEERS, "crashing", Peer("crashing", "no_such_peer.py", lambda: sys.executable))
    llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=64, max_num_seqs=4, progress=False)
    result = bench("lognormal", num_requests=3, seed=2, naive_batch_sizes=(), out_dir=str(tmp_path), progress=False,
                   llm=llm, peers=("hf", "hf-continuous", "vllm", "crashing"))
    saved = json.load(open(result["path"]))
    assert set(saved["systems"]) == {"xyjax", "hf", "hf-continuous"}
    assert "make vllm-env" in saved["skipped"]["vllm"]
    assert "peer crashing failed" in saved["skipped"]["crashing"]   # a crashed peer is left out, the run goes on
    ours = saved["systems"]["xyjax"]
    for mode, name in (("static", "hf"), ("continuous", "hf-continuous")):
        hf = saved["systems"][name]
        assert hf["prompt_tokens"] == ours["prompt_tokens"] and hf["output_tokens"] == ours["output_tokens"]
        assert hf["system"].startswith("transformers") and hf["settings"]["mode"] == mode
        assert 0 < hf["ttft_p50"] <= hf["ttft_p99"] and hf["total_tokens_per_s"] > 0


def test_peer_protocol_records_and_failures(tmp_path):
    """A peer script's OUT.json comes back as written and is summarised like any system; a failing peer's
    output is in the error."""
    import sys

    from xyjax.bench import BenchRequest
    from xyjax.bench.peers import Peer

    script = tmp_path / "fake_peer.py"
    script.write_text(
        "import argparse, json\n"
        "p = argparse.ArgumentParser(); [p.add_argument(a) for a in ('--model-dir', '--requests', '--out')]\n"
        "a = p.parse_args(); reqs = json.load(open(a.requests))['requests']\n"
        "if a.model_dir == 'bad': raise SystemExit('peer exploded')\n"
        "recs = [dict(arrival=r['arrival'], first_token=r['arrival'] + 1.0, finish=r['arrival'] + 1.0 + 0.1 * "
        "(r['output_len'] - 1), prompt_len=len(r['prompt_token_ids']), output_len=r['output_len']) for r in reqs]\n"
        "json.dump(dict(system='fake 1', settings={}, stats=dict(wall_time=4.0), records=recs), open(a.out, 'w'))\n")
    peer = Peer("fake", str(script), lambda: sys.executable)
    requests = [BenchRequest([5] * 10, 3, 0.0), BenchRequest([6] * 30, 5, 1.0)]
    out = peer.run(requests, "model")
    figures = summarize(out["records"], out["stats"]["wall_time"])
    assert figures["prompt_tokens"] == 40 and figures["output_tokens"] == 8
    assert figures["total_tokens_per_s"] == pytest.approx(48 / 4.0)
    assert figures["ttft_p50"] == pytest.approx(1.0) and figures["tpot_p99"] == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="peer exploded"):
        peer.run(requests, "bad")


def _llamacpp_peer_module():
    import importlib.util

    from xyjax.bench import peers

    spec = importlib.util.spec_from_file_location("llamacpp_peer", f"{peers.HERE}/llamacpp_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("peer,variable", [("llamacpp", "XYJAX_LLAMACPP_BIN"), ("openvino", "XYJAX_OPENVINO_PYTHON")])
def test_native_peers_are_skipped_when_not_built(peer, variable, tiny_model, tmp_path, monkeypatch):
    """Without its build (llama-server and llama-bench; .venv-openvino) a peer is left out with how to build it; a
    model that is no GGUF file (the in-memory tiny model) has no path for llama.cpp."""
    from xyjax import LLM
    from xyjax.bench.peers import PEERS, PeerUnavailable, gguf_file
    from xyjax.bench.runs import run_systems

    monkeypatch.setenv(variable, str(tmp_path / "no-such-path"))
    with pytest.raises(PeerUnavailable, match=f"make {peer}-env"):
        PEERS[peer].python()
    with pytest.raises(RuntimeError, match="GGUF"):
        gguf_file(None, tiny_model)
    llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=64, max_num_seqs=4, progress=False)
    requests = make_requests(Workload("tiny", num_requests=2, prompt_median=8, prompt_min=4, prompt_max=12,
                                      output_median=3, output_min=2, output_max=4), VOCAB)
    systems, skipped = run_systems(requests, llm, (), (peer,), None, progress=False)
    assert set(systems) == {"xyjax"} and f"make {peer}-env" in skipped[peer]


def test_llamacpp_peer_translates_requests_and_streams():
    """The /completion body carries the exact token ids and greedy, ignore-EOS, uncached settings; a streamed
    answer becomes a protocol record (first token at the first event with a token, finish at ``stop``)."""
    peer = _llamacpp_peer_module()
    request = dict(prompt_token_ids=[300, 301, 302], output_len=3, arrival=0.5)
    body = peer.completion_payload(request)
    assert body["prompt"] == [300, 301, 302] and body["n_predict"] == 3 and body["temperature"] == 0
    assert body["ignore_eos"] is True and body["cache_prompt"] is False and body["stream"] is True
    assert peer.context_size([request, dict(request, output_len=10)], slots=4) == 4 * (13 + 16)
    cmd = peer.server_command("/bin", "m.gguf", 8123, 4, 116, 2)
    assert cmd[0] == "/bin/llama-server" and cmd[cmd.index("--parallel") + 1] == "4"
    assert cmd[cmd.index("--ctx-size") + 1] == "116" and "--cont-batching" in cmd
    assert cmd[cmd.index("-m") + 1] == "m.gguf"

    def event(**fields):
        return ("data: " + json.dumps(fields) + "\n").encode()

    stream = [(0.6, b": ping\n"), (0.7, event(content="", tokens=[], stop=False)),
              (0.9, event(content="a", tokens=[7], stop=False, tokens_predicted=1)), (1.0, b"\n"),
              (1.1, event(content="b", tokens=[8], stop=False, tokens_predicted=2)),
              (1.3, event(content="c", tokens=[9], stop=False, tokens_predicted=3)),
              (1.4, event(content="", tokens=[], stop=True, tokens_predicted=3, timings={})), (1.5, b"data: [DONE]\n")]
    record = peer.record(request, peer.sse_events(stream))
    assert record == dict(arrival=0.5, first_token=0.9, finish=1.4, prompt_len=3, output_len=3,
                          output_token_ids=[7, 8, 9])
    assert summarize([record], 2.0)["ttft_p50"] == pytest.approx(0.4)
    with pytest.raises(RuntimeError, match="generated 2 tokens, 3 asked"):
        peer.record(request, peer.sse_events(stream[:3] + [(1.2, event(content="", stop=True, tokens_predicted=2))]))
    with pytest.raises(RuntimeError, match="without a token or a stop"):
        peer.record(request, peer.sse_events(stream[:3]))
    with pytest.raises(RuntimeError, match="llama-server: .*too long"):
        peer.record(request, peer.sse_events([(0.6, event(error=dict(message="too long")))]))


def test_bench_single_parses_llama_bench_and_times_xyjax(tiny_model, tmp_path, monkeypatch):
    """llama-bench's JSON becomes pp/tg figures; xyjax's half runs on the tiny model and writes its JSON with its
    memory figures (llama.cpp and OpenVINO skipped with how to build them; no GGUF file to compare the weights with)."""
    from xyjax import LLM
    from xyjax.bench.single import bench_single, parse_llama_bench

    sample = json.dumps([dict(n_prompt=512, n_gen=0, avg_ts=900.5, stddev_ts=3.0, build_commit="abc", n_threads=2),
                         dict(n_prompt=0, n_gen=128, avg_ts=80.25, stddev_ts=0.5, build_commit="abc", n_threads=2)])
    parsed = parse_llama_bench(sample)
    assert parsed["tests"] == {"pp512": dict(n=512, mean=900.5, std=3.0), "tg128": dict(n=128, mean=80.25, std=0.5)}
    assert parsed["info"]["build_commit"] == "abc"

    monkeypatch.setenv("XYJAX_LLAMACPP_BIN", str(tmp_path / "no-such-dir"))
    monkeypatch.setenv("XYJAX_OPENVINO_PYTHON", str(tmp_path / "no-such-python"))
    llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=64, max_num_seqs=4, progress=False)
    result = bench_single(prompt_len=24, gen_len=5, repetitions=2, out_dir=str(tmp_path), llm=llm)
    saved = json.load(open(result["path"]))
    tests = saved["systems"]["xyjax"]["tests"]
    assert set(tests) == {"pp24", "tg5"} and set(saved["systems"]) == {"xyjax"}
    assert all(len(t["runs"]) == 2 and t["mean"] > 0 for t in tests.values())
    assert "make llamacpp-env" in saved["skipped"]["llama.cpp"]
    assert "make openvino-env" in saved["skipped"]["openvino"]
    assert set(saved["memory"]) == {"weight_bytes", "peak_rss_bytes"} and saved["memory"]["weight_bytes"] > 0


def _default_gguf() -> str:
    from models import registry

    gguf = f"{registry.cache_dir()}/{registry.KNOWN_MODELS[registry.DEFAULT_MODEL].filename}"
    if not os.path.isfile(gguf):
        pytest.skip(f"the default model is not fetched ({gguf})")
    return gguf


def test_llamacpp_peer_runs_the_default_gguf(tmp_path):
    """With llama.cpp built and the default model fetched, llama-server runs a small workload to exact lengths."""
    from xyjax.bench.peers import PEERS, PeerUnavailable, llamacpp_bin

    try:
        llamacpp_bin()
    except PeerUnavailable as e:
        pytest.skip(str(e))
    gguf = _default_gguf()
    requests = make_requests(Workload("tiny", num_requests=3, prompt_median=20, prompt_min=4, prompt_max=40,
                                      output_median=6, output_min=2, output_max=8, rate=20.0), VOCAB)
    out = PEERS["llamacpp"].run(requests, gguf)
    assert out["system"].startswith("llama.cpp") and out["settings"]["parallel"] == 3
    for r, rec in zip(requests, out["records"]):
        assert rec["output_len"] == r.output_len == len(rec["output_token_ids"])
        assert r.arrival <= rec["arrival"] + 1e-9 and rec["arrival"] <= rec["first_token"] <= rec["finish"]


def test_eval_quant_scores_windows_against_the_exact_path(tiny_model):
    """eval-quant's windows are whole, BOS first; on the tiny model the exact mode agrees with itself (KL 0, top-1
    100 %) and int8 activations give a KL >= 0, both over the second halves of the windows."""
    from xyjax.bench.eval_quant import eval_quant, windows

    cut = windows(list(range(10, 30)), 8, bos=1)
    assert [w.tolist() for w in cut] == [[1, *range(11, 18)], [1, *range(19, 26)]]
    rng = np.random.default_rng(9)
    layers = {name: GGUFBlocks(gguf_block_bytes("Q8_0", np.asarray(w, np.float32), rng), "Q8_0", w.shape[-1])
              if name in DENSE else w for name, w in tiny_model.params["layers"].items()}
    model = dataclasses.replace(tiny_model, params=dict(tiny_model.params, layers=layers))
    result = eval_quant(model, ctx=64, max_windows=2, gemm_backend="xla")
    exact, int8 = result["modes"]["none"], result["modes"]["int8"]
    assert result["windows"] == 2 and exact["tokens"] == int8["tokens"] == 2 * (64 - 32 - 1)
    assert exact["kl_mean"] == exact["kl_max"] == 0 and exact["top1_agreement"] == 1
    assert 0 < int8["kl_mean"] <= int8["kl_max"] and exact["perplexity"] > 1 and int8["perplexity"] > 1


LLAMA_PERPLEXITY_KLD = """0.02.342.153 I kl_divergence: computing over 3 chunks, n_ctx=512, batch_size=512, n_seq=1
====== Perplexity statistics ======
Mean PPL(Q)                   :  16.554627 ±   2.639347
Mean PPL(base)                :  16.262807 ±   2.578772
====== KL divergence statistics ======
Mean    KLD:   0.003015 ±   0.000201
Maximum KLD:   0.021074
99.9%   KLD:   0.020931
99.0%   KLD:   0.015752
Median  KLD:   0.002177
====== Token probability statistics ======
Same top p: 95.686 ± 1.275 %
"""


def test_eval_quant_reads_llama_perplexitys_kl_report():
    """llama-perplexity --kl-divergence's report (a real run's lines) -> eval-quant's figures; a report without
    them is an error quoting it."""
    from xyjax.bench.eval_quant import parse_kld

    assert parse_kld(LLAMA_PERPLEXITY_KLD, 512) == dict(perplexity=16.554627, kl_mean=0.003015, kl_p99=0.015752,
                                                       kl_max=0.021074, top1_agreement=0.95686, tokens=3 * 255)
    with pytest.raises(RuntimeError, match="llama-perplexity printed no"):
        parse_kld("main: error: failed to load model", 512)


def test_openvino_peer_runs_the_default_gguf():
    """With .venv-openvino built and the default model fetched, OpenVINO GenAI's continuous batching pipeline runs
    a small workload to exact lengths from the token ids; in its sequential mode each request starts once the one
    before has finished."""
    from xyjax.bench.peers import PEERS, PeerUnavailable

    try:
        PEERS["openvino"].python()
    except PeerUnavailable as e:
        pytest.skip(str(e))
    gguf = _default_gguf()
    requests = make_requests(Workload("tiny", num_requests=3, prompt_median=20, prompt_min=4, prompt_max=40,
                                      output_median=6, output_min=2, output_max=8, rate=20.0), VOCAB)
    out = PEERS["openvino"].run(requests, gguf)
    assert out["system"].startswith("OpenVINO GenAI") and out["settings"]["gguf"] == gguf
    assert out["settings"]["scheduler"]["dynamic_split_fuse"] and "INFERENCE_PRECISION_HINT" in out["settings"]["cpu"]
    for r, rec in zip(requests, out["records"]):
        assert rec["output_len"] == r.output_len == len(rec["output_token_ids"])
        assert rec["prompt_len"] == len(r.prompt_token_ids)
        assert r.arrival <= rec["added"] + 1e-9 and rec["added"] <= rec["first_token"] <= rec["finish"]
    sequential = PEERS["openvino"].run(requests, gguf, ("--sequential",))["records"]
    assert [len(rec["output_token_ids"]) for rec in sequential] == [r.output_len for r in requests]
    assert all(a["finish"] <= b["added"] for a, b in zip(sequential, sequential[1:]))


def test_bench_functional_times_both_systems_and_writes_its_json(tiny_model, tmp_path):
    from xyjax import LLM
    from xyjax.bench.functional import bench_functional

    llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, progress=False)
    result = bench_functional(batch_sizes=(1, 2), prompt_len=5, gen_len=6, repetitions=1, out_dir=str(tmp_path),
                              llm=llm)
    saved = json.load(open(result["path"]))
    assert {"weight_bytes", "read_bandwidth_bytes_per_s", "weight_read_ms", "rows", "backends"} <= set(saved)
    assert saved["weight_bytes"] > 0 and saved["weight_read_ms"] > 0
    assert [(r["system"], r["batch"]) for r in saved["rows"]] == [("fused", 1), ("engine", 1), ("fused", 2),
                                                                  ("engine", 2)]
    assert all(np.isfinite([r["tok_s"], r["step_ms"], r["reads_per_step"]]).all() and len(r["runs_step_ms"]) == 1
               for r in saved["rows"])   # tok/s by difference of two short runs: noise may flip its sign here


def test_bench_features_runs_plain_and_with_features_at_exact_lengths(tiny_model):
    """bench-features: the same requests plain and with penalties and a never-ending regex on every other one; both
    runs end every request at its exact length, with no compile during either."""
    from xyjax import LLM
    from xyjax.bench.features import bench_features, with_features

    requests = make_requests(Workload("tiny", num_requests=4, prompt_median=8, prompt_min=4, prompt_max=12,
                                      output_median=5, output_min=3, output_max=8), VOCAB)
    assert with_features(0, requests[0]).structured_outputs is None
    assert with_features(1, requests[1]).structured_outputs is not None
    llm = LLM(tiny_model, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, progress=False)
    result = bench_features(llm, requests, progress=False)
    for name in ("plain", "features"):
        assert result[name]["total_tokens_per_s"] > 0 and result[name]["compiles_during_run"] == 0, name
