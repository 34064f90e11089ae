"""``xyjax bench-spec``: output tokens/s with and without speculative decoding, measured back to back.

Workloads: ``repeat-edit``, chat prompts (the model's chat template) asking the model to repeat, lightly
edit or continue a passage of this repository's own source and docs, where n-gram drafts hit, at batch
sizes 1, 4 and 16 (greedy); and ``lognormal`` (``xyjax.bench.workload``: random-token prompts, exact
output lengths), where they should not slow anything down. Two engines share the process, one plain and
one with the ``speculative`` option; every case runs on the plain one, then at once on the other.
Greedy outputs must agree (speculation is exact); the table says whether they did.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import time

import jax
from tqdm import tqdm

from xyjax import LLM, SamplingParams
from xyjax.bench.workload import WORKLOADS, make_requests, write_result
from xyjax.engine.speculative import SpecConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = ("Repeat the following text exactly, without any comment:\n\n{}",
         "Copy the following text, replacing the word \"the\" with \"a\" and changing nothing else:\n\n{}",
         "Repeat this text and then continue it:\n\n{}")


def passages(count: int, lines: int = 24, skip: int = 20) -> list[str]:
    """``count`` passages of ``lines`` lines cut from the repository's Python sources and docs: from each
    file long enough (sorted paths) in turn, the next ``lines`` lines after its first ``skip`` (the same
    every run)."""
    files = sorted(glob.glob(os.path.join(ROOT, "xyjax", "*.py")) + glob.glob(os.path.join(ROOT, "docs", "*.md")))
    texts = [t for t in (open(f).read().splitlines() for f in files) if len(t) >= skip + lines]
    return ["\n".join(texts[i % len(texts)][skip + (i // len(texts)) * lines:][:lines]) for i in range(count)]


def repeat_edit_prompts(llm: LLM, count: int) -> list[list[int]]:
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": TASKS[i % len(TASKS)].format(p)}],
                                              add_generation_prompt=True, tokenize=True)
            for i, p in enumerate(passages(count))]


def timed(llm: LLM, prompts: list[list[int]], sampling: list[SamplingParams]) -> dict:
    """Generate ``prompts`` together; wall time, output tokens and the speculation counters of the run."""
    keys = ("spec_drafted_tokens", "spec_accepted_tokens", "spec_verify_runs")
    before = llm.stats
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling, progress=False)
    seconds, after = time.perf_counter() - start, llm.stats
    return dict(seconds=seconds, tokens=sum(len(o.token_ids) for o in outs), outputs=[o.token_ids for o in outs],
                **{k: after[k] - before[k] for k in keys})


def compare(plain: LLM, spec: LLM, groups: list[tuple[list, list]]) -> dict:
    """Each group run on ``plain`` then on ``spec``; totals over the groups."""
    runs = {"plain": [], "spec": []}
    for prompts, sampling in groups:
        runs["plain"].append(timed(plain, prompts, sampling))
        runs["spec"].append(timed(spec, prompts, sampling))
    total = {name: {k: sum(r[k] for r in rs) for k in rs[0] if k != "outputs"} for name, rs in runs.items()}
    p, s = total["plain"], total["spec"]
    return dict(plain_tok_s=p["tokens"] / p["seconds"], spec_tok_s=s["tokens"] / s["seconds"],
                speedup=(s["tokens"] / s["seconds"]) / (p["tokens"] / p["seconds"]),
                acceptance_rate=s["spec_accepted_tokens"] / max(s["spec_drafted_tokens"], 1),
                mean_accepted_length=1 + s["spec_accepted_tokens"] / max(s["spec_verify_runs"], 1),
                drafted=s["spec_drafted_tokens"], tokens=s["tokens"],
                identical=[r["outputs"] for r in runs["plain"]] == [r["outputs"] for r in runs["spec"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-spec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per repeat-edit request")
    parser.add_argument("--num-draft-tokens", type=int, default=6)
    parser.add_argument("--tree", action="store_true", help="tree drafts instead of chains")
    parser.add_argument("--min-n", type=int, default=SpecConfig.min_n, help="shortest suffix n-gram matched")
    parser.add_argument("--max-n", type=int, default=SpecConfig.max_n, help="longest suffix n-gram matched")
    parser.add_argument("--lognormal-requests", type=int, default=16, help="0 skips the lognormal workload")
    parser.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    options = dict(max_num_seqs=max(sizes + [args.lognormal_requests]), kv_cache_memory=1 << 28, progress=False)
    plain = LLM(args.model, **options)
    spec = LLM(args.model, speculative=dict(num_draft_tokens=args.num_draft_tokens, tree=args.tree, min_n=args.min_n,
                                            max_n=args.max_n), **options)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    prompts = repeat_edit_prompts(plain, max(sizes + [4]))
    cases = [("repeat-edit", b, [(prompts[i:i + b], [greedy] * b) for i in range(0, max(b, 4), b)]) for b in sizes]
    if args.lognormal_requests:
        w = WORKLOADS["lognormal"]
        reqs = make_requests(dataclasses.replace(w, num_requests=args.lognormal_requests),
                             plain.model.config.vocab_size)
        cases.append(("lognormal", len(reqs), [([r.prompt_token_ids for r in reqs],
                                                 [SamplingParams(max_tokens=r.output_len, temperature=0,
                                                                 ignore_eos=True) for r in reqs])]))
    results = []
    for name, batch, groups in tqdm(cases, desc="bench-spec"):
        results.append(dict(workload=name, batch=batch, **compare(plain, spec, groups)))
    print(f"speculative: ngram, num_draft_tokens={args.num_draft_tokens}, tree={args.tree}, n in "
          f"[{args.min_n}, {args.max_n}]")
    print("| workload | batch | tok/s plain | tok/s spec | speedup | acceptance rate | mean accepted length | "
          "same tokens |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['batch']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['acceptance_rate']:.2f} | {r['mean_accepted_length']:.2f} | "
              f"{'yes' if r['identical'] else 'no'} |")
    write_result(args.out, "spec", dict(args=vars(args), results=results, device=jax.devices()[0].device_kind,
                       cpus=os.cpu_count()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
