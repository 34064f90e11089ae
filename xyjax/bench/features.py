"""``xyjax bench-features``: what the OpenAI API's sampling features cost a serving engine.

The lognormal workload (``xyjax.bench.workload``) on one engine, twice: every request plain (greedy, exact output
lengths), then every other request with presence, frequency and repetition penalties and a structured output (the
regex ``[ -~]*``, printable ASCII, which never completes; with ``min_tokens`` = ``max_tokens`` every request still
ends at its exact length). Prints total tok/s and host and device ms per step of both, and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses

from xyjax.bench.runs import greedy_exact, run_engine
from xyjax.bench.workload import WORKLOADS, make_requests, summarize, write_result
from xyjax.engine.sampling_params import SamplingParams

FEATURES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1,
                structured_outputs={"regex": "[ -~]*"})


def with_features(index: int, request) -> SamplingParams:
    """Greedy at the exact length; every other request with the penalties and the regex."""
    if index % 2 == 0:
        return greedy_exact(index, request)
    return SamplingParams(max_tokens=request.output_len, min_tokens=request.output_len, temperature=0,
                          ignore_eos=True, **FEATURES)


def bench_features(llm, requests, progress: bool = True) -> dict:
    """{"plain": figures, "features": figures} of the same ``requests`` (``BenchRequest``s)."""
    result = {}
    for name, sampling in (("plain", greedy_exact), ("features", with_features)):
        records, stats = run_engine(llm, requests, progress, sampling)
        result[name] = dict(summarize(records, stats["wall_time"]), **stats)
    return result


def main(argv: list[str] | None = None) -> int:
    from xyjax import LLM

    parser = argparse.ArgumentParser(prog="xyjax bench-features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = parser.parse_args(argv)
    llm = LLM(args.model, progress=False)
    workload = dataclasses.replace(WORKLOADS["lognormal"], num_requests=args.num_requests, seed=args.seed)
    result = bench_features(llm, make_requests(workload, llm.model.config.vocab_size))
    print("| run | total tok/s | host plan ms/step | device ms/step | host output ms/step | compiles during run |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in result.items():
        print(f"| {name} | {r['total_tokens_per_s']:.1f} | {1e3 * r['step_host_plan']:.2f} | "
              f"{1e3 * r['step_device']:.2f} | {1e3 * r['step_host_output']:.2f} | {r['compiles_during_run']} |")
    write_result(args.out, "features", result)
    return 0
