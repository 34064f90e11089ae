"""The offline SmoothGEMM profile: for each weight format, linear shape and token bucket, the fastest tunables
of a gemm backend, measured on this device (``xyjax profile``, ``xyjax.bench.profile``) and looked up when the
engine traces its steps.

A profile is a JSON table keyed by device kind (``jax.devices()[0].device_kind``) and backend, one entry
per (format, T, K, N, transpose_w): the winning ``params`` and the milliseconds of every candidate. It lives in
``$XYJAX_CACHE_DIR/gemm-profiles/<device kind>-<backend>.json``. The engine loads it at start (no file:
every call runs the backend's defaults for its format) and passes each GEMM the params of its format, shape
and bucket (the entry with the smallest T >= the bucket, else the largest T; exact format, K, N, transpose_w).
``xyjax profile`` times each shape in the format the engine holds that weight in on this machine.

Tunables (see ``xyjax.ops.gemm``): ``ffi`` lanes, row or column split, m alignment, the streaming kernel's
row limit and whether the AMX kernel runs (where the CPU has it); ``pallas`` the ``GemmTiling`` fields (block
sizes and grid order; its timings only mean something on a GPU, so profiling it on CPU is refused).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import ascend_ffi
from xyjax.ops.gemm import formats, smooth_gemm
from xyjax.ops.paths import cache_dir

Key = tuple[str, int, int, int, bool]   # (weight format, T, K, N, transpose_w)


@dataclasses.dataclass(frozen=True)
class GemmProfile:
    """Best params per (weight format, T, K, N, transpose_w) for one device kind and backend (hashable: a static
    jit arg)."""

    device: str
    backend: str
    entries: tuple[tuple[Key, tuple[tuple[str, object], ...]], ...] = ()

    def params(self, fmt: str, T: int, K: int, N: int, transpose_w: bool = False) -> dict:
        """Params for a [T, K] x [K, N] GEMM on weights of format ``fmt`` (``xyjax.ops.gemm.format_name``): the
        smallest profiled T >= T of that format and shape, else the largest; {} (the backend's defaults for the
        format) when they were never profiled."""
        same = sorted((key[1], dict(p)) for key, p in self.entries if key[0] == fmt and key[2:] == (K, N, transpose_w))
        if not same:
            return {}
        return next((p for t, p in same if t >= T), same[-1][1])

    def to_json(self) -> dict:
        return dict(device=self.device, backend=self.backend,
                    entries=[dict(format=k[0], T=k[1], K=k[2], N=k[3], transpose_w=k[4], params=dict(p))
                             for k, p in self.entries])

    @classmethod
    def from_json(cls, data: dict) -> "GemmProfile":
        entries = tuple(((e.get("format", "plain"), int(e["T"]), int(e["K"]), int(e["N"]), bool(e["transpose_w"])),
                         tuple(sorted(e["params"].items()))) for e in data["entries"])
        return cls(device=data["device"], backend=data["backend"], entries=entries)

    def save(self, path: str, timings: dict | None = None) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = self.to_json()
        if timings:
            data["timings_ms"] = timings
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "GemmProfile":
        with open(path) as f:
            return cls.from_json(json.load(f))


def default_path(device: str, backend: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"
    return cache_dir("gemm-profiles", f"{slug}-{backend}.json")


def load_default(backend: str) -> GemmProfile | None:
    """This device's saved profile for ``backend``, or None."""
    path = default_path(jax.devices()[0].device_kind, backend)
    return GemmProfile.load(path) if os.path.exists(path) else None


def candidates(backend: str) -> list[dict]:
    """The tunables swept for ``backend`` (the first is its default)."""
    if backend == "ffi":
        lib = ascend_ffi.load()
        lanes = lib.xyjax_attention_threads()
        # The AMX kernel (where the CPU has it) cuts columns only and computes exactly m rows: lanes alone vary.
        amx = [dict(lanes=n, split_rows=False, m_align=1, stream_rows=stream, amx_rows=1)
               for stream, n in itertools.product((24, 12, 0, 64), range(lanes, 0, -1))] if lib.xyjax_gemm_amx() else []
        return amx + [dict(lanes=n, split_rows=rows, m_align=align, stream_rows=stream, amx_rows=0)
                      for stream, n, rows, align in itertools.product((24, 0, 64), range(lanes, 0, -1), (False, True),
                                                                      (1, 16))
                      if n > 1 or not rows]
    if backend == "pallas":
        return [dict(block_m=bm, block_n=bn, block_k=bk, m_major=order)
                for bm, bn, bk, order in itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64), (True, False))]
    raise ValueError(f"no tunables to profile for gemm backend {backend!r}; profile 'ffi' or 'pallas'")


