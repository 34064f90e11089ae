"""Seeded synthetic serving workloads and the metrics a benchmark reports on them.

A ``Workload`` describes ``num_requests`` requests whose prompt and output lengths are lognormal around
a median (``length = rint(median * exp(sigma * N(0, 1)))``, clipped to ``[min, max]``), whose prompt
tokens are uniform random ids in ``[token_low, vocab_size)``, and which arrive all at t = 0
(``rate`` None or inf) or as a Poisson process of ``rate`` requests/s (exponential gaps of mean
``1 / rate``; the first request arrives at t = 0). Outputs are meant to be generated with ignore-EOS
semantics: each request produces exactly ``output_len`` tokens, so every engine does the same work.

Presets (``WORKLOADS``):

- ``lognormal``: the general mix: prompts median 200 (16..1024), outputs median 80 (8..512), sigma 0.6.
- ``prefill-heavy``: long prompts, short answers (summarisation, RAG): prompts median 600 (128..1024,
  sigma 0.4), outputs median 24 (4..128).
- ``decode-heavy``: short prompts, long answers (chat, generation): prompts median 64 (8..256), outputs
  median 256 (32..512, sigma 0.4).
- ``shared-prefix``: every prompt is the same 256-token prefix (a system prompt) followed by a lognormal
  tail of median 64 (8..512); outputs as ``lognormal``. For a prefix cache to exploit.

Everything is a pure function of the workload's fields: the same ``seed`` gives the same requests, and
the random draws are made in a fixed order (prompt lengths, output lengths, arrival gaps, shared prefix,
prompt tokens) so e.g. changing ``rate`` changes only the arrival times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """A seeded family of requests (see the module docstring). Lengths are in tokens, ``rate`` in requests/s.

    With ``shared_prefix > 0`` every prompt starts with the same ``shared_prefix`` tokens and the
    ``prompt_*`` fields describe the tail after it. ``token_low`` = 256 keeps prompt ids clear of the
    default model's special tokens (ids 0..16) and its single-byte tokens.
    """

    name: str
    num_requests: int = 64
    prompt_median: float = 200
    prompt_sigma: float = 0.6
    prompt_min: int = 16
    prompt_max: int = 1024
    output_median: float = 80
    output_sigma: float = 0.6
    output_min: int = 8
    output_max: int = 512
    rate: float | None = None
    seed: int = 0
    token_low: int = 256
    shared_prefix: int = 0


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request: prompt ids, the exact number of tokens to generate, arrival in seconds from the start."""

    prompt_token_ids: list[int]
    output_len: int
    arrival: float


WORKLOADS: dict[str, Workload] = {
    "lognormal": Workload("lognormal"),
    "prefill-heavy": Workload("prefill-heavy", prompt_median=600, prompt_sigma=0.4, prompt_min=128,
                              output_median=24, output_min=4, output_max=128),
    "decode-heavy": Workload("decode-heavy", prompt_median=64, prompt_min=8, prompt_max=256,
                             output_median=256, output_sigma=0.4, output_min=32),
    "shared-prefix": Workload("shared-prefix", shared_prefix=256, prompt_median=64, prompt_min=8, prompt_max=512),
}


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float, low: int, high: int) -> np.ndarray:
    """[n] int lengths, lognormal around ``median`` (sigma of ln length), clipped to [low, high]."""
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), low, high).astype(int)


def make_requests(w: Workload, vocab_size: int) -> list[BenchRequest]:
    """The requests of ``w`` in arrival order, prompt ids in ``[w.token_low, vocab_size)``. Deterministic."""
    if not 0 <= w.token_low < vocab_size:
        raise ValueError(f"token_low={w.token_low} must lie in [0, vocab_size={vocab_size})")
    rng = np.random.default_rng(w.seed)
    n = w.num_requests
    prompt_lens = _lengths(rng, n, w.prompt_median, w.prompt_sigma, w.prompt_min, w.prompt_max)
    output_lens = _lengths(rng, n, w.output_median, w.output_sigma, w.output_min, w.output_max)
    gaps = rng.standard_exponential(n)
    if w.rate is None or math.isinf(w.rate):
        arrivals = np.zeros(n)
    else:
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) / w.rate
    prefix = rng.integers(w.token_low, vocab_size, w.shared_prefix).tolist()
    return [BenchRequest(prefix + rng.integers(w.token_low, vocab_size, int(p)).tolist(), int(o), float(a))
            for p, o, a in zip(prompt_lens, output_lens, arrivals)]


def summarize(records: list[dict], wall_time: float) -> dict:
    """Throughput and latency percentiles of a finished run.

    records: one dict per request with ``arrival``, ``first_token``, ``finish`` (seconds on the run's
    clock), ``prompt_len``, ``output_len``. TTFT = first_token - arrival; TPOT = (finish - first_token) /
    (output_len - 1), over requests with output_len > 1 (NaN when there are none). Percentiles interpolate
    linearly (``np.percentile``). Times in seconds, rates per second of ``wall_time``.
    """
    prompt_tokens = sum(r["prompt_len"] for r in records)
    output_tokens = sum(r["output_len"] for r in records)
    ttft = [r["first_token"] - r["arrival"] for r in records]
    tpot = [(r["finish"] - r["first_token"]) / (r["output_len"] - 1) for r in records if r["output_len"] > 1]
    pct = lambda values, q: float(np.percentile(values, q)) if values else math.nan  # noqa: E731
    return {
        "num_requests": len(records),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_time,
        "output_tokens_per_s": output_tokens / wall_time,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
    }


def write_result(out_dir: str, name: str, result: dict, indent: int = 1) -> str:
    """``result`` as ``<out_dir>/<name>-<time>.json`` (the directory made if missing); prints and returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=indent)
    print(f"wrote {path}")
    return path
