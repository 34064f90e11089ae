"""The naive baseline: static padded batches, XLA attention over a contiguous KV cache.

This is how research code usually serves a batch: requests are taken ``batch_size`` at a time in arrival
order; each batch is left-padded to its longest prompt (rounded up to a multiple of ``PAD``), gets a
contiguous cache ``k, v [L, B, Hkv, Lmax, Dh]`` for the padded prompt plus the batch's longest output
(rounded up to a multiple of ``PAD``), is prefilled in one call, then decoded one token per call until
its longest output is done. Every request waits for the longest one of its batch, attention always reads
the whole ``Lmax`` cache under a causal + padding mask, and there is no online admission: a batch starts
once its last request has arrived and the previous batch has finished (for Poisson workloads it waits
for a full batch, or for the end of the request list).

The baseline is treated generously: every shape a run needs is compiled before the clock starts
(reported apart as ``compile_time``), and generation uses ignore-EOS semantics (exactly ``output_len``
tokens per request), as the engine under test does. Greedy decoding; the forward is the same math as
``models.llama.forward`` (same params layout, RMSNorm, RoPE, SwiGLU) with per-row positions counted from
each row's first real token, so left padding does not change the outputs.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from models.config import ModelConfig
from models.llama import apply_rope, rms_norm, rope_frequencies
from xyjax.ops.gemm import formats
from xyjax.bench.workload import BenchRequest

PAD = 64  # prompt and cache lengths are rounded up to a multiple of this


class Cache(NamedTuple):
    """Contiguous KV cache of one batch. k, v: [L, B, Hkv, Lmax, Dh] (params dtype; head-major like HF's
    ``past_key_values``, so attention reads each head's keys without a transpose); start: [B] int32, the
    cache column of each row's first real token (left padding fills columns ``< start``)."""

    k: jax.Array
    v: jax.Array
    start: jax.Array


def _forward(params: dict, cache: Cache, tokens: jax.Array, column: jax.Array, cfg: ModelConfig
             ) -> tuple[jax.Array, Cache]:
    """Run ``tokens [B, T]`` int32 placed at cache columns ``[column, column + T)`` (``column``: int32
    scalar); writes their K/V and returns the greedy next token [B] int32 after the last column."""
    batch, num_tokens = tokens.shape
    cache_len = cache.k.shape[3]
    cols = column + jnp.arange(num_tokens)                                        # [T]
    positions = jnp.maximum(cols[None] - cache.start[:, None], 0)                 # [B, T]; padding: 0
    angles = positions.reshape(-1, 1).astype(jnp.float32) * rope_frequencies(cfg)[None]
    angles = jnp.concatenate([angles, angles], -1)                                # [B T, Dh]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    keys = jnp.arange(cache_len)
    mask = (keys[None, None] >= cache.start[:, None, None]) & (keys[None, None] <= cols[None, :, None])  # [B, T, S]
    group = cfg.num_heads // cfg.num_kv_heads
    x = params["embed"][tokens]                                                   # [B, T, D]

    def layer(carry, scanned):
        x, k_cache, v_cache = carry
        index, p = scanned
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        qkv = h @ p["wqkv"].T
        if "bqkv" in p:
            qkv = qkv + p["bqkv"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = apply_rope(q.reshape(batch * num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(batch * num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        new_k, new_v = (a.reshape(1, batch, num_tokens, cfg.num_kv_heads, cfg.head_dim).swapaxes(2, 3)
                        .astype(k_cache.dtype) for a in (k, v))                  # [1, B, Hkv, T, Dh]
        k_cache = jax.lax.dynamic_update_slice(k_cache, new_k, (index, 0, 0, column, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, new_v, (index, 0, 0, column, 0))
        q = q.reshape(batch, num_tokens, cfg.num_kv_heads, group, cfg.head_dim)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k_cache[index], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], scores * cfg.head_dim ** -0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        attn = jnp.einsum("bkgts,bksd->btkgd", probs, v_cache[index]).reshape(batch, num_tokens, cfg.q_size)
        x = x + attn.astype(x.dtype) @ p["wo"].T
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        gate, up = jnp.split(h @ p["w_gate_up"].T, 2, axis=-1)
        x = x + (jax.nn.silu(gate) * up) @ p["w_down"].T
        return (x, k_cache, v_cache), None

    (x, k_cache, v_cache), _ = jax.lax.scan(layer, (x, cache.k, cache.v),
                                            (jnp.arange(cfg.num_layers), params["layers"]))
    h = rms_norm(x[:, -1], params["final_norm"], cfg.rms_norm_eps)
    head = (params["embed"] if cfg.tie_word_embeddings else params["lm_head"]).T
    logits = jnp.dot(h, head, preferred_element_type=jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), Cache(k_cache, v_cache, cache.start)


def prefill(params: dict, tokens: jax.Array, pad_mask: jax.Array, *, cfg: ModelConfig, cache_len: int
            ) -> tuple[jax.Array, Cache]:
    """Prefill a left-padded batch. tokens [B, Lp] int32; pad_mask [B, Lp] bool, True on real tokens (a
    suffix of each row). Returns the first generated token [B] int32 and a fresh cache of ``cache_len``
    columns holding the prompts at columns ``[0, Lp)``."""
    batch, prompt_len = tokens.shape
    dtype = params["embed"].dtype
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
    start = (prompt_len - pad_mask.sum(axis=1)).astype(jnp.int32)
    cache = Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), start)
    return _forward(params, cache, tokens, jnp.int32(0), cfg)


def decode_step(params: dict, cache: Cache, token: jax.Array, position: jax.Array, *, cfg: ModelConfig
                ) -> tuple[jax.Array, Cache]:
    """One decode step: token [B] int32 written at cache column ``position`` (int32 scalar, the same for
    every row). Returns the next token [B] int32 and the updated cache (donated by the jitted form)."""
    return _forward(params, cache, token[:, None], position, cfg)


def _round_up(n: int) -> int:
    return -(-n // PAD) * PAD


class NaiveGenerator:
    """Greedy static-batch generation over a contiguous cache (see the module docstring).

    cfg, params: a ``models.llama`` config and params pytree (weights in another format are made plain once,
    here: research code multiplies plain weights). Compiled programs are kept per
    shape: prefill per (B, Lp, Lmax), decode per (B, Lmax).
    """

    def __init__(self, cfg: ModelConfig, params: dict):
        self.cfg, self.params = cfg, formats.convert(params, "plain")
        self._compiled: dict[tuple, jax.stages.Compiled] = {}

    @staticmethod
    def _shapes(prompt_lens: list[int], output_lens: list[int]) -> tuple[int, int]:
        """(padded prompt length Lp, cache length Lmax) of a batch."""
        padded = _round_up(max(prompt_lens))
        return padded, _round_up(padded + max(output_lens))

    def _programs(self, batch: int, prompt_len: int, cache_len: int):
        """The compiled (prefill, decode_step) for one batch shape, compiling on first use."""
        key = (batch, prompt_len, cache_len)
        if key not in self._compiled:
            spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
            params = jax.tree.map(lambda a: spec(a.shape, a.dtype), self.params)
            dtype = self.params["embed"].dtype
            kv = spec((self.cfg.num_layers, batch, self.cfg.num_kv_heads, cache_len, self.cfg.head_dim), dtype)
            cache = Cache(kv, kv, spec((batch,), jnp.int32))
            pre = jax.jit(functools.partial(prefill, cfg=self.cfg, cache_len=cache_len))
            dec = jax.jit(functools.partial(decode_step, cfg=self.cfg), donate_argnums=1)
            self._compiled[key] = (
                pre.lower(params, spec((batch, prompt_len), jnp.int32), spec((batch, prompt_len), jnp.bool_)).compile(),
                dec.lower(params, cache, spec((batch,), jnp.int32), spec((), jnp.int32)).compile())
        return self._compiled[key]

    def _batch(self, prompts: list[list[int]], output_lens: list[int]) -> tuple[np.ndarray, list[float]]:
        """Generate one static batch. Returns tokens [B, max(output_lens)] int32 (row b is valid up to
        ``output_lens[b]``) and the ``time.perf_counter()`` at which each token column was on the host."""
        prompt_len, cache_len = self._shapes([len(p) for p in prompts], output_lens)
        prefill_fn, decode_fn = self._programs(len(prompts), prompt_len, cache_len)
        tokens = np.zeros((len(prompts), prompt_len), np.int32)
        pad_mask = np.zeros((len(prompts), prompt_len), bool)
        for row, prompt in enumerate(prompts):
            tokens[row, prompt_len - len(prompt):] = prompt
            pad_mask[row, prompt_len - len(prompt):] = True
        token, cache = prefill_fn(self.params, tokens, pad_mask)
        out, times = [np.asarray(token)], [time.perf_counter()]
        for step in range(max(output_lens) - 1):
            token, cache = decode_fn(self.params, cache, token, np.int32(prompt_len + step))
            out.append(np.asarray(token))
            times.append(time.perf_counter())
        return np.stack(out, axis=1), times

    def generate(self, batch_prompts: list[list[int]], output_lens: list[int]) -> list[list[int]]:
        """Greedy continuations of one batch: exactly ``output_lens[b]`` tokens for prompt b (no EOS stop)."""
        out, _ = self._batch(batch_prompts, output_lens)
        return [row[:n].tolist() for row, n in zip(out, output_lens)]

    def run(self, requests: list[BenchRequest], batch_size: int, progress: bool = True
            ) -> tuple[list[dict], dict]:
        """Serve ``requests`` in arrival order in static batches of ``batch_size`` (the last may be smaller).

        Returns per-request records (``arrival``, ``first_token``, ``finish`` in seconds from the start of
        the timed run, ``prompt_len``, ``output_len``; in arrival order, see ``workload.summarize``) and
        stats: ``wall_time`` (timed run, s), ``compile_time`` (s, before the timed run), ``computed_tokens``
        (token slots the batches computed: B x (Lp + longest output) each) and ``real_tokens`` (prompt +
        output tokens of the requests).
        """
        order = sorted(requests, key=lambda r: r.arrival)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        shapes = [(len(b), *self._shapes([len(r.prompt_token_ids) for r in b], [r.output_len for r in b]))
                  for b in batches]
        compile_start = time.perf_counter()
        for shape in tqdm(sorted(set(shapes)), desc="compiling naive baseline", disable=not progress):
            self._programs(*shape)
        compile_time = time.perf_counter() - compile_start

        records, computed_tokens = [], 0
        t0 = time.perf_counter()
        for batch, (size, prompt_len, _) in zip(tqdm(batches, desc="naive baseline", disable=not progress), shapes):
            wait = t0 + batch[-1].arrival - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            output_lens = [r.output_len for r in batch]
            _, times = self._batch([r.prompt_token_ids for r in batch], output_lens)
            computed_tokens += size * (prompt_len + max(output_lens))
            records += [dict(arrival=r.arrival, first_token=times[0] - t0, finish=times[r.output_len - 1] - t0,
                             prompt_len=len(r.prompt_token_ids), output_len=r.output_len) for r in batch]
        wall_time = time.perf_counter() - t0
        real_tokens = sum(r["prompt_len"] + r["output_len"] for r in records)
        stats = dict(wall_time=wall_time, compile_time=compile_time, computed_tokens=computed_tokens,
                     real_tokens=real_tokens)
        return records, stats
