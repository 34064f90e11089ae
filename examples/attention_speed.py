"""Time meta_attention per call (jit, one layer), ffi (C++ CPU kernel) vs xla, on default-model shapes.

    python examples/attention_speed.py                  # lanes: XYJAX_ATTENTION_THREADS or all cores
    XYJAX_ATTENTION_THREADS=1 python examples/attention_speed.py
"""

import ctypes
import time

import jax
import jax.numpy as jnp
import numpy as np

import ascend_ffi
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import meta_attention
from xyjax.ops.attention.tiling import attention_metadata

NB, BS, H, HKV, D = 4096, 16, 9, 3, 64   # smollm2-135m: 9 query heads, 3 KV heads, head_dim 64
rng = np.random.default_rng(0)
kv = KVCache(k=jnp.asarray(rng.standard_normal((1, NB, HKV, BS, D), np.float32)),
             v=jnp.asarray(rng.standard_normal((1, NB, HKV, BS, D), np.float32)))
fns = {b: jax.jit(lambda q, kv, m, b=b: meta_attention(q, kv, 0, m, backend=b)) for b in ("ffi", "xla")}


def case(q_lens, kv_lens, T, repeats=20):
    q_lens, kv_lens = np.asarray(q_lens, np.int32), np.asarray(kv_lens, np.int32)
    tables = rng.integers(0, NB, (len(q_lens), 128)).astype(np.int32)
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)
    meta = attention_metadata(q_start, q_lens, kv_lens, tables, num_kv_heads=HKV, tile=16, num_tokens=T)
    q = jnp.asarray(rng.standard_normal((T, H, D), np.float32))
    times, outs = {}, {}
    for name, f in fns.items():
        outs[name] = np.asarray(f(q, kv, meta))
        best = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(repeats):
                f(q, kv, meta).block_until_ready()
            best.append((time.perf_counter() - t) / repeats * 1e3)
        times[name] = min(best)
    err = np.abs(outs["ffi"] - outs["xla"]).max()
    return times, err


kvl = np.clip(rng.lognormal(np.log(300), 0.6, 64), 20, 1500).astype(np.int32)
cases = {
    "(a) 64 decodes, KV ~ lognormal(300)": (np.ones(64), kvl, 64),
    "(b) one 512-token prefill": ([512], [512], 512),
    "(c) 32 decodes + 480-token chunk (120 history)": ([1] * 32 + [480], list(kvl[:32]) + [600], 512),
}
lanes = ascend_ffi.load()
lanes.xyjax_attention_threads.restype = ctypes.c_int32
print(f"lanes {lanes.xyjax_attention_threads()}; ms per call (best of 3 x 20)")
for name, args in cases.items():
    times, err = case(*args)
    print(f"{name:48s} ffi {times['ffi']:7.3f}  xla {times['xla']:7.3f}  x{times['xla'] / times['ffi']:5.1f}"
          f"  max|ffi-xla| {err:.1e}")
