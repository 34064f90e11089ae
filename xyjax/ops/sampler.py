"""Batch sampler (runs inside the jitted step): greedy, temperature, top-k, top-p, per-request seeds.

Every array is per sampled row, R rows:
    logits [R, V] float32; temperature [R] float32 (0: greedy); top_k [R] int32 (0: off);
    top_p [R] float32 (1: off); seed [R] uint32; counter [R] int32 (tokens the request has generated,
    so a seeded request draws the same numbers whatever shares its batch); banned [R, B] int32 token
    ids whose logits are masked (-1: none; used for min_tokens); logprobs [R] bool (return logprobs).
Returns SamplerOutput: token ids [R] int32, and when any row asks, the sampled token's logprob [R] and the
top ``num_logprobs`` (static) ids/logprobs [R, K] of the model's distribution (raw logits, before
temperature and masks; vLLM's default); zeros otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingInputs:
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    counter: jax.Array
    banned: jax.Array
    logprobs: jax.Array


@struct.dataclass
class SamplerOutput:
    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def argmax_rows(x: jax.Array, chunk: int = 128) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` [R] int32 for x [R, V] (the first index of each row's maximum), computed as
    the max of each ``chunk`` of a row, the first chunk holding the row's max, and the first max inside it.
    XLA's CPU argmax is a scalar loop over (value, index) pairs: this measured 6-10x faster at V = 49152."""
    rows, vocab = x.shape
    if vocab % chunk:
        x = jnp.pad(x, ((0, 0), (0, -vocab % chunk)), constant_values=-jnp.inf)
    chunks = x.reshape(rows, -1, chunk)
    best = jnp.argmax(chunks.max(axis=-1), axis=-1)                                # [R] chunk
    inside = jnp.take_along_axis(chunks, best[:, None, None], axis=1)[:, 0]         # [R, chunk]
    return (best * chunk + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def mask_banned(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """Set ``logits[r, banned[r, j]]`` to -inf for every ``banned >= 0``."""
    rows = jnp.arange(logits.shape[0])[:, None]
    cols = jnp.where(banned < 0, logits.shape[1], banned)          # -1 -> out of bounds -> dropped
    return logits.at[rows, cols].set(-jnp.inf, mode="drop")


def top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (-inf) tokens outside each row's top-k, then outside its top-p nucleus. logits [R, V]."""
    vocab = logits.shape[1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]                                  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)                 # [R, 1]
    ordered = jnp.where(jnp.arange(vocab)[None] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                                    # mass strictly above
    keep = (before < top_p[:, None]) & jnp.isfinite(ordered)
    keep = keep.at[:, 0].set(True)
    last = jnp.sum(keep, axis=-1) - 1
    pth = jnp.take_along_axis(ordered, last[:, None], axis=-1)
    return jnp.where(logits >= jnp.maximum(kth, pth), logits, -jnp.inf)


def sample(logits: jax.Array, s: SamplingInputs, num_logprobs: int = 0) -> SamplerOutput:
    """See the module docstring."""
    logits = logits.astype(jnp.float32)
    # Masking writes a copy of all [R, V] logits (the log-probabilities read the raw ones), a few ms a step:
    # only when some row bans tokens.
    tokens = jax.lax.cond(jnp.any(s.banned >= 0), lambda x: _sample_tokens(mask_banned(x, s.banned), s),
                          lambda x: _sample_tokens(x, s), logits)
    rows, k = logits.shape[0], num_logprobs

    def with_logprobs(_):
        logp = jax.nn.log_softmax(logits, axis=-1)
        top, ids = jax.lax.top_k(logp, k) if k else (jnp.zeros((rows, 0)), jnp.zeros((rows, 0), jnp.int32))
        return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], ids.astype(jnp.int32), top

    def without(_):
        return jnp.zeros(rows), jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k))

    logprob, top_ids, top = jax.lax.cond(jnp.any(s.logprobs), with_logprobs, without, None)
    return SamplerOutput(tokens=tokens, logprob=logprob, top_ids=top_ids, top_logprobs=top)


def _sample_tokens(logits: jax.Array, s: SamplingInputs) -> jax.Array:
    greedy = argmax_rows(logits)

    def stochastic(logits):
        scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        needs_mask = jnp.any((s.top_k > 0) | (s.top_p < 1))
        scaled = jax.lax.cond(needs_mask, lambda x: top_k_top_p_mask(x, s.top_k, s.top_p), lambda x: x, scaled)
        keys = jax.vmap(lambda seed, c: jax.random.fold_in(jax.random.key(seed), c))(s.seed, s.counter)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda _: greedy, logits)
