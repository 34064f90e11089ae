"""The ``hf`` peer: transformers on CPU, float32, greedy, exactly output_len tokens per request (EOS ignored).

    python hf_peer.py --model-dir DIR --requests IN.json --out OUT.json [--mode static|continuous] [--batch-size B]

static      ``model.generate`` on batches of B requests in arrival order, prompts left-padded to the batch's
            longest, each batch decoded to its longest output (a batch starts once its last request arrived).
            Per-token times come from a streamer, so a request's first token is the batch's first step and
            its finish the step that produced its last token.
continuous  transformers' own continuous batching (``model.init_continuous_batching``): requests are added
            at their arrival times, per-token timestamps recorded.
Runs as a plain script (protocol.py beside it; no jax or xyjax import).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402


class _StepClock:
    """A ``generate`` streamer that records the time of every decoding step (the prompt's ``put`` excluded)."""

    def __init__(self):
        self.times, self._prompt_seen = [], False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


def run_static(model, requests, batch_size: int, pad_id: int, t0: float):
    import torch

    records = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: requests[i]["arrival"])
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        wait = t0 + requests[batch[-1]]["arrival"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        longest = max(len(requests[i]["prompt_token_ids"]) for i in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            prompt = requests[i]["prompt_token_ids"]
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        steps = max(requests[i]["output_len"] for i in batch)
        clock = _StepClock()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=pad_id, streamer=clock)
        for i in batch:
            r = requests[i]
            records[i] = dict(arrival=r["arrival"], first_token=clock.times[0] - t0,
                              finish=clock.times[r["output_len"] - 1] - t0, prompt_len=len(r["prompt_token_ids"]),
                              output_len=r["output_len"])
    return records


def run_continuous(model, requests, t0: float, batch_tokens: int):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(r["output_len"] for r in requests))
    # A KV cache that holds the whole workload at once (by default transformers sizes it from free memory, which
    # on CPU means most of the machine's RAM) and the token budget per step of xyjax's default.
    page = 256
    blocks = sum(-(-(len(r["prompt_token_ids"]) + r["output_len"]) // page) for r in requests)
    cb_config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=batch_tokens)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
    manager.start()
    try:
        order = sorted(range(len(requests)), key=lambda i: requests[i]["arrival"])
        for i in order:
            r = requests[i]
            wait = t0 + r["arrival"] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            manager.add_request(r["prompt_token_ids"], request_id=str(i), max_new_tokens=r["output_len"],
                                record_timestamps=True, eos_token_id=-1)
        records = [None] * len(requests)
        for _ in requests:
            out = manager.get_result(timeout=3600)
            if out is None or out.error:
                raise RuntimeError(f"continuous batching failed: {getattr(out, 'error', 'timed out')}")
            i, r = int(out.request_id), requests[int(out.request_id)]
            if len(out.generated_tokens) != r["output_len"]:
                raise RuntimeError(f"request {i}: {len(out.generated_tokens)} tokens, wanted {r['output_len']}")
            records[i] = dict(arrival=r["arrival"], first_token=out.timestamps[0] - t0, finish=out.timestamps[-1] - t0,
                              prompt_len=len(r["prompt_token_ids"]), output_len=r["output_len"])
    finally:
        manager.stop(block=True)
    return records


def main() -> int:
    p = protocol.parser(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("static", "continuous"), default="static")
    p.add_argument("--batch-size", type=int, default=16, help="static: requests per batch")
    p.add_argument("--batch-tokens", type=int, default=512, help="continuous: tokens per step")
    args = p.parse_args()
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    requests = protocol.read_requests(args.requests)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    with torch.no_grad():   # warm-up, off the clock
        model.generate(input_ids=torch.tensor([requests[0]["prompt_token_ids"][:16]]), max_new_tokens=2,
                       do_sample=False, pad_token_id=pad_id)
    startup = time.perf_counter() - start
    t0 = time.perf_counter()
    if args.mode == "static":
        records = run_static(model, requests, args.batch_size, pad_id, t0)
    else:
        records = run_continuous(model, requests, t0, args.batch_tokens)
    wall = time.perf_counter() - t0
    settings = dict(mode=args.mode, batch_size=args.batch_size if args.mode == "static" else None,
                    batch_tokens=args.batch_tokens if args.mode == "continuous" else None,
                    threads=torch.get_num_threads(), dtype="float32")
    protocol.write_result(args.out, f"transformers {transformers.__version__} ({args.mode})", settings,
                          dict(wall_time=wall, startup_seconds=startup), records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
