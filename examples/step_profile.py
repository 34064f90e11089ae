"""Where one engine step's time goes, op by op: XLA's own per-thunk timings from a JAX profiler trace.

Runs a few prompts through the default model, keeps the steps of one bucket, replays the last of them under
``jax.profiler.trace`` and prints the ops by time per step (each ffi_call is one of the C++ custom calls: the
dense layers' gemms, attention, the LM head; the fusions are the rest of the model and the sampler).

    python examples/step_profile.py                     # a 512-token prefill step
    python examples/step_profile.py --bucket 64         # a decode step of 33 rows over ~340-token contexts
"""

import argparse
import collections
import glob
import gzip
import json
import tempfile

import jax
import numpy as np

from xyjax.bench.breakdown import recording
from xyjax.llm import LLM
from xyjax.engine.sampling_params import SamplingParams

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--bucket", type=int, default=512, help="token bucket of the step to profile")
parser.add_argument("--repeat", type=int, default=3, help="traced replays of the step")
parser.add_argument("--top", type=int, default=30, help="ops to print")
args = parser.parse_args()

llm = LLM(None, progress=False)
rng = np.random.default_rng(0)
# Prefill steps come from long prompts; decode steps from many prompts that keep generating after them.
decode = args.bucket < llm.engine.config.max_num_batched_tokens
prompts = [rng.integers(256, 40000, size=300).tolist() for _ in range(33 if decode else 4)]
with recording(llm.engine, every=1) as steps:
    llm.generate(prompts, SamplingParams(max_tokens=40 if decode else 2, ignore_eos=True, temperature=0))
picked = [s for s in steps if s[0].token_ids.shape[0] == args.bucket]
if not picked:
    raise SystemExit(f"no step of bucket {args.bucket}; seen: {sorted({s[0].token_ids.shape[0] for s in steps})}")
inputs, sampling = picked[-1]
runner = llm.engine.runner


def step():
    out, runner.kv = runner._step(runner.params, runner.kv, inputs, sampling)   # the cache is donated
    jax.block_until_ready(out)


step()
with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.repeat):
            step()
    events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True)[0]))
events = events["traceEvents"] if isinstance(events, dict) else events
total, count = collections.Counter(), collections.Counter()
for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "ThunkExecutor", "end:")):
        total[e["name"]] += e["dur"] / 1e3 / args.repeat
        count[e["name"]] += 1
print(f"bucket {args.bucket}, {int(inputs.num_tokens)} real tokens: ms per step by op")
for name, ms in total.most_common(args.top):
    print(f"{ms:9.2f}  x{count[name] // args.repeat:<3d} {name}")
