"""Runner: the device side of a step. Owns params and the KV cache; one jitted model+sampler program per bucket."""

from __future__ import annotations

import functools
import itertools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from models.config import ModelConfig
from models.llama import forward
from xyjax.engine.parallel import ShardedModel
from xyjax.engine.stats import EngineStats
from xyjax.ops import Backends
from xyjax.ops.kv_cache import KVCache
from xyjax.ops.sampler import SamplerOutput, SamplingInputs, sample
from xyjax.ops.step_inputs import StepInputs

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_ids = itertools.count()


def enable_persistent_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache (process-wide) at ``directory`` and cache every program."""
    compilation_cache.set_cache_dir(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()   # re-initialise in case something compiled before the directory was set


class Runner:
    """``run(inputs, sampling)`` executes one step, updating the KV cache in place (donated).

    Records in ``stats.compiles`` / ``compile_seconds`` the real XLA compilations of this runner's step
    program (a persistent-cache load counts too), observed through ``jax.monitoring``; the jitted function
    carries a unique name so other programs and other runners are not counted.

    ``params``: the param pytree on the default device, or a ``ShardedModel`` (tensor parallelism: the forward pass
    per shard under shard_map, the KV cache cut by KV head, the sampler on the gathered logits).
    """

    def __init__(self, cfg: ModelConfig, params: dict | ShardedModel, num_blocks: int, block_size: int,
                 backends: Backends, stats: EngineStats, dtype=jnp.float32, num_logprobs: int = 0, max_moves: int = 0):
        self.stats = stats
        if isinstance(params, ShardedModel):
            self.params, model = params.leaves, params.forward(backends)
            self.kv = params.create_kv(num_blocks, block_size, dtype)
            placed = dict(out_shardings=KVCache(k=params.kv_sharding, v=params.kv_sharding))
        else:
            self.params, model, placed = params, functools.partial(forward, cfg=cfg, backends=backends), {}
            self.kv = KVCache.create(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)

        def step(params, kv, inputs: StepInputs, sampling: SamplingInputs):
            logits, kv = model(params, kv, inputs)
            return sample(logits, sampling, num_logprobs), kv

        step.__name__ = step.__qualname__ = f"xyjax_step_{next(_ids)}"
        self._step = jax.jit(step, donate_argnums=(1,))
        self._copy = jax.jit(KVCache.copy_block, donate_argnums=(0,), **placed)
        self._move = jax.jit(KVCache.move, donate_argnums=(0,), **placed)
        self.max_moves = max_moves
        this = weakref.ref(self)

        def on_event(event: str, seconds: float, **kwargs) -> None:
            runner = this()
            if runner is not None and event == _BACKEND_COMPILE and kwargs.get("fun_name") == f"jit({step.__name__})":
                runner.stats.compiles += 1
                runner.stats.compile_seconds += seconds

        jax.monitoring.register_event_duration_secs_listener(on_event)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV block ``source`` to ``destination`` in every layer, for each pair in order (in place)."""
        for source, destination in pairs:
            self.kv = self._copy(self.kv, np.int32(source), np.int32(destination))

    def move_slots(self, moves: list[tuple[int, int]]) -> None:
        """Copy KV slot ``src`` to ``dst`` in every layer for each pair, all reads first, in one program of
        fixed shape ``[max_moves, 2]`` (tree verify: accepted nodes to their positions; in place)."""
        self.kv = self._move(self.kv, self.move_pairs(moves))

    def move_pairs(self, moves: list[tuple[int, int]]) -> np.ndarray:
        """``moves`` as the move program's ``[max_moves, 2]`` int32 input (unused rows -1)."""
        pairs = np.full((self.max_moves, 2), -1, np.int32)
        pairs[:len(moves)] = np.asarray(moves, np.int32).reshape(-1, 2)
        return pairs

    def run(self, inputs: StepInputs, sampling: SamplingInputs) -> SamplerOutput:
        """One step; returns the sampler's output as numpy arrays."""
        out, self.kv = self._step(self.params, self.kv, inputs, sampling)
        return jax.tree.map(jax.device_get, out)
