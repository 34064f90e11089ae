"""``xyjax profile``: measure the gemm backend's tunables for every linear shape of a model and every token
bucket, and save the table the engine reads at start (``xyjax.ops.gemm.profile``).

    xyjax profile [--model M] [--backend ffi|pallas] [--buckets 16,32,...] [--out PATH]
"""

from __future__ import annotations

import argparse

import jax

from models.llama import linear_shapes
from models.loader import load
from xyjax.engine.config import EngineConfig
from xyjax.ops.gemm import prepare_weights
from xyjax.ops.gemm.profile import default_path, profile


PARAMS = {"qkv": "wqkv", "o": "wo", "gate_up": "w_gate_up", "down": "w_down"}   # linear_shapes name -> layer param


def sample_weights(model, backend: str, layout: str) -> dict:
    """One layer of each linear layer's weights as the engine holds them (``prepare_weights``: their format, e.g.
    ``GGUFBlocks`` of the file's qtype), by linear_shapes name: what ``profile`` times."""
    params = prepare_weights(model.params, backend, layout)
    first = {name: jax.tree.map(lambda a: a[0], params["layers"][p]) for name, p in PARAMS.items()}
    return first | {"lm_head": params.get("lm_head", params["embed"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax profile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="known name, .gguf path or HF directory (default model)")
    parser.add_argument("--backend", default="ffi" if jax.default_backend() == "cpu" else "pallas")
    parser.add_argument("--buckets", default=None, help="token buckets, comma-separated (default: the engine's)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stream-mib", type=int, default=512,
                        help="MiB of distinct weights (as stored) each timing passes over (so they come from memory)")
    parser.add_argument("--weight-layout", default="auto", help="as the engine option weight_layout (the formats timed)")
    parser.add_argument("--out", default=None, help="table path (default: the cache path the engine reads)")
    args = parser.parse_args(argv)
    buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else list(EngineConfig().token_buckets)
    model = load(args.model)
    result, timings = profile(linear_shapes(model.config), buckets, args.backend, repeat=args.repeat,
                              weights=sample_weights(model, args.backend, args.weight_layout),
                              stream_bytes=args.stream_mib << 20)
    path = args.out or default_path(result.device, args.backend)
    result.save(path, timings)
    for (fmt, T, K, N, tr), params in result.entries:
        print(f"{fmt} T={T:4d} K={K:5d} N={N:6d}{' (w^T)' if tr else ''}: {dict(params)}")
    print(f"wrote {path}")
    return 0
