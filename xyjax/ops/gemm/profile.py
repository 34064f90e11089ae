"""The offline SmoothGEMM profile: for each weight format, linear shape and token bucket, the fastest tunables
of a gemm backend, measured on this device (``xyjax profile``, ``xyjax.bench.profile``) and looked up when the
engine traces its steps.

A profile is a JSON table keyed by device kind (``jax.devices()[0].device_kind``) and backend, one entry
per (format, T, K, N, transpose_w): the winning ``params`` and the milliseconds of every candidate. The format is
``xyjax.ops.gemm.format_name`` of the weight: "plain", "split", "tiles", or "blocks:<qtype>" for ``GGUFBlocks``
(e.g. "blocks:Q4_1" dense layers, "blocks:Q8_0" LM head: one table serves every model on the device, and each
qtype has its own kernels and bytes per weight). It lives in
``$XYJAX_CACHE_DIR/gemm-profiles/<device kind>-<backend>.json``. The engine loads it at start (no file:
every call runs the backend's defaults for its format) and passes each GEMM the params of its format, shape
and bucket (the entry with the smallest T >= the bucket, else the largest T; exact format, K, N, transpose_w).
``xyjax profile`` times each shape on copies of one layer of the weights as the engine holds them on this
machine (``prepare_weights``), so in their format and qtype.

Tunables (see ``xyjax.ops.gemm.ffi``): ``ffi`` lanes, the streaming kernel's row limit and whether the AMX kernel
runs (where the CPU has it), then for plain, split and tile weights row or column split and m alignment (the
BLAS), for GGUF blocks row or column split of the panels the BLAS multiplies, only the row limits that stream
different rows of the bucket; ``pallas`` the ``GemmTiling`` fields (block sizes and grid order; its timings only
mean something on a GPU, so profiling it on CPU is refused).
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
from xyjax.ops.gemm import format_name, smooth_gemm
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


def candidates(backend: str, fmt: str = "plain", rows: tuple[int, ...] = (1,)) -> list[dict]:
    """The tunables swept for ``backend`` on weights of format ``fmt`` (``format_name``) and a bucket whose
    timed row counts are ``rows`` (the first candidate is the backend's default)."""
    if backend == "ffi":
        lib = ascend_ffi.load()
        lanes, amx = range(lib.xyjax_attention_threads(), 0, -1), lib.xyjax_gemm_amx()
        return _ffi_blocks(lanes, amx, rows) if fmt.startswith("blocks") else _ffi_dense(lanes, amx)
    if backend == "pallas":
        return [dict(block_m=bm, block_n=bn, block_k=bk, m_major=order)
                for bm, bn, bk, order in itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64), (True, False))]
    raise ValueError(f"no tunables to profile for gemm backend {backend!r}; profile 'ffi' or 'pallas'")


def _ffi_dense(lanes: range, amx: bool) -> list[dict]:
    """Plain, split and tile weights: the streaming kernel's row limit, then AMX (where the CPU has it; it cuts
    columns only and computes exactly m rows: lanes alone vary) or the BLAS (lanes, row split, m alignment)."""
    with_amx = [dict(lanes=n, split_rows=False, m_align=1, stream_rows=stream, amx_rows=1)
                for stream, n in itertools.product((24, 12, 0, 64), lanes)] if amx else []
    return with_amx + [dict(lanes=n, split_rows=rows, m_align=align, stream_rows=stream, amx_rows=0)
                       for stream, n, rows, align in itertools.product((24, 0, 64), lanes, (False, True), (1, 16))
                       if n > 1 or not rows]


def _ffi_blocks(lanes: range, amx: bool, rows: tuple[int, ...]) -> list[dict]:
    """GGUF blocks: the block streaming kernel's row limit (of 24, 8, 16, 0, 64, the first of each set of ``rows``
    it streams: the others time the same kernels), then for the rows it leaves, the panels by AMX (where the CPU
    has it; columns only) or the BLAS (lanes, row split); no m alignment (the block kernels compute exactly m
    rows)."""
    streams = {}
    for stream in (24, 8, 16, 0, 64):
        streams.setdefault(sum(m <= stream for m in rows), stream)
    amx_rows = (1, 0) if amx else (0,)
    return [dict(lanes=n, split_rows=split, m_align=1, stream_rows=stream, amx_rows=a)
            for streamed, stream in streams.items()
            for a in (amx_rows if streamed < len(rows) else amx_rows[:1])   # every row streamed: no panels
            for n, split in itertools.product(lanes, (False, True))
            if not split or (n > 1 and not a and streamed < len(rows))]


