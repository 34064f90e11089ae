"""Where a step's time goes: host planning, dense layers (GEMM), attention, sampling and the rest of the model.

The engine times its host side itself (``host_plan_seconds``: scheduling + planning; ``host_output_seconds``:
applying sampled tokens, stops, detokenising) and the jitted step as a whole (``device_seconds``). To split the
device side, ``device_breakdown`` replays recorded steps (the real ``StepInputs`` of a run) through jitted
programs holding only one part each, at the same bucket, real counts and backends as the engine:
    gemm       every ``smooth_gemm`` of the step (4 per layer, the LM head on the sampled rows)
    attention  ``meta_attention`` of every layer over the step's task tables and the engine's KV cache
    sampling   the sampler on [R, V] logits
and ``other`` = the whole step - the three (embedding, norms, RoPE, KV writes, activations). Each program is
timed best-of-``repeat`` per recorded step; figures are means over the recorded steps.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.weights import DENSE
from xyjax.ops.sampler import sample


@contextlib.contextmanager
def recording(engine, every: int = 8):
    """Within the block, ``engine`` keeps the (StepInputs, SamplingInputs) of every ``every``-th step in the
    yielded list."""
    recorded, count = [], itertools.count()
    run = engine.runner.run

    def recording_run(inputs, sampling):
        if next(count) % every == 0:
            recorded.append((inputs, sampling))
        return run(inputs, sampling)

    engine.runner.run = recording_run
    try:
        yield recorded
    finally:
        del engine.runner.run   # back to the class's method


def _best(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def device_breakdown(engine, steps: list, repeat: int = 3) -> dict:
    """Mean seconds per recorded step of the whole jitted step and of its gemm / attention / sampling parts."""
    runner, backends, cfg = engine.runner, engine.backends, engine.model.config
    params = runner.params
    layers = params["layers"]
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]

    @jax.jit
    def gemms(layers, head, x, h, m, num_samples):   # weights as arguments: closed over, they would be constants
        def one(index, acc):
            for name in DENSE:
                w = layers[name]
                acc = acc + backends.smooth_gemm(x[:, :w.shape[-1]], w, m, layer=index, transpose_w=True).sum()
            return acc
        acc = jax.lax.fori_loop(0, cfg.num_layers, one, jnp.float32(0))
        return acc + backends.smooth_gemm(h, head, num_samples, transpose_w=True).sum()

    @jax.jit
    def attention(q, kv, meta):
        def one(index, acc):
            return acc + backends.meta_attention(q, kv, index, meta).sum()
        return jax.lax.fori_loop(0, cfg.num_layers, one, jnp.float32(0))

    sampler = jax.jit(lambda logits, s: sample(logits, s, engine.max_logprobs))
    width = max(cfg.hidden_size, cfg.q_size, cfg.intermediate_size)
    totals = dict(step=0.0, gemm=0.0, attention=0.0, sampling=0.0)
    for inputs, sampling in steps:
        T, R = inputs.token_ids.shape[0], inputs.sample_index.shape[0]
        x = jnp.ones((T, width), runner.kv.k.dtype)
        h = jnp.ones((R, cfg.hidden_size), runner.kv.k.dtype)
        q = jnp.ones((T, cfg.num_heads, cfg.head_dim), runner.kv.k.dtype)
        def whole(inputs=inputs, sampling=sampling):   # the cache is donated: keep the new one
            out, runner.kv = runner._step(params, runner.kv, inputs, sampling)
            return out

        totals["step"] += _best(whole, repeat=repeat)
        totals["gemm"] += _best(gemms, layers, head, x, h, inputs.num_tokens, inputs.num_samples, repeat=repeat)
        totals["attention"] += _best(attention, q, runner.kv, inputs.attention, repeat=repeat)
        totals["sampling"] += _best(sampler, jnp.zeros((R, cfg.vocab_size), jnp.float32), sampling, repeat=repeat)
    n = max(len(steps), 1)
    out = {k: v / n for k, v in totals.items()}
    out["other"] = out["step"] - out["gemm"] - out["attention"] - out["sampling"]
    out["recorded_steps"] = len(steps)
    out["mean_tokens"] = float(np.mean([int(i.num_tokens) for i, _ in steps])) if steps else 0.0
    return out