def time_call(fn, *args, repeat: int = 5) -> float:
    """Best seconds of one call over ``repeat`` calls (after a warm-up call)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _weights(shape: tuple[int, ...], fmt: str, dtype, rng):
    """Random weights of ``shape`` held in format ``fmt`` ("plain", or "split" / "tiles": 4-bit blocks)."""
    w = rng.standard_normal(shape, np.float32)
    if fmt == "plain":
        return jnp.asarray(w, dtype)
    split = formats.quantize_blocks(w)
    return formats.pack_tiles(split) if fmt == "tiles" else jax.tree.map(jnp.asarray, split)


def profile(shapes: dict[str, tuple[int, int, bool]], buckets: list[int], backend: str, *,
            weight_formats: dict[str, str] | None = None, dtype=jnp.float32, repeat: int = 5, seed: int = 0,
            stream_bytes: int = 512 << 20, max_flops: float = 4e9) -> tuple[GemmProfile, dict]:
    """Times every candidate on every (shape, bucket T) and keeps the fastest, with each named shape's weights in
    its format of ``weight_formats`` (default "plain"; "split" and "tiles" need transposed shapes whose K is a
    multiple of 32): the format the engine will hold them in. A candidate's time is the sum
    over three real row counts the bucket serves: just past the previous bucket, the middle (odd), and T.
    Each time is one program's pass over a stack of distinct weights of about ``stream_bytes`` (per layer), so
    the weights come from memory as in a model's step: one matrix timed over and over stays in cache, where a
    BLAS's packing costs little and small-m gemms look compute-bound. The stack is cut to ``max_flops`` of work
    per pass (large buckets are compute-bound: where the weights come from matters little there).
    Returns the profile and {"name T": {candidate: ms}}."""
    device = jax.devices()[0].device_kind
    if backend == "pallas" and jax.default_backend() == "cpu":
        raise ValueError("profiling the pallas gemm backend needs a GPU: on CPU it runs in interpret mode, "
                         "whose timings say nothing about the kernel")
    options = candidates(backend)
    rng = np.random.default_rng(seed)
    entries, timings = [], {}
    buckets = sorted(buckets)
    lower = dict(zip(buckets, [0] + buckets[:-1]))
    weight_formats = weight_formats or {}
    work = [(name, shape, T) for name, shape in shapes.items() for T in buckets]
    stack = None   # (name, weights): one shape's stack at a time, drawn once for all its buckets

    def layers(T, K, N):
        return max(1, min(-(-stream_bytes // (K * N * jnp.dtype(dtype).itemsize)), int(max_flops / (2 * T * K * N))))

    for name, (K, N, transpose_w), T in tqdm(work, desc=f"profiling {backend} gemm"):
        rows = sorted({lower[T] + 1, (lower[T] + T) // 2 | 1, T} & set(range(1, T + 1)))
        if stack is None or stack[0] != name:   # sized for the smallest bucket, which passes over the most
            stack = None                          # the previous shape's stack freed before the next is drawn
            shape = (layers(buckets[0], K, N),) + ((N, K) if transpose_w else (K, N))
            stack = (name, _weights(shape, weight_formats.get(name, "plain"), dtype, rng))
        w, used = stack[1], layers(T, K, N)
        x = jnp.asarray(rng.standard_normal((T, K)), dtype)
        ms = {}
        for params in options:
            def stream(x, w, m, p=params):   # the first layers' gemms in turn; one element of each kept alive
                def one(i, acc):
                    out = smooth_gemm(x, w, m, layer=i, backend=backend, transpose_w=transpose_w, tuning=p)
                    return acc + out[0, 0].astype(jnp.float32)
                return jax.lax.fori_loop(0, used, one, jnp.float32(0))
            fn = jax.jit(stream)
            ms[json.dumps(params, sort_keys=True)] = 1e3 * sum(time_call(fn, x, w, jnp.int32(m), repeat=repeat)
                                                               for m in rows) / used
        best = min(ms, key=ms.get)
        fmt = weight_formats.get(name, "plain")
        entries.append(((fmt, T, K, N, transpose_w), tuple(sorted(json.loads(best).items()))))
        timings[f"{name} T={T}"] = ms
    return GemmProfile(device=device, backend=backend, entries=tuple(entries)), timings
