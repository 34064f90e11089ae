"""``xyjax bench``: run a workload through the engine and, in the same process and run, the naive baseline.

Both systems get identical token-id prompts and output lengths (``ignore_eos``, greedy, float32, the same
weights). Compilation is excluded from both: the engine compiles its buckets at start, the baseline
compiles every shape it needs before its clock starts. Results: a table on stdout and a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from tqdm import tqdm

from xyjax.bench.breakdown import device_breakdown, recording
from xyjax.bench.naive import NaiveGenerator
from xyjax.bench.roofline import machine_limits, params_bytes, roofline, workload_work
from xyjax.bench.workload import WORKLOADS, BenchRequest, make_requests, summarize
from xyjax.engine.sampling_params import SamplingParams


def greedy_exact(index: int, request: BenchRequest) -> SamplingParams:
    """The bench's sampling: greedy, exactly the request's output length."""
    return SamplingParams(max_tokens=request.output_len, temperature=0, ignore_eos=True)


def run_engine(llm, requests: list[BenchRequest], progress: bool = True,
               sampling=greedy_exact) -> tuple[list[dict], dict]:
    """Feed ``requests`` to ``llm.engine`` at their arrival times (seconds from the start) and step until all
    finish (``sampling(i, request)``: request i's SamplingParams, which must end it at its output length).
    Returns per-request records (see ``summarize``) and engine figures for the run."""
    engine = llm.engine
    before = dict(llm.stats)
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    ids, finish, first = {}, {}, {}
    t0 = time.perf_counter()
    with tqdm(total=len(requests), desc="xyjax", unit="req", disable=not progress) as bar:
        while pending or engine.has_unfinished():
            now = time.perf_counter() - t0
            while pending and requests[pending[0]].arrival <= now:
                i = pending.pop(0)
                r = requests[i]
                ids[engine.add_request(r.prompt_token_ids, sampling(i, r))] = i
            if not engine.has_unfinished():
                time.sleep(max(0.0, requests[pending[0]].arrival - now))
                continue
            for delta in engine.step():
                i = ids[delta.request_id]
                if delta.token_ids and i not in first:
                    first[i] = delta.metrics.first_token_time - t0
                if delta.finished:
                    if delta.finish_reason != "length":
                        raise RuntimeError(f"bench request {i} ended with {delta.finish_reason}: {delta.error}")
                    finish[i] = delta.metrics.finished_time - t0
                    bar.update()
    wall = time.perf_counter() - t0
    after = llm.stats
    records = [dict(arrival=r.arrival, first_token=first[i], finish=finish[i], prompt_len=len(r.prompt_token_ids),
                    output_len=r.output_len) for i, r in enumerate(requests)]
    delta = {k: after[k] - before[k] for k in ("steps", "step_seconds", "real_tokens", "padded_tokens",
                                               "preemptions", "compiles", "host_plan_seconds", "device_seconds",
                                               "host_output_seconds")}
    stats = dict(wall_time=wall, steps=delta["steps"], compiles_during_run=delta["compiles"],
                 compiles_total=after["compiles"], startup_seconds=after["startup_seconds"],
                 tokens_per_step=delta["real_tokens"] / max(delta["steps"], 1),
                 padding_ratio=delta["padded_tokens"] / max(delta["real_tokens"], 1),
                 preemptions=delta["preemptions"], mean_step_time=delta["step_seconds"] / max(delta["steps"], 1),
                 step_host_plan=delta["host_plan_seconds"] / max(delta["steps"], 1),
                 step_device=delta["device_seconds"] / max(delta["steps"], 1),
                 step_host_output=delta["host_output_seconds"] / max(delta["steps"], 1))
    return records, stats


def run_systems(requests: list[BenchRequest], llm, naive_batch_sizes, peers, model, progress: bool,
                breakdown: bool = False) -> tuple[dict, dict]:
    """``requests`` on xyjax, the naive baseline at each batch size and each available peer. Returns
    ({system: figures, stats and per-request records}, {peer left out: how to install it, or how it failed}). ``breakdown``:
    also split xyjax's device step time (``xyjax.bench.breakdown``) by replaying a sample of its steps."""
    from xyjax.bench.peers import PEERS, PeerUnavailable

    def entry(records, stats, **extra):
        return dict(summarize(records, stats["wall_time"]), **stats, **extra, records=records)

    with recording(llm.engine) as recorded:
        systems, skipped = {"xyjax": entry(*run_engine(llm, requests, progress))}, {}
    if breakdown:
        systems["xyjax"]["breakdown"] = device_breakdown(llm.engine, recorded)
    for batch_size in naive_batch_sizes:
        records, stats = NaiveGenerator(llm.model.config, llm.model.params).run(requests, batch_size, progress)
        stats["padding_ratio"] = (stats["computed_tokens"] - stats["real_tokens"]) / max(stats["real_tokens"], 1)
        systems[f"naive (batch {batch_size})"] = entry(records, stats)
    for name in peers:
        try:
            PEERS[name].python()
        except PeerUnavailable as e:
            skipped[name] = str(e)
            print(f"xyjax bench: skipping peer {name}: {e}")
            continue
        try:
            out = PEERS[name].run(requests, PEERS[name].model_path(model, llm.model))
        except RuntimeError as e:         # a crashed peer (e.g. killed for memory) costs its row, not the run
            skipped[name] = str(e)
            print(f"xyjax bench: peer {name} failed, left out: {e}")
            continue
        systems[name] = entry(out["records"], out["stats"], system=out["system"], settings=out["settings"])
    return systems, skipped


def bench(workload: str = "lognormal", num_requests: int | None = None, rate: float | None = None, seed: int = 0,
          naive_batch_sizes: tuple[int, ...] = (16,), out_dir: str = "bench-results", model: str | None = None,
          progress: bool = True, llm=None, peers: tuple[str, ...] = (), rates: tuple[float, ...] = (),
          **engine_options) -> dict:
    """Run ``workload`` (a name in WORKLOADS, overridden by num_requests / rate / seed) on xyjax, the naive
    baseline at each of ``naive_batch_sizes`` (none: skip it) and each peer of ``peers`` (names in
    ``xyjax.bench.peers.PEERS``, each in its own process; one not installed is skipped with a message). With
    ``rates``, also sweep Poisson arrival rates (requests/s) on xyjax and the peers. Prints a table, writes
    ``<out_dir>/bench-<workload>-<time>.json`` and PNG plots beside it, returns the result dict.
    ``llm``: an already built LLM (else one is built from ``model`` and ``engine_options``)."""
    from xyjax import LLM
    from xyjax.bench import plots

    w = WORKLOADS[workload]
    overrides = {k: v for k, v in dict(num_requests=num_requests, rate=rate, seed=seed).items() if v is not None}
    w = dataclasses.replace(w, **overrides)
    llm = llm or LLM(model, progress=progress, **engine_options)
    cfg = llm.model.config
    requests = make_requests(w, cfg.vocab_size)
    limits = machine_limits()
    work = workload_work(cfg, requests, params_bytes(llm.model.params))
    bound = roofline(work, limits, sum(len(r.prompt_token_ids) + r.output_len for r in requests))
    systems, skipped = run_systems(requests, llm, naive_batch_sizes, peers, model, progress, breakdown=True)
    print(table(systems, bound["tokens_per_s"]))
    print(step_breakdown(systems["xyjax"]))
    print(roofline_line(limits, work, bound))
    sweep = {}
    for r in tqdm(rates, desc="request rates", disable=not progress or not rates):
        at_rate, _ = run_systems(make_requests(dataclasses.replace(w, rate=r), cfg.vocab_size), llm, (), peers, model, progress)
        for name, s in at_rate.items():
            sweep.setdefault(name, []).append(dict({k: v for k, v in s.items() if k != "records"}, rate=r))
    result = dict(workload=dataclasses.asdict(w), model=llm.model.name,
                  engine_options=dict(engine_options, max_num_batched_tokens=llm.engine.config.max_num_batched_tokens,
                                      token_buckets=list(llm.engine.config.token_buckets)),
                  machine=limits, work=work, roofline=bound, systems=systems, skipped=skipped, rate_sweep=sweep)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench-{workload}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    figures = plots.save_all(result, path[:-len(".json")])
    print(f"wrote {path} and {', '.join(figures)}")
    result["path"], result["plots"] = path, figures
    return result


def table(systems: dict, ceiling: float) -> str:
    """Markdown table: throughput (and its fraction of the ``ceiling`` tok/s), latency percentiles and the ratio
    to xyjax."""
    base = systems["xyjax"]["total_tokens_per_s"]
    lines = ["| system | total tok/s | of roofline | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | "
             "padding | compiles | xyjax speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in systems.items():
        compiles = s.get("compiles_during_run", "-")
        padding = f"{s['padding_ratio']:.2f}" if "padding_ratio" in s else "-"
        lines.append(f"| {name} | {s['total_tokens_per_s']:.1f} | {s['total_tokens_per_s'] / ceiling:.0%} | "
                     f"{s['output_tokens_per_s']:.1f} | "
                     f"{s['ttft_p50']:.2f} / {s['ttft_p99']:.2f} | {1e3 * s['tpot_p50']:.0f} / {1e3 * s['tpot_p99']:.0f} | "
                     f"{padding} | {compiles} | {base / s['total_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def step_breakdown(s: dict) -> str:
    """One line: xyjax's mean step split into host planning, GEMM, attention, sampling, rest of the model and
    host output handling (ms), from the run's timers and the replayed device breakdown."""
    b = s["breakdown"]
    scale = s["step_device"] / b["step"] if b["step"] else 0.0   # replay -> in-run device time
    parts = dict(host_plan=s["step_host_plan"], gemm=b["gemm"] * scale, attention=b["attention"] * scale,
                 sampling=b["sampling"] * scale, other_model=b["other"] * scale, host_output=s["step_host_output"])
    total = sum(parts.values())
    return "xyjax mean step: " + ", ".join(f"{k} {1e3 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items())


def roofline_line(limits: dict, work: dict, bound: dict) -> str:
    """One line: the machine's measured limits, the workload's arithmetic and the bound they give."""
    return (f"roofline: {limits['cpus']} cores, sgemm {limits['sgemm_gflops']:.0f} GFLOP/s, read "
            f"{limits['read_gbps']:.1f} GB/s, copy {limits['copy_gbps']:.1f} GB/s; workload {work['flops'] / 1e12:.2f} "
            f"TFLOP (dense {work['dense_flops'] / 1e12:.2f}, attention {work['attention_flops'] / 1e12:.2f}, LM head "
            f"{work['lm_head_flops'] / 1e12:.2f}) >= {bound['compute_seconds']:.1f} s; >= {work['min_steps']} steps x "
            f"{work['weight_bytes'] / 1e6:.0f} MB of weights >= {bound['memory_seconds']:.1f} s; ceiling "
            f"{bound['tokens_per_s']:.0f} tok/s")
