"""``xyjax bench-gemm``: SmoothGEMM against XLA dots on the default model's linear shapes, m = 1 .. budget.

For each linear shape (QKV, O, gate/up, down, LM head; float32) and each m of a dense sample of
[1, budget], times three ways of computing the m real rows:
    smooth      ``smooth_gemm(..., backend)`` (default ``ffi``) on the engine's bucket T >= m, m as data, with
                this device's profiled tunables when ``xyjax profile`` saved a table (as the engine runs it)
    padded      an XLA dot over the whole bucket (what static shapes cost without virtual padding)
    exact       an XLA dot compiled for exactly m rows (the per-shape ideal static shapes cannot afford)
Reports the mean over m of padded / smooth and smooth / exact per shape and overall, writes JSON and a
PNG of time against m per shape. Each shape's weight is one matrix, timed over and over: it stays in cache.

``--model-pass``: instead, one pass over a model's worth of dense weights (num_layers distinct random
``[out, in]`` matrices of each linear shape, and the LM head), as a step reads them (from memory), for x of
m rows, through each of the ``ffi`` backend's paths for every m: the BLAS, the streaming kernel and the AMX
kernel (where the CPU has none, the BLAS runs in its place); prints ms per pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xyjax.engine.config import EngineConfig
from models.llama import linear_shapes
from xyjax.ops.gemm.profile import load_default, time_call


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
            tuning = table.params("plain", T, K, N, transpose_w) if table else None
            programs[T] = jax.jit(lambda x, w, m, t=tuning: smooth_gemm(x, w, m, backend=backend,
                                                                        transpose_w=transpose_w, tuning=t))
        rows["smooth"].append(1e3 * time_call(programs[T], x, w, jnp.int32(m), repeat=repeat))
        rows["padded"].append(1e3 * time_call(dot, x, w, repeat=repeat))
        rows["exact"].append(1e3 * time_call(dot, x[:m], w, repeat=repeat))
    return rows


SYSTEMS = dict(blas=dict(stream_rows=0, amx_rows=0), stream=dict(stream_rows=1 << 20, amx_rows=0),
               amx=dict(stream_rows=0, amx_rows=1))   # --model-pass: the ffi handler's three gemm paths


def model_pass(cfg, ms: list[int], repeat: int, rng) -> dict:
    """ms per pass over a model's dense weights and LM head at each m (x of exactly m rows): the ffi handler's
    BLAS, streaming-kernel and AMX-kernel paths (``SYSTEMS``)."""
    from xyjax.ops import smooth_gemm

    shapes = linear_shapes(cfg)
    stacks = {name: jnp.asarray(0.02 * rng.standard_normal((cfg.num_layers, N, K), np.float32))
              for name, (K, N, _) in tqdm(shapes.items(), desc="weights") if name != "lm_head"}
    K, N, _ = shapes["lm_head"]
    head = jnp.asarray(0.02 * rng.standard_normal((N, K), np.float32))
    x_all = jnp.asarray(rng.standard_normal((max(ms), max(k for k, _, _ in shapes.values()))), jnp.float32)

    def one_pass(stacks, head, x, tuning):
        gemm = functools.partial(smooth_gemm, m=x.shape[0], transpose_w=True, backend="ffi", tuning=tuning)

        def layer(i, acc):   # one element of each result kept alive
            return acc + sum(gemm(x[:, :w.shape[2]], w, layer=i)[0, 0] for w in stacks.values())
        return jax.lax.fori_loop(0, cfg.num_layers, layer, jnp.float32(0)) + gemm(x[:, :K], head)[0, 0]

    programs = {name: jax.jit(functools.partial(one_pass, tuning=t)) for name, t in SYSTEMS.items()}
    times = {name: [1e3 * time_call(programs[name], stacks, head, x_all[:m], repeat=repeat)
                    for m in tqdm(ms, desc=f"model pass, {name}")] for name in SYSTEMS}
    weight_bytes = 4 * (sum(w.size for w in stacks.values()) + head.size)
    return dict(m=ms, ms=times, weight_bytes=weight_bytes)


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
    parser.add_argument("--model-pass", action="store_true", help="time whole passes over a model's weights instead")
    parser.add_argument("--pass-m", default="1,4,7,16,24,32,48,64,128,256,512", help="m values of --model-pass")
    args = parser.parse_args(argv)
    from models.loader import load

    if args.model_pass:
        ms = [int(m) for m in args.pass_m.split(",")]
        r = model_pass(load(args.model).config, ms, args.repeat, np.random.default_rng(0))
        print(f"one pass over {r['weight_bytes'] / 1e6:.0f} MB of dense weights + LM head, ffi backend")
        print("| m | BLAS (ms) | streaming kernel (ms) | AMX kernel (ms) | best / BLAS | GFLOP/s of the best |\n"
              "|---|---|---|---|---|---|")
        for i, m in enumerate(ms):
            b, t, a = (r["ms"][name][i] for name in SYSTEMS)
            print(f"| {m} | {b:.1f} | {t:.1f} | {a:.1f} | {b / min(b, t, a):.2f}x | "
                  f"{2 * m * r['weight_bytes'] / 4 / min(b, t, a) / 1e6:.0f} |")
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gemm-model-pass-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(dict(r, device=jax.devices()[0].device_kind, cpus=os.cpu_count()), f, indent=1)
        print(f"wrote {path}")
        return 0

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
