"""OpenVINO GenAI as a ``xyjax bench --compare`` peer (see protocol.py); run it with ``.venv-openvino/bin/python``
(``make openvino-env``).

Builds ``openvino_genai.ContinuousBatchingPipeline`` on the GGUF file the engine loads (``--model-dir`` is that
file here: openvino-genai reads it directly, keeping the file's 4- and 8-bit blocks compressed, u4/u8 weights with
f16 scales and zero points, and converts its tokenizer with openvino-tokenizers) on the CPU with OpenVINO's
defaults: the scheduler's (continuous batching, prompts split into chunks of ``max_num_batched_tokens``) and the
CPU plugin's (on this machine: bf16 inference precision, activations of the compressed weights' matmuls quantized
dynamically to int8 per group of 32, a u8 KV cache, every core a thread); the settings in OUT.json name them.
Drives the pipeline step by step as the vllm peer drives vLLM: each request is added when its arrival time comes,
with its exact prompt token ids (an ``ov.Tensor``), greedy, ``ignore_eos`` and ``min_new_tokens`` =
``max_new_tokens`` = output_len; after each ``step()`` the requests' handles are read, the first token read gives
the first-token time, the end of the request its finish. The clock starts after two warm-up requests.

``--sequential`` runs one request at a time in input order, each added when the one before has finished (the
arrival times unused): ``xyjax bench-single``'s single-stream figures, from the records' ``added`` times.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402

CPU_PROPERTIES = ("INFERENCE_PRECISION_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "KEY_CACHE_PRECISION",
                  "VALUE_CACHE_PRECISION", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "EXECUTION_MODE_HINT",
                  "ENABLE_CPU_PINNING", "FULL_DEVICE_NAME")
SCHEDULER_FIELDS = ("max_num_batched_tokens", "max_num_seqs", "dynamic_split_fuse", "enable_prefix_caching",
                    "cache_size", "num_kv_blocks")


def generation_config(output_len: int):
    """Greedy, exactly ``output_len`` new tokens whatever the model emits."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.do_sample = False
    config.ignore_eos = True
    config.min_new_tokens = config.max_new_tokens = output_len
    return config


def input_ids(prompt_token_ids: list[int]):
    import numpy as np
    import openvino

    return openvino.Tensor(np.asarray([prompt_token_ids], dtype=np.int64))


def read_tokens(handle) -> list[int]:
    """The tokens ``handle`` has produced since it was last read (greedy: one sequence)."""
    tokens = []
    while handle.can_read():
        for output in handle.read().values():
            tokens += output.generated_ids
    return tokens


def run(pipe, requests: list[dict], sequential: bool = False) -> tuple[list[dict], dict]:
    """Feed ``requests`` to ``pipe`` at their arrival times (``sequential``: each once the one before has finished)
    and step until all finish: per-request records (with ``added`` and the generated ``output_token_ids``) and
    figures of the run."""
    import openvino_genai

    pending = list(range(len(requests))) if sequential else sorted(range(len(requests)),
                                                                   key=lambda i: requests[i]["arrival"])
    handles, added, first, finish, tokens = {}, {}, {}, {}, {i: [] for i in range(len(requests))}
    steps = 0
    t0 = time.perf_counter()
    while pending or handles:
        now = time.perf_counter() - t0
        while pending and (not handles if sequential else requests[pending[0]]["arrival"] <= now):
            i = pending.pop(0)
            handles[i] = pipe.add_request(i, input_ids(requests[i]["prompt_token_ids"]),
                                          generation_config(requests[i]["output_len"]))
            added[i] = now
        if not handles:
            time.sleep(max(0.0, requests[pending[0]]["arrival"] - now))
            continue
        pipe.step()
        now = time.perf_counter() - t0
        steps += 1
        for i, handle in list(handles.items()):
            tokens[i] += read_tokens(handle)
            if tokens[i] and i not in first:
                first[i] = now
            status = handle.get_status()
            if status == openvino_genai.GenerationStatus.RUNNING:
                continue
            if status != openvino_genai.GenerationStatus.FINISHED:
                raise RuntimeError(f"request {i} ended {status}")
            finish[i] = now
            del handles[i]
    wall = time.perf_counter() - t0
    for i, r in enumerate(requests):
        if len(tokens[i]) != r["output_len"]:
            raise RuntimeError(f"request {i}: {len(tokens[i])} tokens generated, {r['output_len']} asked")
    records = [dict(arrival=r["arrival"], added=added[i], first_token=first[i], finish=finish[i],
                    prompt_len=len(r["prompt_token_ids"]), output_len=r["output_len"], output_token_ids=tokens[i])
               for i, r in enumerate(requests)]
    return records, dict(wall_time=wall, steps=steps)


def plain(value):
    """An OpenVINO property value as JSON: an element type by its name (``bf16``), an enum member by its own."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    return getattr(value, "name", value)


def settings(gguf: str, scheduler) -> dict:
    """The scheduler's settings and the CPU plugin's defaults the pipeline compiled with (no properties given)."""
    import openvino

    core = openvino.Core()
    return dict(gguf=gguf, device="CPU", scheduler={k: getattr(scheduler, k) for k in SCHEDULER_FIELDS},
                cpu={k: plain(core.get_property("CPU", k)) for k in CPU_PROPERTIES},
                weights="the GGUF file's blocks, compressed (u4/u8, f16 scales and zero points)",
                threads=len(os.sched_getaffinity(0)), openvino=openvino.__version__)


def main() -> None:
    p = protocol.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sequential", action="store_true",
                   help="one request at a time, in input order (single-stream figures)")
    args = p.parse_args()

    import openvino_genai

    requests = protocol.read_requests(args.requests)
    scheduler = openvino_genai.SchedulerConfig()
    t = time.perf_counter()
    pipe = openvino_genai.ContinuousBatchingPipeline(args.model_dir, scheduler, "CPU")
    startup = time.perf_counter() - t
    t = time.perf_counter()
    run(pipe, [dict(prompt_token_ids=list(range(256, 256 + n)), output_len=8, arrival=0.0) for n in (200, 24)])
    warmup = time.perf_counter() - t

    records, stats = run(pipe, requests, args.sequential)
    metrics = pipe.get_metrics()
    stats.update(startup_seconds=startup, warmup_seconds=warmup, cache_size_bytes=metrics.cache_size_in_bytes,
                 max_cache_usage=metrics.max_cache_usage)
    protocol.write_result(args.out, f"OpenVINO GenAI {openvino_genai.__version__} (ContinuousBatchingPipeline, CPU)",
                          dict(settings(args.model_dir, scheduler), sequential=args.sequential), stats, records)


if __name__ == "__main__":
    main()
