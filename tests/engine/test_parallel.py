"""Tensor parallelism (``tensor_parallel_size``), data-parallel replicas behind one server, several processes, and
bad parallel configurations, on 4 CPU devices. The suite's process has one (a device count is fixed once jax starts,
and 4 devices measured 20-40 % slower on other engine tests on this 2-core machine), so
``test_in_a_process_with_4_devices`` runs this module in a child pytest with
``--xla_force_host_platform_device_count=4``, where the other tests run and it skips itself. TP outputs are compared token for token with
TP=1 (greedy): the psums change float32 summation order, which moves logits by ~1e-7, far from any argmax tie
here; a mismatch would show a real error."""

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from models.hf_export import export_hf
from models.llama import init_params
from models.loader import LoadedModel
from xyjax import LLM, SamplingParams
from xyjax.ops.gemm.formats import GGUFBlocks, SplitBlocks, split_inputs, split_outputs
from xyjax.server.engine_loop import Replicas

CHILD = os.environ.get("XYJAX_TEST_DEVICES") == "4"
in_child = pytest.mark.skipif(not CHILD, reason="runs in a child process with 4 CPU devices "
                                "(test_in_a_process_with_4_devices)")

# 8 query heads over 4 KV heads (GQA groups of 2), MLP 128, vocabulary 49152: all divide by 2 and 4.
CFG = dataclasses.replace(helpers.TINY, num_heads=8, num_kv_heads=4)
# One bucket keeps start-up short; the small pool (10 blocks of 16) forces preemption; up to 3 drafts per verify run
# (proposed by the test for prompts of odd length: their last output tokens, so runs are verified every step).
OPTIONS = dict(max_num_batched_tokens=32, token_buckets=(32,), max_num_seqs=4, block_size=16,
               kv_cache_memory=10 * 16 * 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4,
               max_draft_tokens=3, compilation_cache_dir="")


@pytest.fixture(scope="module")
def model(tokenizer):
    return LoadedModel(name="tiny-gqa", config=CFG, params=init_params(CFG, jax.random.key(0), scale=0.2),
                       tokenizer=tokenizer, dtype=np.dtype("float32"))


