"""``xyjax bench-functional``: decode tok/s of the fused ``xyjax.functional.generate`` against the engine, beside
the time to read the weights once.

Both run the engine's held weights and backends on the same random prompts (greedy, no EOS), in the same process,
after a warm-up run of each shape. Decode speed is measured by difference, so prefill cancels out: a run of G tokens
and a run of 1 token (prefill and the first sample only), decode tok/s = B (G - 1) / (t_G - t_1), the median over
``--repetitions``. Decoding is bound by reading the weights: ``weight read ms`` is the held params' bytes over the
memory read bandwidth measured here (a numpy sum over a large array), and ``reads/step`` the decode step's time
over it (1.0: the step costs exactly one read of the weights).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from xyjax.bench.workload import write_result


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second of a numpy sum over an ``nbytes`` float32 array (the best of ``repeats``)."""
    data = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def bench_prompts(vocab: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``batch`` random prompts of ``prompt_len`` ids from ``min(256, vocab // 2)`` up."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(256, vocab // 2), vocab, (batch, prompt_len)).tolist()


def fused_runner(llm, prompts: list[list[int]]):
    """A function of a token count that runs the fused ``generate`` on ``prompts`` with the engine's held weights
    and backends and blocks until done."""
    from xyjax import functional as F

    params, backends, cfg = llm.engine.runner.params, llm.engine.backends, llm.model.config
    ids = jnp.asarray(prompts, jnp.int32)
    lens = jnp.full(len(prompts), ids.shape[1], jnp.int32)

    @functools.lru_cache(maxsize=None)
    def jitted(tokens):
        return jax.jit(functools.partial(F.generate, cfg=cfg, max_new_tokens=tokens, backends=backends))

    def run(tokens):
        out, lengths, _ = jitted(tokens)(params, ids, lens)
        if not (np.asarray(lengths) == tokens).all():
            raise RuntimeError("the fused generate stopped early")
        return out
    return run


def engine_runner(llm, prompts: list[list[int]]):
    """A function of a token count that runs ``llm.generate`` on ``prompts`` (greedy, ignore EOS)."""
    from xyjax.engine.sampling_params import SamplingParams

    def run(tokens):
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
                            progress=False)
        if any(len(o.token_ids) != tokens for o in outs):
            raise RuntimeError("the engine stopped early")
        return outs
    return run


def decode_speed(run, batch: int, gen_len: int, repetitions: int) -> dict:
    """Decode tok/s of ``run`` by difference (runs of ``gen_len`` and 1 tokens), after a warm-up of each."""
    def timed(tokens):
        start = time.perf_counter()
        run(tokens)
        return time.perf_counter() - start

    timed(gen_len), timed(1)
    steps = [(timed(gen_len) - timed(1)) / (gen_len - 1) for _ in range(repetitions)]
    step = statistics.median(steps)
    return dict(tok_s=batch / step, step_ms=1e3 * step, runs_step_ms=[1e3 * s for s in steps])


def table(rows: list[dict]) -> str:
    lines = ["| system | batch | decode tok/s | ms/step | reads/step |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['batch']} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | "
                     f"{r['reads_per_step']:.2f} |")
    return "\n".join(lines)


def bench_functional(model: str | None = None, batch_sizes=(1, 8), prompt_len: int = 16, gen_len: int = 64,
                     repetitions: int = 3, out_dir: str = "bench-results", llm=None, seed: int = 0) -> dict:
    """Both systems at each batch size; prints a table, writes ``<out_dir>/functional-<time>.json`` and returns the
    result (``path`` added)."""
    from xyjax import LLM

    if gen_len < 2:
        raise ValueError("gen_len must be >= 2 (decode speed is measured by difference with a 1-token run)")
    llm = llm or LLM(model, progress=False)
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(llm.engine.runner.params))
    bandwidth = read_bandwidth()
    read_ms = 1e3 * weight_bytes / bandwidth
    rows = []
    for batch in batch_sizes:
        prompts = bench_prompts(llm.model.config.vocab_size, batch, prompt_len, seed)
        for system, runner in (("fused", fused_runner), ("engine", engine_runner)):
            speed = decode_speed(runner(llm, prompts), batch, gen_len, repetitions)
            rows.append(dict(system=system, batch=batch, reads_per_step=speed["step_ms"] / read_ms, **speed))
    print(table(rows))
    print(f"weights {weight_bytes / 2**20:.1f} MiB, read bandwidth {bandwidth / 1e9:.1f} GB/s: one weight read "
          f"{read_ms:.2f} ms ({1e3 / read_ms:.0f} steps/s at one read per step)")
    result = dict(model=str(llm.model.name), prompt_len=prompt_len, gen_len=gen_len, repetitions=repetitions,
                  weight_bytes=weight_bytes, read_bandwidth_bytes_per_s=bandwidth, weight_read_ms=read_ms, rows=rows,
                  backends=dict(attention=llm.engine.backends.attention, gemm=llm.engine.backends.gemm))
    path = write_result(out_dir, "functional", result)
    return dict(result, path=path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-functional", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="known name or .gguf path (default: smollm2-135m-instruct)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=64, help="tokens per run (>= 2)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.gen_len < 2 or args.repetitions < 1:
        parser.error("--prompt-len and --repetitions must be >= 1, --gen-len >= 2")
    bench_functional(args.model, tuple(int(b) for b in args.batch_sizes.split(",")), args.prompt_len, args.gen_len,
                     args.repetitions, args.out)
    return 0
