"""Generation as pure functions, to compose inside your own ``jax.jit`` (no engine, no host work per step).

A fixed batch of B sequences over a contiguous paged cache (``xyjax.ops.device_planner``): ``prefill`` writes
the prompts' KV and keeps each row's next-token logits in a ``GenerationState``; each ``decode_step`` samples
one token per live row (``xyjax.ops.sampler.sample``), stops rows on an EOS id, the token limit or a full
cache, and feeds the tokens of the rows still live. ``generate`` runs them in a ``lax.while_loop`` that exits
as soon as every row has stopped.

Static (hashable, pass through ``static_argnames`` or ``functools.partial``): ``cfg`` (the ModelConfig),
``max_new_tokens``, ``backends``, ``block_size``, ``tile``. Everything else is traced data, so new prompts of
the same padded shape [B, P], new lengths, sampling settings, EOS ids and keys reuse one compiled program.
The cache is an ordinary argument and result of ``prefill`` / ``decode_step``: donate it
(``donate_argnums``) to update it in place.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from models import llama
from models.config import ModelConfig
from xyjax.ops import Backends, KVCache, device_planner
from xyjax.ops.sampler import SamplingInputs, sample


@struct.dataclass
class Sampling:
    """Sampling settings, each a scalar or per row [B] (traced): temperature float32 (0: greedy), top_k int32
    (0: off), top_p float32 (1: off), min_p float32 (0: off); the sampler's semantics."""

    temperature: jax.Array = 0.0
    top_k: jax.Array = 0
    top_p: jax.Array = 1.0
    min_p: jax.Array = 0.0


