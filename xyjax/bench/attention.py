"""``xyjax bench-attention``: Meta-Attention backends on hybrid batches, against the machine's limits.

Cases (the default model's heads: H=9, Hkv=3, D=64; block size 16; float32):
    fig7          XY-Serve Fig. 7's hybrid batch: a 362-token prefill chunk over 1318 history, a 53-token
                  verify run over 2036, two decodes over 1700 and 2000
    decode-heavy  64 decodes, histories uniform in [100, 2000] (seeded)
    prefill-heavy two 512-token prefill chunks (no history)
Systems: each ``meta_attention`` backend on the one hybrid task table; ``stage-by-stage``, the usual
split into one call per stage (prefill chunks, verify runs, decodes), each padded to its own longest
query and KV and run with ``jax.nn.dot_product_attention`` over KV gathered from the paged cache; and
``dense-padded``, the whole batch padded to one dense ``jax.nn.dot_product_attention`` call.
Reports ms per call, GFLOP/s (4 * visible (query, key) pairs * H * D) and KV GB/s (KV bytes read once),
next to the sgemm rate and copy bandwidth measured in the same run, and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xyjax.ops.attention import tiling
from xyjax.bench.roofline import machine_limits
from xyjax.engine.config import EngineConfig
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import meta_attention
from xyjax.bench.workload import write_result

H, HKV, D, BS = 9, 3, 64, 16
CASES = {   # (stage, query rows, history)
    "fig7": [("P", 362, 1318), ("V", 53, 2036), ("D", 1, 1700), ("D", 1, 2000)],
    "decode-heavy": [("D", 1, int(h)) for h in np.random.default_rng(0).integers(100, 2001, 64)],
    "prefill-heavy": [("P", 512, 0), ("P", 512, 0)],
}


def timeit(fn, *args, repeat: int = 5, number: int = 5) -> float:
    """Best mean seconds per call over ``repeat`` rounds of ``number`` calls (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / number)
    return best