def workload():
    """Prompts with repeats (n-gram drafts hit, so verify runs happen) and a shared prefix (prefix hits), arriving
    over several steps so prefill chunks, decodes and verify runs share steps."""
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 49000, 40).tolist()
    pattern = rng.integers(3, 49000, 6).tolist()
    prompts = [shared + rng.integers(3, 49000, 5).tolist(), pattern * 5, shared + pattern, pattern * 3 + shared[:9],
               shared + rng.integers(3, 49000, 20).tolist()]
    return [0, 1, 3, 6, 9], prompts, [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * len(prompts)


def _drafts(req) -> list[int]:
    return req.output_ids[-3:] if len(req.prompt_token_ids) % 2 else []


def run(model, tp: int, backend: str):
    llm = LLM(model, progress=False, tensor_parallel_size=tp, attention_backend=backend, gemm_backend=backend,
              **OPTIONS)
    compiles = llm.stats["compiles"]
    outputs = helpers.drive(llm.engine, *workload(), drafts=_drafts)
    return [tokens for tokens, _ in outputs], llm.stats, compiles


@in_child
@pytest.mark.parametrize("backend", ["xla", "ffi"])
def test_tensor_parallel_greedy_equals_one_device(model, backend):
    base, stats, _ = run(model, 1, backend)
    # the workload exercises what must hold under TP: mixed steps, prefix hits, verify runs, preemption
    assert stats["prefix_hit_tokens"] > 0 and stats["spec_verify_runs"] > 0 and stats["preemptions"] > 0, stats
    assert stats["prefill_tokens"] and stats["decode_tokens"] and stats["verify_tokens"]
    for tp in (2, 4):
        outputs, stats, compiles = run(model, tp, backend)
        assert outputs == base, f"TP={tp} ({backend}) differs from one device"
        assert stats["compiles"] == compiles, "a step compiled while serving"
        assert stats["prefix_hit_tokens"] > 0 and stats["spec_verify_runs"] > 0 and stats["preemptions"] > 0


@in_child
def test_tensor_parallel_reads_gguf_blocks_in_place(model):
    """The ffi block kernels per shard: Q8_0 layers and embedding cut by rows and, at block boundaries, along K."""
    rng = np.random.default_rng(0)
    q8 = lambda w: GGUFBlocks(helpers.gguf_block_bytes("Q8_0", np.asarray(w, np.float32), rng), "Q8_0",  # noqa: E731
                              w.shape[-1])
    layers = {name: q8(w) if name in ("wqkv", "wo", "w_gate_up", "w_down") else w
              for name, w in model.params["layers"].items()}
    blocks = dataclasses.replace(model, params=dict(model.params, embed=q8(model.params["embed"]), layers=layers))
    base, _, _ = run(blocks, 1, "ffi")
    outputs, stats, compiles = run(blocks, 2, "ffi")
    assert outputs == base and stats["compiles"] == compiles


@in_child
def test_data_parallel_replicas_serve_concurrent_requests_as_solo(model):
    _, prompts, sampling = workload()
    solo = LLM(model, progress=False, **OPTIONS)
    expected = [o.token_ids for o in solo.generate(prompts, sampling)]
    devices = jax.devices()
    replicas = Replicas([LLM(model, progress=False, devices=devices[2 * r:2 * r + 2], tensor_parallel_size=2,
                             **OPTIONS) for r in range(2)])
    replicas.start()

    async def one(prompt, params):
        gen = await replicas.submit([(prompt, params)])
        tokens = []
        async for _, delta in gen.outputs():
            tokens += delta.token_ids
        return tokens

    async def all_at_once():
        return await asyncio.gather(*(one(p, s) for p, s in zip(prompts, sampling)))

    got = asyncio.run(all_at_once())
    replicas.close(0)
    replicas.join(timeout=30)
    assert got == expected
    finished = [loop.stats["finished"] for loop in replicas.loops]
    assert min(finished) > 0, f"least-loaded routing left a replica idle: {finished}"
    assert replicas.stats["finished"] == len(prompts) == sum(finished)
    assert b"xyjax_steps" in replicas.metrics.render()


@in_child
def test_bad_parallel_configs_fail_at_start(model):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's attention heads 8"):
        LLM(model, progress=False, tensor_parallel_size=3, **OPTIONS)
    with pytest.raises(ValueError, match="tensor_parallel_size=8 needs 8 devices, 4 available"):
        LLM(model, progress=False, tensor_parallel_size=8, **OPTIONS)
    with pytest.raises(ValueError, match="tensor parallelism shards plain matrices and GGUF blocks, not SplitBlocks"):
        split_outputs(SplitBlocks(np.zeros((4, 33), np.float32), 32), 2)
    # a row-parallel cut of GGUF blocks must fall on block boundaries: K = 64 of Q8_0 (32 per block) into 4
    blocks = GGUFBlocks(np.zeros((2, 64 // 32 * 34), np.uint8), "Q8_0", 64)
    assert [w.k for w in split_inputs(blocks, 2)] == [32, 32]
    with pytest.raises(ValueError, match="K = 64 inputs of Q8_0 blocks .* do not cut into 4 shards"):
        split_inputs(blocks, 4)


@in_child
def test_two_processes_serve_tp2_as_one_device_and_stop_when_one_dies(model, tmp_path):
    """`xyjax serve` as a jax.distributed job of two processes on 127.0.0.1 (one CPU device each, gloo): process 0
    serves and schedules, process 1 runs its steps; greedy text equals one device's. Then process 1 is killed:
    process 0 must exit with the coordination service's error within the heartbeat timeout (plus slack)."""
    directory = str(tmp_path / "tiny-gqa")
    export_hf(model, directory)
    env = dict(os.environ, XLA_FLAGS="")          # one CPU device per process
    flags = ["--tensor-parallel-size", "2", "--coordinator", f"127.0.0.1:{helpers.free_port()}", "--num-processes",
             "2", "--heartbeat-timeout", "5"]
    with open(tmp_path / "log1", "w") as log:
        follower = subprocess.Popen([sys.executable, "-m", "xyjax.cli", "serve", "--model", directory,
                                     *helpers.ENGINE_FLAGS, *flags, "--process-id", "1"], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
    try:
        server = helpers.start_server(directory, str(tmp_path / "log0"), *flags, "--process-id", "0", env=env)
        prompt = workload()[1][1]
        reply = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                   extra_body={"ignore_eos": True})
        solo = LLM(model, progress=False, **OPTIONS).generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                                                          ignore_eos=True))[0]
        assert reply.choices[0].text == solo.text
        follower.kill()
        start = time.monotonic()
        code = server.proc.wait(timeout=60)
        log0 = open(server.log).read()
        assert code != 0 and "distributed service detected fatal errors" in log0, log0[-3000:]
        assert time.monotonic() - start < 30
    finally:
        for proc in (follower, getattr(locals().get("server"), "proc", None)):
            if proc is not None and proc.poll() is None:
                proc.kill()


@pytest.mark.skipif(CHILD, reason="this is the child process")
def test_in_a_process_with_4_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", XYJAX_TEST_DEVICES="4")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                           env=env, cwd=root, capture_output=True, text=True, timeout=600)
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    assert re.search(r"\b6 passed, 1 skipped\b", child.stdout), report