def time_call(fn, *args, repeat: int = 5) -> float:
    """Best seconds of one call over ``repeat`` calls (after a warm-up call)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _stack(sample, layers: int):
    """``layers`` copies of the weight ``sample`` (any format) as a stack [layers, ...] in distinct memory."""
    return jax.tree.map(lambda a: jnp.asarray(np.broadcast_to(np.asarray(a), (layers, *a.shape))), sample)


def profile(shapes: dict[str, tuple[int, int, bool]], buckets: list[int], backend: str, *,
            weights: dict | None = None, dtype=jnp.float32, repeat: int = 5, seed: int = 0,
            stream_bytes: int = 512 << 20, max_flops: float = 4e9) -> tuple[GemmProfile, dict]:
    """Times every candidate on every (shape, bucket T) and keeps the fastest, keyed by the format of each named
    shape's weights: copies of its sample in ``weights`` (one layer [N, K] ([K, N] without transpose_w) in any
    format: the weight the engine holds, e.g. ``GGUFBlocks`` of the file's qtype), else random plain weights of
    ``dtype``. A candidate's time is the sum over three real row counts the bucket serves: just past the
    previous bucket, the middle (odd), and T. Each time is one program's pass over a stack of distinct weights of
    about ``stream_bytes`` as stored, so the weights come from memory as in a model's step: one matrix timed over
    and over stays in cache, where a BLAS's packing costs little and small-m gemms look compute-bound. The stack
    is cut to ``max_flops`` of work per pass (large buckets are compute-bound: where the weights come from
    matters little there).
    Returns the profile and {"name T": {candidate: ms}}."""
    device = jax.devices()[0].device_kind
    if backend == "pallas" and jax.default_backend() == "cpu":
        raise ValueError("profiling the pallas gemm backend needs a GPU: on CPU it runs in interpret mode, "
                         "whose timings say nothing about the kernel")
    rng = np.random.default_rng(seed)
    entries, timings = [], {}
    buckets = sorted(buckets)
    lower = dict(zip(buckets, [0] + buckets[:-1]))
    weights = weights or {}
    with tqdm(total=len(shapes) * len(buckets), desc=f"profiling {backend} gemm") as bar:
        for name, (K, N, transpose_w) in shapes.items():
            sample = weights[name] if name in weights else jnp.asarray(
                rng.standard_normal((N, K) if transpose_w else (K, N)), dtype)
            fmt, layer_bytes = format_name(sample), sum(a.nbytes for a in jax.tree.leaves(sample))

            def layers(T):
                return max(1, min(-(-stream_bytes // layer_bytes), int(max_flops / (2 * T * K * N))))

            w = _stack(sample, layers(buckets[0]))   # sized for the smallest bucket, which passes over the most
            for T in buckets:
                rows = sorted({lower[T] + 1, (lower[T] + T) // 2 | 1, T} & set(range(1, T + 1)))
                x = jnp.asarray(rng.standard_normal((T, K)), dtype)
                ms = {json.dumps(p, sort_keys=True): _time_pass(x, w, rows, layers(T), backend, transpose_w, p, repeat)
                      for p in candidates(backend, fmt, tuple(rows))}
                best = min(ms, key=ms.get)
                entries.append(((fmt, T, K, N, transpose_w), tuple(sorted(json.loads(best).items()))))
                timings[f"{name} T={T}"] = ms
                bar.update()
            del w   # this shape's stack freed before the next one's is drawn
    return GemmProfile(device=device, backend=backend, entries=tuple(entries)), timings


def _time_pass(x, w, rows: list[int], used: int, backend: str, transpose_w: bool, params: dict, repeat: int) -> float:
    """Milliseconds per layer of one pass over the first ``used`` layers of ``w`` with ``params``, summed over the
    row counts ``rows``."""
    def stream(x, w, m):   # the layers' gemms in turn; one element of each kept alive
        def one(i, acc):
            out = smooth_gemm(x, w, m, layer=i, backend=backend, transpose_w=transpose_w, tuning=params)
            return acc + out[0, 0].astype(jnp.float32)
        return jax.lax.fori_loop(0, used, one, jnp.float32(0))
    fn = jax.jit(stream)
    return 1e3 * sum(time_call(fn, x, w, jnp.int32(m), repeat=repeat) for m in rows) / used