def make_case(seqs, rng, num_blocks: int):
    """Random q and paged KV for sequences [(stage, q_len, history)]; returns arrays and per-sequence metadata."""
    q_len = np.array([q for _, q, _ in seqs])
    kv_len = np.array([q + h for _, q, h in seqs])
    pages = -(-int(kv_len.max()) // BS)
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(seqs), pages), np.int32)
    used = 0
    for i, n in enumerate(kv_len):
        nb = -(-int(n) // BS)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    shape = (1, num_blocks, HKV, BS, D)
    kv = KVCache(k=jnp.asarray(rng.standard_normal(shape, np.float32)),
                 v=jnp.asarray(rng.standard_normal(shape, np.float32)))
    q = jnp.asarray(rng.standard_normal((int(q_len.sum()), H, D), np.float32))
    q_start = np.concatenate([[0], np.cumsum(q_len)[:-1]])
    return q, kv, q_start, q_len, kv_len, tables


def work(q_len, kv_len) -> tuple[float, float]:
    """(FLOPs, KV bytes) of exact causal attention: 4 * visible pairs * H * D; each sequence's KV read once."""
    pairs = sum(q * (kv - q) + q * (q + 1) / 2 for q, kv in zip(q_len, kv_len))
    return 4.0 * pairs * H * D, float(sum(kv_len)) * HKV * D * 4 * 2


def dense_attention(q, kv, q_start, q_len, kv_len, tables, groups, implementation: str | None = None):
    """One padded ``jax.nn.dot_product_attention`` call per group of sequences (KV gathered from the cache), in
    its ``implementation`` (None: XLA's choice; "cudnn": cuDNN's fused kernel, GPU only)."""
    calls = []
    for members in groups:
        if not len(members):
            continue
        lq, lk = int(q_len[members].max()), int(kv_len[members].max())
        rows = np.minimum(q_start[members, None] + np.arange(lq)[None], q.shape[0] - 1)
        pages = -(-lk // BS)
        blocks = tables[members, :pages]
        offset = (kv_len[members] - q_len[members])[:, None]
        q_pos = offset + np.arange(lq)[None]
        mask = (np.arange(pages * BS)[None, None] <= q_pos[:, :, None]) & (np.arange(lq)[None, :, None]
                                                                         < q_len[members, None, None])
        calls.append((rows, blocks, mask[:, None]))

    @jax.jit
    def run(q, k, v):
        outs = []
        for rows, blocks, mask in calls:
            keys = k[0, blocks].transpose(0, 1, 3, 2, 4).reshape(len(blocks), -1, HKV, D)
            values = v[0, blocks].transpose(0, 1, 3, 2, 4).reshape(len(blocks), -1, HKV, D)
            outs.append(jax.nn.dot_product_attention(q[rows], keys, values, mask=mask, implementation=implementation))
        return outs

    return lambda: run(q, kv.k, kv.v)


def bench_case(name, seqs, backends, lanes: int, max_splits: int, tile: int, rng) -> dict:
    q, kv, q_start, q_len, kv_len, tables = make_case(seqs, rng, sum(-(-(q + h) // BS) for _, q, h in seqs) + 8)
    meta = tiling.attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=HKV, tile=tile, lanes=lanes,
                                     block_size=BS, max_splits=max_splits)
    flops, kv_bytes = work(q_len, kv_len)
    result = dict(case=name, sequences=len(seqs), query_rows=int(q_len.sum()), kv_positions=int(kv_len.sum()),
                  flops=flops, kv_bytes=kv_bytes, ms={})
    for backend in backends:
        fn = jax.jit(lambda q, kv, meta, b=backend: meta_attention(q, kv, 0, meta, backend=b))
        result["ms"][backend] = 1e3 * timeit(fn, q, kv, meta)
    labels = np.array([stage for stage, _, _ in seqs])
    stages = [np.flatnonzero(labels == stage) for stage in "PVD"]
    result["ms"]["stage-by-stage"] = 1e3 * timeit(dense_attention(q, kv, q_start, q_len, kv_len, tables, stages))
    result["ms"]["dense-padded"] = 1e3 * timeit(dense_attention(q, kv, q_start, q_len, kv_len, tables,
                                                                [np.arange(len(seqs))]))
    return result


def tile_sweep(tiles: list[int], lanes: int, rng) -> dict:
    """ffi ms per call of the Fig. 7 and prefill-heavy batches for each prefill/verify query tile size."""
    out = {}
    for name in ("fig7", "prefill-heavy"):
        seqs = CASES[name]
        q, kv, q_start, q_len, kv_len, tables = make_case(seqs, rng, sum(-(-(a + b) // BS) for _, a, b in seqs) + 8)
        fn = jax.jit(lambda q, kv, meta: meta_attention(q, kv, 0, meta, backend="ffi"))
        out[name] = {tile: 1e3 * timeit(fn, q, kv, tiling.attention_metadata(
            q_start, q_len, kv_len, tables, num_kv_heads=HKV, tile=tile, lanes=lanes, block_size=BS))
            for tile in tiles}
        print(f"prefill_tile sweep, {name}: " + " | ".join(f"{t}: {ms:.2f} ms" for t, ms in out[name].items()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax bench-attention", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="ffi,xla")
    parser.add_argument("--lanes", type=int, default=os.cpu_count())
    parser.add_argument("--max-splits", type=int, default=1, help="KV splits allowed per straggler task")
    parser.add_argument("--tile", type=int, default=EngineConfig.prefill_tile,
                        help="query rows per prefill/verify task (the engine's prefill_tile)")
    parser.add_argument("--tiles", default="8,16,32,64", help="prefill_tile sizes to sweep with ffi ('' to skip)")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    limits = machine_limits()
    rng = np.random.default_rng(0)
    backends = args.backends.split(",")
    results = [bench_case(name, seqs, backends, args.lanes, args.max_splits, args.tile, rng) for name, seqs in tqdm(CASES.items(), desc="cases")]
    print(f"machine: sgemm {limits['sgemm_gflops']:.0f} GFLOP/s, copy {limits['copy_gbps']:.1f} GB/s, "
          f"{args.lanes} lanes")
    print("| case | " + " | ".join(f"{b} ms" for b in results[0]["ms"]) + " | ffi GFLOP/s (of sgemm) | ffi KV GB/s (of copy) |")
    print("|---" * (len(results[0]["ms"]) + 3) + "|")
    for r in results:
        best = r["ms"].get("ffi", min(r["ms"].values())) / 1e3
        r["ffi_gflops"], r["ffi_kv_gbps"] = r["flops"] / best / 1e9, r["kv_bytes"] / best / 1e9
        r["ffi_sgemm_fraction"] = r["ffi_gflops"] / limits["sgemm_gflops"]
        r["ffi_copy_fraction"] = r["ffi_kv_gbps"] / limits["copy_gbps"]
        print(f"| {r['case']} | " + " | ".join(f"{v:.2f}" for v in r["ms"].values()) +
              f" | {r['ffi_gflops']:.1f} ({100 * r['ffi_sgemm_fraction']:.0f}%) | {r['ffi_kv_gbps']:.1f} "
              f"({100 * r['ffi_copy_fraction']:.0f}%) |")
    sweep = tile_sweep([int(t) for t in args.tiles.split(",") if t], args.lanes, rng) if args.tiles else {}
    write_result(args.out, "attention", dict(machine=limits, lanes=args.lanes, max_splits=args.max_splits, tile=args.tile,
                                             heads=dict(H=H, Hkv=HKV, D=D, block=BS), results=results,
                                             prefill_tile_ms=sweep), indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
