"""Load test of `xyjax serve` on loopback: N concurrent streaming chat clients for a bounded time.

    xyjax serve &                                   # wait for /health
    python examples/load_test.py --clients 16 --duration 60 --max-tokens 64 --out load.json

Each client sends chat requests back to back (prompts drawn from a fixed, seeded list) until the duration
is over, then finishes the one in flight. Reports requests/s, output tokens/s, TTFT, TPOT and latency
percentiles, and errors (the exit status is 1 if there was any); writes them as JSON with --out. Needs the
`openai` client (the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import sys
import time
import urllib.parse

import httpx
import numpy as np
import openai

TOPICS = ["the sea", "a mountain village", "bread", "the moon", "trains", "a library", "winter", "bees",
          "a lighthouse", "chess", "rain in the city", "an old clock", "volcanoes", "tea", "the desert", "owls"]
ASKS = ["Write a short poem about {}.", "Explain {} to a child in three sentences.", "List five facts about {}.",
        "Tell a very short story about {}.", "Describe {} in one paragraph."]


def _loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))


async def _client(client: openai.AsyncOpenAI, model: str, rng: random.Random, end: float, max_tokens: int,
                  records: list[dict]) -> None:
    while time.perf_counter() < end:
        prompt = rng.choice(ASKS).format(rng.choice(TOPICS))
        start, first, tokens, error = time.perf_counter(), None, 0, None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0.7, seed=rng.randrange(2**31), stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as e:   # every failure counts as an error of the run
            error = f"{type(e).__name__}: {e}"
        records.append(dict(start=start, first=first, end=time.perf_counter(), tokens=tokens, error=error))


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} | {"mean": float(np.mean(values))}


def _compiles(url: str) -> float | None:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("xyjax_compiles "):
            return float(line.split()[1])
    return None


async def run(url: str, clients: int, duration: float, max_tokens: int, seed: int) -> dict:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        compiles_before = _compiles(url)
        records: list[dict] = []
        begin = time.perf_counter()
        await asyncio.gather(*(_client(client, model, random.Random(seed + i), begin + duration, max_tokens, records)
                               for i in range(clients)))
        elapsed = time.perf_counter() - begin
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return dict(
        url=url, model=model, clients=clients, duration_s=duration, max_tokens=max_tokens, elapsed_s=elapsed,
        requests=len(ok), errors=len(records) - len(ok),
        error_samples=sorted({r["error"] for r in records if r["error"]})[:5],
        requests_per_s=len(ok) / elapsed, output_tokens=tokens, output_tokens_per_s=tokens / elapsed,
        ttft_s=_percentiles([r["first"] - r["start"] for r in ok if r["first"] is not None]),
        tpot_s=_percentiles([(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok
                             if r["first"] is not None and r["tokens"] > 1]),
        latency_s=_percentiles([r["end"] - r["start"] for r in ok]),
        compiles_before=compiles_before, compiles_after=_compiles(url))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback addresses only)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60, help="seconds during which clients start requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    if not _loopback(url):
        parser.error(f"{url} is not a loopback address; this load test only runs against a local server")
    result = asyncio.run(run(url, args.clients, args.duration, args.max_tokens, args.seed))
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
