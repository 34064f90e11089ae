"""``xyjax bench-gemm``: SmoothGEMM against XLA dots on the default model's linear shapes, m = 1 .. budget.

For each linear shape (QKV, O, gate/up, down, LM head; float32) and each m of a dense sample of
[1, budget], times three ways of computing the m real rows:
    smooth      ``smooth_gemm(..., backend)`` (default ``ffi``) on the engine's bucket T >= m, m as data, with
                this device's profiled tunables when ``xyjax profile`` saved a table (as the engine runs it)
    padded      an XLA dot over the whole bucket (what static shapes cost without virtual padding)
    exact       an XLA dot compiled for exactly m rows (the per-shape ideal static shapes cannot afford)
Reports the mean over m of padded / smooth and smooth / exact per shape and overall, writes JSON and a
PNG of time against m per shape.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xyjax.config import EngineConfig
from xyjax.gemm_profile import linear_shapes, load_default, time_call


def m_sample(budget: int, step: int) -> list[int]:
    """Every m up to 16, then every ``step``-th, plus each bucket edge and its successor."""
    buckets = EngineConfig(max_num_batched_tokens=budget).token_buckets
    ms = set(range(1, min(16, budget) + 1)) | set(range(16, budget + 1, step))
    ms |= {b for b in buckets} | {b + 1 for b in buckets if b < budget}
    return sorted(ms)


def bench_shape(K: int, N: int, transpose_w: bool, ms: list[int], buckets, backend: str, repeat: int, rng) -> dict:
    """ms per call of the three systems for every m (module docstring)."""
    from xyjax.ops import smooth_gemm

    T_max = max(buckets)
    x_all = jnp.asarray(rng.standard_normal((T_max, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((N, K) if transpose_w else (K, N)), jnp.float32)
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    dot = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))
    table = load_default(backend)
    programs = {}   # one jitted smooth_gemm per bucket (m is data), with that bucket's profiled tunables
    rows = {name: [] for name in ("smooth", "padded", "exact")}
    for m in ms:
        T = next(b for b in buckets if b >= m)
        x = x_all[:T]
        if T not in programs:
            tuning = table.params(T, K, N, transpose_w) if table else None
            programs[T] = jax.jit(lambda x, w, m, t=tuning: smooth_gemm(x, w, m, backend=backend,
                                                                        transpose_w=transpose_w, tuning=t))
        rows["smooth"].append(1e3 * time_call(programs[T], x, w, jnp.int32(m), repeat=repeat))
        rows["padded"].append(1e3 * time_call(dot, x, w, repeat=repeat))
        rows["exact"].append(1e3 * time_call(dot, x[:m], w, repeat=repeat))
    return rows


def plot(results: dict, ms: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        for system, style in (("padded", "-"), ("exact", "--"), ("smooth", "-")):
            ax.plot(ms, r["ms"][system], style, label=system, linewidth=1.2)
        ax.set_title(f"{name} [{r['K']}x{r['N']}]")
        ax.set_xlabel("real rows m")
        ax.set_ylabel("ms per call")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-gemm", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="ffi")
    parser.add_argument("--budget", type=int, default=EngineConfig.max_num_batched_tokens)
    parser.add_argument("--step", type=int, default=8, help="m step past 16")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    from models.loader import load

    shapes = linear_shapes(load(args.model).config)
    buckets = EngineConfig(max_num_batched_tokens=args.budget).token_buckets
    ms = m_sample(args.budget, args.step)
    rng = np.random.default_rng(0)
    results = {}
    for name in tqdm(args.shapes.split(","), desc="shapes"):
        K, N, tr = shapes[name]
        r = bench_shape(K, N, tr, ms, buckets, args.backend, args.repeat, rng)
        smooth, padded, exact = (np.array(r[k]) for k in ("smooth", "padded", "exact"))
        results[name] = dict(K=K, N=N, transpose_w=tr, ms=r, speedup_vs_padded=float(np.mean(padded / smooth)),
                             ratio_to_exact=float(np.mean(smooth / exact)))
    print(f"{args.backend} on buckets {list(buckets)}, {len(ms)} values of m in [1, {args.budget}], profile: "
          f"{'yes' if load_default(args.backend) else 'none (defaults)'}")
    print("| shape | K x N | padded / smooth (mean over m) | smooth / exact (mean over m) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['K']} x {r['N']} | {r['speedup_vs_padded']:.2f} | {r['ratio_to_exact']:.3f} |")
    overall = dict(speedup_vs_padded=float(np.mean([r["speedup_vs_padded"] for r in results.values()])),
                   ratio_to_exact=float(np.mean([r["ratio_to_exact"] for r in results.values()])))
    print(f"| all | | {overall['speedup_vs_padded']:.2f} | {overall['ratio_to_exact']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"gemm-{stamp}")
    with open(path + ".json", "w") as f:
        json.dump(dict(backend=args.backend, buckets=list(buckets), m=ms, shapes=results, overall=overall,
                       device=jax.devices()[0].device_kind, cpus=os.cpu_count()), f, indent=1)
    plot(results, ms, path + ".png")
    print(f"wrote {path}.json and {path}.png")
    return 0
