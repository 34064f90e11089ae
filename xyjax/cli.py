"""Command line: ``xyjax generate "prompt" [...]``, ``xyjax serve [...]``, ``xyjax bench [--workload W] [...]``,
``xyjax bench-attention``, ``xyjax bench-gemm``, ``xyjax bench-prefix``, ``xyjax bench-spec``, ``xyjax bench-single``,
``xyjax profile`` and ``xyjax eval-quant``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax", description="Serve LLMs from JAX (after XY-Serve).")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for a prompt and stream it to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="known name, .gguf path or HF directory (default: smollm2-135m-instruct)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--dtype", default="float32")
    export = commands.add_parser("export-hf", help="write a model as an HF directory (config, safetensors, tokenizer)")
    export.add_argument("model", help="known name, .gguf path or HF directory")
    export.add_argument("directory")
    export.add_argument("--dtype", default="float32", help="of the written weights")
    bench = commands.add_parser("bench", help="time a workload on xyjax and the naive padded baseline")
    bench.add_argument("--workload", default="lognormal", help="lognormal, prefill-heavy, decode-heavy, shared-prefix")
    bench.add_argument("--num-requests", type=int, default=None)
    bench.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--compare", default="naive",
                       help="systems to run beside xyjax, comma-separated: naive, hf, hf-continuous, vllm, llamacpp, "
                            "openvino (peers not installed are skipped with a message)")
    bench.add_argument("--rates", default="",
                       help="also sweep these Poisson request rates (req/s, comma-separated) on xyjax and the peers")
    bench.add_argument("--naive-batch-size", default="16",
                       help="batch size(s) of the naive baseline, comma-separated, e.g. 16,64 (0: skip it)")
    bench.add_argument("--out", default="bench-results", help="directory for the JSON result")
    bench.add_argument("--model", default=None)
    _add_engine_options(bench, ENGINE_OPTIONS)
    serve = commands.add_parser("serve", help="serve the OpenAI API (completions, chat, models) over HTTP")
    serve.add_argument("--model", default=None,
                       help="known name, .gguf path or HF directory (default: smollm2-135m-instruct)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may finish after SIGINT/SIGTERM before they are aborted")
    _add_engine_options(serve, ENGINE_OPTIONS + SERVE_ENGINE_OPTIONS)
    serve.add_argument("--data-parallel-size", type=int, default=1, help="engine replicas, each on its own devices")
    serve.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 of a jax.distributed job")
    serve.add_argument("--num-processes", type=int, default=1)
    serve.add_argument("--process-id", type=int, default=0, help="0 serves HTTP; the others run its steps")
    serve.add_argument("--heartbeat-timeout", type=int, default=10,
                       help="seconds after which a dead process stops the others (jax.distributed)")
    passthrough = {  # commands with their own parsers: (module, help)
        "bench-attention": ("xyjax.bench.attention", "time Meta-Attention backends on hybrid batches"),
        "bench-gemm": ("xyjax.bench.gemm", "time SmoothGEMM against padded and exact-m XLA dots"),
        "bench-prefix": ("xyjax.bench.prefix", "prefix caching on vs off: shared system prompts, multi-turn chats"),
        "bench-spec": ("xyjax.bench.spec", "output tokens/s with and without speculative decoding"),
        "bench-single": ("xyjax.bench.single", "single-stream prefill, decode tok/s beside llama-bench and OpenVINO"),
        "bench-functional": ("xyjax.bench.functional", "decode tok/s of the fused jitted generate against the engine"),
        "profile": ("xyjax.bench.profile", "profile the gemm backend's tunables per linear shape and bucket"),
        "bench-features": ("xyjax.bench.features", "the cost of penalties and structured outputs on half the requests"),
        "bench-tp": ("xyjax.bench.tp", "per-step time of tensor parallelism against TP=1 on CPU devices"),
        "eval-quant": ("xyjax.bench.eval_quant", "int8 activations against the exact path: perplexity, KL, top-1"),
    }
    for name, (_, text) in passthrough.items():
        commands.add_parser(name, add_help=False, help=f"{text} (see --help of the command)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] and argv[0] in passthrough:
        import importlib

        return importlib.import_module(passthrough[argv[0]][0]).main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "export-hf":
        return _export_hf(args)
    if args.command == "serve":
        return _serve(args)

    from xyjax import LLM, SamplingParams

    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed)
        llm = LLM(args.model, dtype=args.dtype)
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=True)
        start, first = time.perf_counter(), None
        for piece in llm.stream(prompt, sampling):
            first = first or time.perf_counter()
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"xyjax: error: {e}", file=sys.stderr)
        return 2
    end = time.perf_counter()
    n = llm.stats["generated_tokens"]
    first = first or end
    print(file=sys.stdout)
    print(f"[{n} tokens in {end - start:.2f}s; first after {first - start:.2f}s, "
          f"then {(n - 1) / max(end - first, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


# engine options as flags: (EngineConfig field, type); unset flags keep the engine's default
def _json(text: str):
    return json.loads(text)


_json.__name__ = "JSON"   # argparse's error: "invalid JSON value: ..."


ENGINE_OPTIONS = (("max_num_batched_tokens", int), ("max_num_seqs", int), ("prefill_tile", int), ("block_size", int),
                  ("attention_backend", str), ("gemm_backend", str), ("weight_layout", str),
                  ("activation_quant", str), ("enable_prefix_caching", bool), ("speculative", _json),
                  ("tensor_parallel_size", int))
SERVE_ENGINE_OPTIONS = (("max_model_len", int), ("kv_cache_memory", int), ("max_logprobs", int), ("seed", int))


def _add_engine_options(parser, options) -> None:
    for name, kind in options:
        flag = "--" + name.replace("_", "-")
        if kind is bool:   # --enable-prefix-caching / --no-enable-prefix-caching
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=kind, default=None,
                                help='a JSON object, e.g. \'{"method": "ngram", "num_draft_tokens": 4}\'' if kind is _json
                                else None)


def _engine_options(args, options) -> dict:
    return {name: getattr(args, name) for name, _ in options if getattr(args, name) is not None}


def _serve(args) -> int:
    from xyjax.server import serve

    try:
        return serve(args.model, host=args.host, port=args.port, dtype=args.dtype,
                     served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                     shutdown_timeout=args.shutdown_timeout, data_parallel_size=args.data_parallel_size,
                     coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                     heartbeat_timeout=args.heartbeat_timeout, **_engine_options(args, ENGINE_OPTIONS + SERVE_ENGINE_OPTIONS))
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"xyjax: error: {e}", file=sys.stderr)
        return 2


def _export_hf(args) -> int:
    import numpy as np

    from models.hf_export import export_hf
    from models.loader import load

    try:
        export_hf(load(args.model), args.directory, dtype=np.dtype(args.dtype))
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"xyjax: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.directory}")
    return 0


def _bench(args) -> int:
    from xyjax.bench.runs import bench
    from xyjax.bench.workload import WORKLOADS

    if args.workload not in WORKLOADS:
        print(f"xyjax: error: unknown workload {args.workload!r}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    options = _engine_options(args, ENGINE_OPTIONS)
    try:
        sizes = tuple(int(b) for b in args.naive_batch_size.split(",") if int(b) > 0)
    except ValueError:
        print(f"xyjax: error: --naive-batch-size wants integers, got {args.naive_batch_size!r}", file=sys.stderr)
        return 2
    from xyjax.bench.peers import PEERS

    compare = [c for c in args.compare.split(",") if c]
    unknown = set(compare) - {"naive", *PEERS}
    if unknown:
        print(f"xyjax: error: unknown --compare system(s) {sorted(unknown)}; known: naive, {', '.join(PEERS)}",
              file=sys.stderr)
        return 2
    sizes = sizes if "naive" in compare else ()
    peers = tuple(c for c in compare if c != "naive")
    try:
        rates = tuple(float(r) for r in args.rates.split(",") if r)
    except ValueError:
        print(f"xyjax: error: --rates wants numbers, got {args.rates!r}", file=sys.stderr)
        return 2
    bench(args.workload, args.num_requests, args.rate, args.seed, sizes, args.out, args.model, peers=peers,
          rates=rates, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
