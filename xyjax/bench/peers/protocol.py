"""The file protocol between ``xyjax bench --compare`` and a peer system run in its own process and environment.

A peer is a script run as ``<its python> <script> --model-dir DIR --requests IN.json --out OUT.json [options]``
by an interpreter that need not have jax or xyjax (this module is plain Python; peer scripts import it by path).

IN.json:  {"requests": [{"prompt_token_ids": [int], "output_len": int, "arrival": float}, ...]}
          arrival: seconds from the start of the timed run; every request must produce exactly output_len
          tokens (greedy, ignore EOS), float32, from the model in DIR (an HF directory: config.json,
          safetensors, tokenizer files; ``xyjax export-hf`` writes one). The llamacpp and openvino peers get the
          GGUF file the engine loaded instead, and run it as llama.cpp and OpenVINO do (their own kernels for
          the file's formats).
OUT.json: {"system": str (name and version), "settings": {...}, "stats": {"wall_time": float, ...},
           "records": [{"arrival", "first_token", "finish": float seconds on the run's clock,
                        "prompt_len", "output_len": int}, ...]}   (one record per request, input order; a peer
           may add fields, e.g. "output_token_ids", or "added": when the request was handed to the system)
``xyjax.bench.workload.summarize`` turns records into the table's figures, the same way for every system.
"""

from __future__ import annotations

import argparse
import json


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every peer script takes (peers may add their own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-dir", required=True, help="HF-format model directory")
    p.add_argument("--requests", required=True, help="IN.json (see xyjax/bench/peers/protocol.py)")
    p.add_argument("--out", required=True, help="OUT.json to write")
    return p


def read_requests(path: str) -> list[dict]:
    with open(path) as f:
        requests = json.load(f)["requests"]
    for i, r in enumerate(requests):
        if not r["prompt_token_ids"] or r["output_len"] < 1 or r["arrival"] < 0:
            raise ValueError(f"request {i}: needs a non-empty prompt, output_len >= 1 and arrival >= 0")
    return requests


def write_result(path: str, system: str, settings: dict, stats: dict, records: list[dict]) -> None:
    for i, r in enumerate(records):
        missing = {"arrival", "first_token", "finish", "prompt_len", "output_len"} - set(r)
        if missing:
            raise ValueError(f"record {i} lacks {sorted(missing)}")
    if "wall_time" not in stats:
        raise ValueError("stats must hold wall_time")
    with open(path, "w") as f:
        json.dump(dict(system=system, settings=settings, stats=stats, records=records), f, indent=1)
