"""Runner: packs scheduled sequences into bucketed StepInputs and runs one jitted model+sampler step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.llama import Backends, forward
from xyjax.kv_cache import KVCache
from xyjax.ops import AttentionMetadata
from xyjax.request import Request
from xyjax.sampler import SamplingInputs, sample
from xyjax.step_inputs import StepInputs


def bucket(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _step(params, kv, inputs, sampling, *, cfg, backends):
    logits, kv = forward(params, kv, inputs, cfg=cfg, backends=backends)
    return sample(logits, sampling), kv


class Runner:
    """Owns the device params and KV cache; ``run`` executes one step for a list of (request, q_len)."""

    def __init__(self, cfg: ModelConfig, params: dict, num_blocks: int, block_size: int, backends: Backends,
                 dtype=jnp.float32):
        self.params = params
        self.kv = KVCache.create(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        self._step = jax.jit(functools.partial(_step, cfg=cfg, backends=backends), donate_argnums=(1,))

    @property
    def num_compiled(self) -> int:
        """Step programs compiled so far (one per distinct bucket shape)."""
        return self._step._cache_size()

    def run(self, batch: list[tuple[Request, int]], banned: list[list[int]]) -> np.ndarray:
        """One step: sequence i of ``batch`` computes its next ``q_len`` pending tokens. Returns the token
        sampled after each sequence's last row, [len(batch)] int32. ``banned[i]``: token ids masked for i."""
        block_size = self.kv.block_size
        num_tokens = sum(q for _, q in batch)
        T, S = bucket(num_tokens), bucket(len(batch))
        P = bucket(max(len(r.block_table) for r, _ in batch))
        tokens, positions, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.full(T, -1, np.int32)
        q_start, q_len, kv_len = np.zeros(S, np.int32), np.zeros(S, np.int32), np.zeros(S, np.int32)
        tables = np.zeros((S, P), np.int32)
        temperature, top_k = np.zeros(S, np.float32), np.zeros(S, np.int32)
        top_p, seed, counter = np.ones(S, np.float32), np.zeros(S, np.uint32), np.zeros(S, np.int32)
        banned_ids = np.full((S, bucket(max(map(len, banned)))), -1, np.int32)
        row = 0
        for i, (req, n) in enumerate(batch):
            start = req.num_computed
            tokens[row:row + n] = req.token_ids[start:start + n]
            pos = np.arange(start, start + n)
            positions[row:row + n] = pos
            table = np.asarray(req.block_table, np.int32)
            slots[row:row + n] = table[pos // block_size] * block_size + pos % block_size
            q_start[i], q_len[i], kv_len[i] = row, n, start + n
            tables[i, :len(table)] = table
            p = req.params
            temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
            seed[i], counter[i] = req.seed, len(req.output_ids)
            banned_ids[i, :len(banned[i])] = banned[i]
            row += n
        meta = AttentionMetadata(q_start=q_start, q_len=q_len, kv_len=kv_len, block_tables=tables,
                                 max_q_len=bucket(int(q_len.max())))
        inputs = StepInputs(token_ids=tokens, positions=positions, slot_mapping=slots, num_tokens=np.int32(num_tokens),
                            attention=meta, sample_index=np.maximum(q_start + q_len - 1, 0).astype(np.int32),
                            num_samples=np.int32(len(batch)))
        sampling = SamplingInputs(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, counter=counter,
                                  banned=banned_ids)
        sampled, self.kv = self._step(self.params, self.kv, inputs, sampling)
        return np.asarray(sampled)[:len(batch)]