@struct.dataclass
class GenerationState:
    """The batch between steps, B rows.

    logits:        [B, V] float32 next-token logits of each row (meaningless once the row is done)
    seq_lens:      [B] int32 tokens in the row's cache
    num_generated: [B] int32 tokens sampled so far
    done:          [B] bool the row has stopped
    token:         [B] int32 the token the last step sampled, -1 where it sampled none
    """

    logits: jax.Array
    seq_lens: jax.Array
    num_generated: jax.Array
    done: jax.Array
    token: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, block_size: int = 16, dtype=jnp.float32) -> KVCache:
    """An empty contiguous cache of ``batch`` sequences of up to ``max_len`` tokens (rounded up to blocks)."""
    pages = -(-max_len // block_size)
    return KVCache.create(cfg.num_layers, batch * pages, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)


def _pages(cache: KVCache, batch: int) -> int:
    if cache.num_blocks % batch:
        raise ValueError(f"a cache of {cache.num_blocks} blocks is not contiguous over a batch of {batch}")
    return cache.num_blocks // batch


def prefill(params: dict, cache: KVCache, prompt_ids: jax.Array, prompt_lens: jax.Array, *, cfg: ModelConfig,
            backends: Backends = Backends(), tile: int = 16) -> tuple[GenerationState, KVCache]:
    """Write every prompt's KV: ``prompt_ids`` [B, P] int32 (row b's first ``prompt_lens[b]`` tokens, 1 <=
    prompt_lens[b] <= P, fit the cache), ``prompt_lens`` [B] int32. ``tile``: query rows per attention task."""
    chex.assert_rank(prompt_ids, 2)
    chex.assert_type([prompt_ids, prompt_lens], jnp.int32)
    chex.assert_shape(prompt_lens, prompt_ids.shape[:1])
    batch = prompt_ids.shape[0]
    inputs = device_planner.prefill_inputs(prompt_ids, prompt_lens, pages=_pages(cache, batch),
                                           block_size=cache.block_size, num_kv_heads=cfg.num_kv_heads, tile=tile)
    logits, cache = llama.forward(params, cache, inputs, cfg=cfg, backends=backends)
    zeros = jnp.zeros(batch, jnp.int32)
    state = GenerationState(logits=logits, seq_lens=prompt_lens, num_generated=zeros, done=jnp.zeros(batch, bool),
                            token=zeros - 1)
    return state, cache


def _sampling_inputs(sampling: Sampling, seed: jax.Array, counter: jax.Array, vocab_size: int) -> SamplingInputs:
    """The sampler's per-row inputs for B rows: ``sampling`` broadcast, no logits processing."""
    rows = seed.shape[0]
    row = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (rows,))  # noqa: E731
    none = jnp.full((rows, 1), -1, jnp.int32)
    return SamplingInputs(temperature=row(sampling.temperature, jnp.float32), top_k=row(sampling.top_k, jnp.int32),
                          top_p=row(sampling.top_p, jnp.float32), min_p=row(sampling.min_p, jnp.float32), seed=seed,
                          counter=counter, banned=none, allowed=jnp.full((rows, -(-vocab_size // 32)), -1, jnp.int32),
                          bias_ids=none, bias=jnp.zeros((rows, 1), jnp.float32), presence=row(0, jnp.float32),
                          frequency=row(0, jnp.float32), repetition=row(1, jnp.float32), history=none,
                          prompt_len=row(0, jnp.int32), logprobs=row(False, bool),
                          target=row(-1, jnp.int32))


def decode_step(params: dict, cache: KVCache, state: GenerationState, key: jax.Array, *, cfg: ModelConfig,
                sampling: Sampling = Sampling(), eos_ids: jax.Array = (), max_new_tokens: int | None = None,
                backends: Backends = Backends(), tile: int = 16) -> tuple[GenerationState, KVCache]:
    """Sample a token for every live row, stop rows that drew one of ``eos_ids`` [E] int32 (emitted), reached
    ``max_new_tokens`` (static; None: no limit) or filled their cache, and run the model on the rest.
    ``key``: a PRNG key; row b draws from ``fold_in(key(seed_b), num_generated[b])`` with ``seed`` [B] uint32
    drawn from ``key``, so pass the same key every step (as ``generate`` does)."""
    batch = state.seq_lens.shape[0]
    chex.assert_shape(state.logits, (batch, cfg.vocab_size))
    chex.assert_type([state.seq_lens, state.num_generated, state.token], jnp.int32)
    pages = _pages(cache, batch)
    live = ~state.done
    seed = jax.random.bits(key, (batch,), jnp.uint32)
    drawn = sample(state.logits, _sampling_inputs(sampling, seed, state.num_generated, cfg.vocab_size)).tokens
    token = jnp.where(live, drawn, -1)
    generated = state.num_generated + live
    stop = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32).reshape(-1)) | (state.seq_lens >= pages * cache.block_size)
    if max_new_tokens is not None:
        stop |= generated >= max_new_tokens
    done = state.done | (live & stop)
    feed = ~done

    def run(cache):
        inputs = device_planner.decode_inputs(token, state.seq_lens, feed, pages=pages, block_size=cache.block_size,
                                              num_kv_heads=cfg.num_kv_heads, tile=tile)
        return llama.forward(params, cache, inputs, cfg=cfg, backends=backends)

    logits, cache = jax.lax.cond(jnp.any(feed), run, lambda cache: (state.logits, cache), cache)
    state = GenerationState(logits=logits, seq_lens=state.seq_lens + feed, num_generated=generated, done=done,
                            token=token)
    return state, cache


def generate(params: dict, prompt_ids: jax.Array, prompt_lens: jax.Array, *, cfg: ModelConfig, max_new_tokens: int,
             sampling: Sampling = Sampling(), key: jax.Array | None = None, eos_ids: jax.Array = (),
             backends: Backends = Backends(), block_size: int = 16, tile: int = 16):
    """Generate up to ``max_new_tokens`` tokens for each prompt (``prefill``'s contract). ``key``: PRNG key of
    the sampled rows (None: key 0). Returns (tokens [B, max_new_tokens] int32, -1 after a row's end; lengths
    [B] int32 tokens generated, an emitted EOS included; steps [] int32 decode steps run, < max_new_tokens when
    every row stopped early). The cache holds the model's dtype, ``params["final_norm"]``'s (the embedding may be held
    as quantized blocks)."""
    batch, width = prompt_ids.shape
    key = jax.random.key(0) if key is None else key
    cache = init_cache(cfg, batch, width + max_new_tokens, block_size=block_size, dtype=params["final_norm"].dtype)
    state, cache = prefill(params, cache, prompt_ids, prompt_lens, cfg=cfg, backends=backends, tile=tile)
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32)

    def running(carry):
        step, state, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(state.done)

    def body(carry):
        step, state, cache, out = carry
        state, cache = decode_step(params, cache, state, key, cfg=cfg, sampling=sampling, eos_ids=eos_ids,
                                   max_new_tokens=max_new_tokens, backends=backends, tile=tile)
        return step + 1, state, cache, out.at[:, step].set(state.token)

    steps, state, _, out = jax.lax.while_loop(running, body, (jnp.int32(0), state, cache, out))
    return out, state.num_generated, steps
