"""``xyjax bench-prefix``: token-wise prefix caching on and off, on two workloads (issue 7).

    system-prompt  ``--requests`` (64) requests: one ``--system`` (512) token system prompt, then a distinct
                   tail of uniform 32..256 tokens; all arrive at once; ``--output`` (16) tokens each
    multi-turn     ``--conversations`` (8) conversations of ``--turns`` (6) turns: a first user message of
                   64..128 tokens, each later prompt = the previous prompt + its answer (``--answer``, 32
                   tokens) + a user message of 16..64 tokens; each turn of all conversations is one batch
Prompts are seeded random token ids and outputs greedy with ignore-EOS, so caching on and off do the same work.
Per run: prefill tokens computed, hit rate (cached / prompt tokens), tokens reused by token-wise matching and
what block-granular matching (whole blocks only) would reuse of the same matches, TTFT p50/p99 (from each
batch's submission), throughput ((prompt + output) tokens / s) and whether the outputs equal the caching-off
run's. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from tqdm import tqdm

from xyjax.engine.sampling_params import SamplingParams

COUNTERS = ("prefill_tokens", "prefix_lookup_tokens", "prefix_hit_tokens", "prefix_block_hit_tokens",
            "prefix_copies", "prefix_evicted_blocks", "preemptions")


def run_batch(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Submit ``prompts`` at once and run them to the end: (output ids, TTFT in seconds) per prompt."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                        progress=False)
    return [o.token_ids for o in outs], [o.metrics.ttft for o in outs]


def system_prompt(llm, rng, args, bar) -> tuple[list, list[float], int]:
    """(a): outputs, TTFTs and prompt + output tokens."""
    system = rng.integers(3, llm.model.config.vocab_size, args.system).tolist()
    prompts = [system + rng.integers(3, llm.model.config.vocab_size, n).tolist()
               for n in rng.integers(32, 257, args.requests)]
    outputs, ttft = run_batch(llm, prompts, args.output)
    bar.update()
    return outputs, ttft, sum(map(len, prompts)) + sum(map(len, outputs))


def multi_turn(llm, rng, args, bar) -> tuple[list, list[float], int]:
    """(b): every turn's outputs, TTFTs and prompt + output tokens."""
    vocab = llm.model.config.vocab_size
    convs = [rng.integers(3, vocab, n).tolist() for n in rng.integers(64, 129, args.conversations)]
    answers, ttfts, tokens = [], [], 0
    for _ in range(args.turns):
        outputs, ttft = run_batch(llm, convs, args.answer)
        answers += outputs
        ttfts += ttft
        tokens += sum(map(len, convs)) + sum(map(len, outputs))
        convs = [c + o + rng.integers(3, vocab, n).tolist()
                 for c, o, n in zip(convs, outputs, rng.integers(16, 65, args.conversations))]
        bar.update()
    return answers, ttfts, tokens


WORKLOADS = {"system-prompt": system_prompt, "multi-turn": multi_turn}


def run(model, workload: str, caching: bool, args, bar) -> tuple[dict, list]:
    """One workload on a fresh engine (empty cache): its figures and its outputs."""
    from xyjax import LLM

    llm = LLM(model, progress=False, enable_prefix_caching=caching, max_num_batched_tokens=args.budget)
    before, start = dict(llm.stats), time.perf_counter()
    outputs, ttft, tokens = WORKLOADS[workload](llm, np.random.default_rng(args.seed), args, bar)
    wall = time.perf_counter() - start
    after = llm.stats
    figures = {k: after[k] - before[k] for k in COUNTERS}
    figures.update(hit_rate=figures["prefix_hit_tokens"] / max(figures["prefix_lookup_tokens"], 1),
                   ttft_p50=float(np.percentile(ttft, 50)), ttft_p99=float(np.percentile(ttft, 99)),
                   tokens_per_s=tokens / wall, wall_time=wall, num_requests=len(ttft))
    return figures, outputs


def table(results: dict) -> str:
    rows = ["| workload | caching | prefill tokens computed | hit rate | token-wise reuse | block-granular reuse "
            "| TTFT p50 (s) | TTFT p99 (s) | throughput (tok/s) | wall (s) | outputs = off |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload, runs in results.items():
        for setting, r in runs.items():
            rows.append(f"| {workload} | {setting} | {r['prefill_tokens']} | {r['hit_rate']:.1%} "
                        f"| {r['prefix_hit_tokens']} | {r['prefix_block_hit_tokens']} | {r['ttft_p50']:.2f} "
                        f"| {r['ttft_p99']:.2f} | {r['tokens_per_s']:.0f} | {r['wall_time']:.1f} "
                        f"| {r['same_outputs']}/{r['num_requests']} |")
    return "\n".join(rows)


def targets(results: dict) -> str:
    """Issue 7's targets: (a) >= 80% fewer prefill tokens and >= 2x lower TTFT p50; (b) token-wise reuse
    strictly above block-granular."""
    a, b = results.get("system-prompt"), results.get("multi-turn")
    lines = []
    if a:
        fewer = 1 - a["on"]["prefill_tokens"] / a["off"]["prefill_tokens"]
        speedup = a["off"]["ttft_p50"] / a["on"]["ttft_p50"]
        lines.append(f"(a) prefill tokens computed {fewer:.1%} fewer (target >= 80%: {_met(fewer >= 0.8)}); "
                     f"TTFT p50 {speedup:.2f}x lower (target >= 2x: {_met(speedup >= 2)})")
    if b:
        tw, bg = b["on"]["prefix_hit_tokens"], b["on"]["prefix_block_hit_tokens"]
        lines.append(f"(b) token-wise reuse {tw} tokens vs block-granular {bg} "
                     f"(target strictly above: {_met(tw > bg)})")
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-prefix", description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="system-prompt,multi-turn")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system", type=int, default=512)
    parser.add_argument("--output", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    from models.loader import load

    model = load(args.model)
    workloads = args.workloads.split(",")
    units = sum(args.turns if w == "multi-turn" else 1 for w in workloads) * 2
    results = {}
    with tqdm(total=units, desc="bench-prefix", unit="batch") as bar:
        for workload in workloads:
            runs, outputs = {}, {}
            for setting in ("off", "on"):
                bar.set_postfix_str(f"{workload}, caching {setting}")
                runs[setting], outputs[setting] = run(model, workload, setting == "on", args, bar)
            for setting in runs:
                runs[setting]["same_outputs"] = sum(a == b for a, b in zip(outputs[setting], outputs["off"]))
            results[workload] = runs
    print(table(results))
    print(targets(results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "prefix.json")
    with open(path, "w") as f:
        json.dump(dict(model=model.name, args=vars(args), machine=dict(cpus=os.cpu_count()), results=results,
                       targets=targets(results)), f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
