"""Reference generation for tests: the model function on one contiguous sequence, no engine, no paging."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.llama import forward
from xyjax.ops.kv_cache import KVCache
from xyjax.ops.step_inputs import StepInputs
from xyjax.ops.attention.tiling import attention_metadata


@functools.lru_cache(maxsize=None)
def _step(cfg):
    return jax.jit(functools.partial(forward, cfg=cfg))


def reference_logits(cfg, params, ids: list[int]) -> np.ndarray:
    """float32 logits [V] after the whole of ``ids``, computed in one pass from an empty contiguous cache."""
    L = len(ids)
    T = max(128, 1 << (L - 1).bit_length())
    kv = KVCache.create(cfg.num_layers, T // 16, 16, cfg.num_kv_heads, cfg.head_dim)
    pad = lambda a, fill: np.concatenate([a, np.full(T - L, fill)]).astype(np.int32)  # noqa: E731
    meta = attention_metadata([0], [L], [L], np.arange(T // 16)[None], num_kv_heads=cfg.num_kv_heads, num_tokens=T)
    inputs = StepInputs(token_ids=pad(np.array(ids), 0), positions=pad(np.arange(L), 0),
                        slot_mapping=pad(np.arange(L), -1), num_tokens=jnp.int32(L), attention=meta,
                        sample_index=jnp.array([L - 1], jnp.int32), num_samples=jnp.int32(1))
    logits, _ = _step(cfg)(params, kv, inputs)
    return np.asarray(logits[0])


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of ``prompt`` recomputing the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(model.config, model.params, ids))))
    return ids[len(prompt):]
