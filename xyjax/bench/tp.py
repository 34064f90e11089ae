"""``xyjax bench-tp``: the per-step cost of tensor parallelism on this host's CPU devices.

CPU "devices" (``jax_num_cpu_devices``) share the same cores, so TP cannot be faster here: this measures what
sharding adds (shard_map, the psums after O and down and the embedding, the logits gather, per-shard kernels)
as the ratio of the mean step time at each tensor_parallel_size to TP=1, on one workload run back to back.
The model is random with Llama-like proportions and the default model's tokenizer (its own 9 heads / 3 KV heads
do not divide by 2).
"""

from __future__ import annotations

import argparse
import os

import jax


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-tp", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2", help="tensor_parallel_size values (the first is the baseline)")
    parser.add_argument("--backend", default=None, help="attention and gemm backend (default: the engine's)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    jax.config.update("jax_num_cpu_devices", max(sizes))   # before anything touches a device
    result = dict(args=vars(args), cpu=_cpu(), devices=len(jax.devices()), results=run(args, sizes))
    from xyjax.bench.workload import write_result

    base = result["results"][0]["mean_step_seconds"]
    for r in result["results"]:
        r["ratio_to_first"] = r["mean_step_seconds"] / base
        print(f"TP={r['tensor_parallel_size']}: {r['mean_step_seconds'] * 1e3:.2f} ms/step over {r['steps']} steps, "
              f"{r['ratio_to_first']:.2f}x TP={sizes[0]}; compiles while serving: {r['compiles_while_serving']}")
    write_result(args.out, "tp", result)
    return 0


def run(args, sizes: list[int]) -> list[dict]:
    import dataclasses

    import numpy as np

    from models import loader
    from models.config import ModelConfig
    from models.llama import init_params
    from xyjax import LLM, SamplingParams

    tokenizer = loader.load(None, progress=False).tokenizer      # the default model's (prompts are token ids)
    D = args.hidden
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=D, intermediate_size=3 * D, num_layers=args.layers,
                      num_heads=D // 64, num_kv_heads=D // 128, head_dim=64, max_position_embeddings=1024)
    model = loader.LoadedModel(name="random-llama", config=cfg, params=init_params(cfg, jax.random.key(0)),
                               tokenizer=tokenizer, dtype=np.dtype("float32"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(16, 128, args.num_requests)]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    backend = dict(attention_backend=args.backend, gemm_backend=args.backend) if args.backend else {}
    results, outputs = [], []
    for n in sizes:
        llm = LLM(model, progress=False, tensor_parallel_size=n, max_num_batched_tokens=256, max_num_seqs=16,
                  kv_cache_memory=64 << 20, compilation_cache_dir="", **backend)
        llm.generate(prompts[:2], sampling)                     # warm: first-call costs out of the timing
        before = dataclasses.replace(llm.engine.stats)
        outputs.append([o.token_ids for o in llm.generate(prompts, sampling)])
        after = llm.engine.stats
        steps = after.steps - before.steps
        results.append(dict(tensor_parallel_size=n, steps=steps,
                            mean_step_seconds=(after.step_seconds - before.step_seconds) / steps,
                            device_seconds_per_step=(after.device_seconds - before.device_seconds) / steps,
                            compiles_while_serving=after.compiles - before.compiles,
                            greedy_equal_to_first=outputs[-1] == outputs[0]))
    return results


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown"
    return f"{name}, {os.cpu_count()} CPUs"
