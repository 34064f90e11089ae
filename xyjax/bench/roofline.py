"""The machine's limits and the least time any engine needs for a workload on it, so every measured figure can
be read as a fraction of the limit.

``machine_limits()`` measures, in the calling process: the sgemm rate (numpy's BLAS at 2048^3, all cores), the
memory copy rate (bytes copied per second, 512 MiB) and the read rate (``dot(x, x)`` over 512 MiB cut into one
slice per core, read by all cores at once: bytes read per second; one core alone reads about half as fast here,
and an engine's steps read weights on every core). ``workload_work(cfg, requests)`` counts a workload's
arithmetic exactly as a serving engine must do it (ignore-EOS, each request's KV computed once, no prefix reuse):

    dense    2 * (D * (H + 2 Hkv) Dh + H Dh * D + D * 2F + F * D) * L per token computed
    attn     4 * H * Dh * L per (query, visible key) pair (QK^T and PV; causal)
    lm_head  2 * D * V per sampled row (one per output token)

Tokens computed are the prompt plus every output token but the last (which is returned, never fed back).
``roofline(work, limits)`` turns that into a lower bound on the wall time: the larger of the arithmetic at the
sgemm rate and the weight reads at the read rate, where any engine runs at least ``max output length`` forward
steps (token t of a request needs token t - 1) and each step reads every weight once (at the read rate measured
over 512 MiB, about the default model's 538 MB). Real steps also read the KV cache; the bound leaves that out.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from models.config import ModelConfig


def machine_limits() -> dict:
    """sgemm GFLOP/s, copy GB/s and read GB/s measured now (best of three each), and the machine's cores."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
    src = np.ones(1 << 27, np.float32)
    dst = np.empty_like(src)

    def best(fn, n: int = 3) -> float:
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    cpus = os.cpu_count() or 1
    slices = np.array_split(src, cpus)
    with ThreadPoolExecutor(cpus) as pool:   # numpy's dot releases the GIL
        read = best(lambda: list(pool.map(lambda s: np.dot(s, s), slices)))
    return dict(cpus=cpus, sgemm_gflops=2 * 2048 ** 3 / best(lambda: a @ a) / 1e9,
                copy_gbps=src.nbytes / best(lambda: np.copyto(dst, src)) / 1e9, read_gbps=src.nbytes / read / 1e9)


def dense_flops_per_token(cfg: ModelConfig) -> float:
    """FLOPs of the four per-layer GEMMs for one token, all layers."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return 2.0 * (D * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * D + D * 2 * F + F * D) * cfg.num_layers


def workload_work(cfg: ModelConfig, requests, weight_bytes: int) -> dict:
    """FLOPs (dense, attention, LM head, total) of serving ``requests`` (``BenchRequest``s: ``prompt_token_ids``,
    ``output_len``), the tokens computed, the fewest forward steps any engine needs, and ``weight_bytes`` (the
    model's parameters, e.g. ``params_bytes``)."""
    tokens = pairs = sampled = 0
    for r in requests:
        n = len(r.prompt_token_ids) + r.output_len - 1          # positions 0..n-1 computed; position i sees i + 1 keys
        tokens += n
        pairs += n * (n + 1) // 2
        sampled += r.output_len
    dense = dense_flops_per_token(cfg) * tokens
    attention = 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers * pairs
    lm_head = 2.0 * cfg.hidden_size * cfg.vocab_size * sampled
    return dict(tokens_computed=tokens, dense_flops=dense, attention_flops=attention, lm_head_flops=lm_head,
                flops=dense + attention + lm_head, min_steps=max(r.output_len for r in requests),
                weight_bytes=weight_bytes)


def params_bytes(params) -> int:
    """Bytes of every array in a param pytree."""
    return sum(x.nbytes for x in jax.tree.leaves(params))


def roofline(work: dict, limits: dict, total_tokens: int) -> dict:
    """Lower bounds (s) from arithmetic and from weight reads, the bound itself, and the tok/s ceiling it gives
    for ``total_tokens`` (prompt + output tokens, as the throughput figures count them)."""
    compute = work["flops"] / (limits["sgemm_gflops"] * 1e9)
    memory = work["min_steps"] * work["weight_bytes"] / (limits["read_gbps"] * 1e9)
    bound = max(compute, memory)
    return dict(compute_seconds=compute, memory_seconds=memory, bound_seconds=bound,
                tokens_per_s=total_tokens / bound)
