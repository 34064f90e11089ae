"""The real default model through the user-facing surfaces: `xyjax generate`, `xyjax bench`, the server."""

import subprocess
import sys

import pytest

from helpers import start_server


def test_generate_streams_greedy_text_matching_the_api(default_llm):
    from xyjax import SamplingParams

    cmd = [sys.executable, "-m", "xyjax.cli", "generate", "The capital of France is", "--max-tokens", "12"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = default_llm.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert done.stdout == expected.text + "\n"
    assert "tok/s" in done.stderr


def test_xyjax_bench_runs_both_systems_and_writes_json(default_llm, tmp_path):
    """`xyjax bench` on the real default model (a 3-request slice): both systems do the same work."""
    import json

    from xyjax.bench.runs import bench

    result = bench("lognormal", num_requests=3, seed=5, naive_batch_sizes=(2,), out_dir=str(tmp_path), progress=False,
                   llm=default_llm)
    with open(result["path"]) as f:
        saved = json.load(f)
    ours, naive = saved["systems"]["xyjax"], saved["systems"]["naive (batch 2)"]
    assert ours["num_requests"] == naive["num_requests"] == 3
    assert ours["prompt_tokens"] == naive["prompt_tokens"] and ours["output_tokens"] == naive["output_tokens"]
    assert ours["compiles_during_run"] == 0 and ours["total_tokens_per_s"] > 0 and naive["total_tokens_per_s"] > 0
    assert ours["ttft_p50"] <= ours["ttft_p99"]
    parts = ours["breakdown"]          # replayed recorded steps: each part timed on its own
    assert parts["recorded_steps"] >= 1 and min(parts["gemm"], parts["attention"], parts["sampling"]) > 0
    assert parts["step"] > 0 and ours["step_device"] > 0 and ours["step_host_plan"] > 0
    assert saved["machine"]["sgemm_gflops"] > 0 and saved["machine"]["read_gbps"] > 0
    assert 0 < ours["total_tokens_per_s"] < saved["roofline"]["tokens_per_s"]


def test_chat_with_the_default_model_matches_the_llm_api(default_llm, tmp_path):
    pytest.importorskip("openai")
    from xyjax import SamplingParams

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    server = start_server("smollm2-135m-instruct", str(tmp_path / "log"), name="smollm2")
    try:
        reply = server.client().chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                                        temperature=0).choices[0].message.content
    finally:
        assert server.stop() == 0
    assert "Paris" in reply
    assert reply == default_llm.chat(messages, SamplingParams(max_tokens=24, temperature=0)).text
