"""``xyjax bench-single``: single-stream prefill and decode speed, xyjax beside ``llama-bench`` and OpenVINO GenAI on
the same GGUF.

llama-bench's figures: ``pp<P>`` is the tok/s of one prefill of a P-token prompt, ``tg<G>`` the tok/s of G
decode steps, one token each, from an empty context. xyjax's, measured alike on its engine with one request
(greedy, ignore EOS, after a warm-up run of each): ``pp``: a P-token random prompt and one output token,
P / (first token - add_request); ``tg``: a one-token prompt and G + 1 output tokens, G / (finish - first token)
(the first token comes from the prefill). The mean and standard deviation over ``--repetitions`` runs, as
llama-bench reports them. llama-bench runs (when ``make llamacpp-env`` has built it) with every usable CPU as a
thread, in the same invocation, after xyjax, on the file xyjax loaded, with weight repacking off (``--repack 0``,
as the llamacpp peer: the AMX buffer type segfaults on this machine). OpenVINO GenAI runs (when ``make
openvino-env`` has built its environment) as the openvino bench peer, with its defaults (here: bf16 inference, int8
dynamic quantization of the activations, a u8 KV cache), in its ``--sequential`` mode on the same prompts as xyjax,
timed alike (from when each request is added), one more warm-up run first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np

from xyjax.bench.workload import write_result


def _timed_request(engine, prompt: list[int], max_tokens: int) -> tuple[float, float, float]:
    """(add time, first token time, finish time), perf_counter seconds, of one request run alone."""
    from xyjax.engine.sampling_params import SamplingParams

    if engine.has_unfinished():
        raise RuntimeError("bench-single needs an idle engine")
    start = time.perf_counter()
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    first = finish = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != rid:
                continue
            if out.finished:
                if out.finish_reason != "length":
                    raise RuntimeError(f"bench-single request ended with {out.finish_reason}")
                first, finish = out.metrics.first_token_time, out.metrics.finished_time
    return start, first, finish


def single_prompts(vocab: int, prompt_len: int, repetitions: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """For each run (run 0 warms up): a ``prompt_len``-token prompt of the pp test and the one-token prompt of the
    tg test, random ids from ``min(256, vocab // 2)`` up."""
    rng = np.random.default_rng(seed)
    low = min(256, vocab // 2)
    prompts = [rng.integers(low, vocab, prompt_len).tolist() for _ in range(repetitions + 1)]
    one = [[int(t)] for t in rng.integers(low, vocab, repetitions + 1)]
    return list(zip(prompts, one))


def figures(n: int, runs: list[float]) -> dict:
    return dict(n=n, mean=statistics.fmean(runs), std=statistics.stdev(runs) if len(runs) > 1 else 0.0, runs=runs)


def xyjax_single(llm, prompt_len: int = 512, gen_len: int = 128, repetitions: int = 5, seed: int = 0) -> dict:
    """pp<prompt_len> and tg<gen_len> of ``llm``'s engine, one request at a time: {test: {n, mean, std, runs}}."""
    pp, tg = [], []
    for i, (prompt, one) in enumerate(single_prompts(llm.model.config.vocab_size, prompt_len, repetitions, seed)):
        start, first, _ = _timed_request(llm.engine, prompt, 1)
        _, first_tg, finish = _timed_request(llm.engine, one, gen_len + 1)
        if i:   # run 0 warms up
            pp.append(prompt_len / (first - start))
            tg.append(gen_len / (finish - first_tg))
    return {f"pp{prompt_len}": figures(prompt_len, pp), f"tg{gen_len}": figures(gen_len, tg)}


def openvino_single(gguf: str, vocab: int, prompt_len: int = 512, gen_len: int = 128, repetitions: int = 5,
                    seed: int = 0) -> dict:
    """The same tests on OpenVINO GenAI's pipeline (the openvino peer in its ``--sequential`` mode: one request at a
    time, the same prompts, timed alike from its records): {tests, system, settings}."""
    from xyjax.bench import BenchRequest
    from xyjax.bench.peers import PEERS

    requests = [BenchRequest(p, n, 0.0) for prompt, one in single_prompts(vocab, prompt_len, repetitions, seed)
                for p, n in ((prompt, 1), (one, gen_len + 1))]
    out = PEERS["openvino"].run(requests, gguf, ("--sequential",))
    records = out["records"][2:]   # past run 0, the warm-up
    pp = [prompt_len / (r["first_token"] - r["added"]) for r in records[0::2]]
    tg = [gen_len / (r["finish"] - r["first_token"]) for r in records[1::2]]
    return dict(tests={f"pp{prompt_len}": figures(prompt_len, pp), f"tg{gen_len}": figures(gen_len, tg)},
                system=out["system"], settings=out["settings"])


def llama_bench_command(bin_dir: str, gguf: str, prompt_len: int, gen_len: int, threads: int,
                        repetitions: int) -> list[str]:
    return [os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-p", str(prompt_len), "-n", str(gen_len),
            "-t", str(threads), "-r", str(repetitions), "--repack", "0", "-o", "json"]


def parse_llama_bench(text: str) -> dict:
    """llama-bench's ``-o json`` output as {test: {n, mean, std}} (``pp<n>``, ``tg<n>``), with its build and CPU."""
    tests, info = {}, {}
    for entry in json.loads(text):
        prompt, gen = entry.get("n_prompt", 0), entry.get("n_gen", 0)
        name = f"pp{prompt}" if prompt and not gen else f"tg{gen}" if gen and not prompt else f"pp{prompt}+tg{gen}"
        tests[name] = dict(n=prompt or gen, mean=entry["avg_ts"], std=entry.get("stddev_ts", 0.0))
        info = {k: entry[k] for k in ("build_commit", "build_number", "cpu_info", "model_type", "model_size",
                                      "n_threads", "type_k", "n_batch", "n_ubatch") if k in entry}
    return dict(tests=tests, info=info)


def memory_figures(llm, model: str | None) -> dict:
    """The engine's resident weight bytes, the process's peak RSS and, for a GGUF, the file's size and the ratio
    of the weights to it."""
    from xyjax.bench.peers import gguf_file

    stats = llm.stats
    figures = dict(weight_bytes=stats["weight_bytes"], peak_rss_bytes=stats["peak_rss_bytes"])
    try:
        size = os.path.getsize(gguf_file(model, llm.model))
    except RuntimeError:   # not a GGUF: no file to compare with
        return figures
    return dict(figures, gguf_file_bytes=size, weights_over_file=stats["weight_bytes"] / size)


def table(results: dict) -> str:
    names = list(dict.fromkeys(t for r in results.values() for t in r["tests"]))
    lines = ["| system | " + " | ".join(f"{t} tok/s" for t in names) + " |", "|---" * (len(names) + 1) + "|"]
    for system, r in results.items():
        cells = [f"{r['tests'][t]['mean']:.1f} ± {r['tests'][t]['std']:.1f}" if t in r["tests"] else "-"
                 for t in names]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_single(model: str | None = None, prompt_len: int = 512, gen_len: int = 128, repetitions: int = 5,
                 out_dir: str = "bench-results", llm=None, llama_bench: bool = True, openvino: bool = True,
                 weight_layout: str = "auto", activation_quant: str = "none") -> dict:
    """xyjax's single-stream figures and, when installed, llama-bench's and OpenVINO GenAI's on the same GGUF;
    prints a table, writes ``<out_dir>/single-<time>.json`` and returns the result (``path`` added)."""
    from xyjax import LLM
    from xyjax.bench.peers import PeerUnavailable, gguf_file, llamacpp_bin, openvino_python

    llm = llm or LLM(model, progress=False, weight_layout=weight_layout, activation_quant=activation_quant)
    threads = len(os.sched_getaffinity(0))
    results = {"xyjax": dict(tests=xyjax_single(llm, prompt_len, gen_len, repetitions), info=dict(
        engine=dict(max_num_batched_tokens=llm.engine.config.max_num_batched_tokens,
                    weight_layout=llm.engine.config.weight_layout,
                    activation_quant=llm.engine.config.activation_quant,
                    token_buckets=list(llm.engine.config.token_buckets))))}
    skipped = {}

    def gguf_for(system: str, installed) -> str | None:
        """The GGUF file, once ``installed()`` finds the system; None (``system`` skipped, with why) otherwise."""
        try:
            installed()
            return gguf_file(model, llm.model)
        except (PeerUnavailable, RuntimeError) as e:
            skipped[system] = str(e)
            print(f"xyjax bench-single: skipping {system}: {e}")
            return None

    if llama_bench and (gguf := gguf_for("llama.cpp", llamacpp_bin)):
        cmd = llama_bench_command(llamacpp_bin(), gguf, prompt_len, gen_len, threads, repetitions)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        results["llama.cpp"] = dict(parse_llama_bench(done.stdout), command=cmd)
    if openvino and (gguf := gguf_for("openvino", openvino_python)):
        results["openvino"] = openvino_single(gguf, llm.model.config.vocab_size, prompt_len, gen_len, repetitions)
    print(table(results))
    memory = memory_figures(llm, model)
    print(", ".join(f"{k} {v / 2**20:.1f} MiB" if k.endswith("bytes") else f"{k} {v:.2f}" for k, v in memory.items()))
    result = dict(model=str(llm.model.name), prompt_len=prompt_len, gen_len=gen_len, repetitions=repetitions,
                  threads=threads, systems=results, skipped=skipped, memory=memory)
    path = write_result(out_dir, "single", result)
    result["path"] = path
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-single", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="known name or .gguf path (default: smollm2-135m-instruct)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of the prefill test (pp)")
    parser.add_argument("--gen-len", type=int, default=128, help="decode steps of the generation test (tg)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--no-llama-bench", action="store_true", help="leave llama.cpp's llama-bench out")
    parser.add_argument("--no-openvino", action="store_true", help="leave OpenVINO GenAI out")
    parser.add_argument("--weight-layout", default="auto", help="the engine option weight_layout (e.g. blocks)")
    parser.add_argument("--activation-quant", default="none", help="the engine option activation_quant (none, int8)")
    parser.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.gen_len < 1 or args.repetitions < 1:
        parser.error("--prompt-len, --gen-len and --repetitions must be >= 1")
    bench_single(args.model, args.prompt_len, args.gen_len, args.repetitions, args.out,
                 llama_bench=not args.no_llama_bench, openvino=not args.no_openvino, weight_layout=args.weight_layout,
                 activation_quant=args.activation_quant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
