"""The jitted batch sampler: logits processing, masks, greedy, seeded reproducibility, distribution."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from xyjax.ops.sampler import (SamplingInputs, argmax_rows, mask_banned, min_p_mask, process_logits, sample,
                               top_k_top_p_mask)


def sample_tokens(logits, s):
    return sample(logits, s).tokens


def inputs(R, temperature=1.0, top_k=0, top_p=1.0, seed=0, counter=0, banned=None, V=1000, **processing):
    """SamplingInputs of R rows, every processing step off unless given in ``processing`` (field: array)."""
    full = lambda v, dt: jnp.full(R, v, dt)  # noqa: E731
    off = dict(min_p=full(0, jnp.float32), allowed=jnp.full((R, -(-V // 32)), -1, jnp.int32),
               bias_ids=jnp.full((R, 3), -1, jnp.int32), bias=jnp.zeros((R, 3)), presence=full(0, jnp.float32),
               frequency=full(0, jnp.float32), repetition=full(1, jnp.float32),
               history=jnp.full((R, 8), -1, jnp.int32), prompt_len=full(0, jnp.int32))
    return SamplingInputs(temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
                          top_p=full(top_p, jnp.float32), seed=full(seed, jnp.uint32),
                          counter=full(counter, jnp.int32),
                          banned=jnp.full((R, 4), -1, jnp.int32) if banned is None else banned,
                          logprobs=jnp.zeros(R, bool), target=full(-1, jnp.int32), **(off | processing))


def test_top_k_keeps_exactly_k_largest():
    logits = jnp.array([[0.1, 3.0, 2.0, -1.0, 5.0, 0.0]])
    out = top_k_top_p_mask(logits, jnp.array([2]), jnp.array([1.0]))
    assert np.isfinite(np.asarray(out)).tolist() == [[False, True, False, False, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, kept in [(0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (0.95, 4), (1.0, 4)]:
        out = np.asarray(top_k_top_p_mask(logits, jnp.array([0]), jnp.array([p])))
        assert np.isfinite(out).sum() == kept, p


def test_banned_tokens_are_masked_and_greedy_takes_next_best():
    logits = jnp.array([[0.0, 9.0, 8.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    banned = jnp.array([[1, -1], [-1, -1]], jnp.int32)
    assert np.isneginf(np.asarray(mask_banned(logits, banned))[0, 1])
    tokens = sample_tokens(logits, inputs(2, temperature=0.0, banned=banned))
    assert np.asarray(tokens).tolist() == [2, 0]


def test_seeded_rows_reproduce_and_depend_on_counter():
    logits = jax.random.normal(jax.random.key(0), (4, 1000))
    a = sample_tokens(logits, inputs(4, seed=42, counter=3))
    b = sample_tokens(logits, inputs(4, seed=42, counter=3))
    c = sample_tokens(logits, inputs(4, seed=42, counter=4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sampling_distribution_matches_softmax_at_temperature():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    n = 4000
    draws = jax.jit(sample_tokens)(jnp.tile(logits, (n, 1)), inputs(n, temperature=0.5, V=3).replace(
        seed=jnp.arange(n, dtype=jnp.uint32)))
    freq = np.bincount(np.asarray(draws), minlength=3) / n
    expected = np.array([0.6, 0.3, 0.1]) ** 2
    expected /= expected.sum()
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_chunked_argmax_equals_argmax_with_ties_and_ragged_vocab():
    """argmax_rows (chunk maxima, then inside the winning chunk) is jnp.argmax: the first index of the max,
    across and inside chunks, with a vocabulary that is no multiple of the chunk, and rows all -inf."""
    rng = np.random.default_rng(0)
    for vocab in (49152, 1000, 7):
        x = rng.integers(-3, 3, (9, vocab)).astype(np.float32)    # many ties
        x[1] = -np.inf
        x[2, :] = 0.0
        x[3, vocab - 1] = 9.0                                      # max in the padded last chunk
        np.testing.assert_array_equal(np.asarray(argmax_rows(jnp.asarray(x), chunk=128)), x.argmax(axis=1))


def reference_processing(logits, bias_ids, bias, allowed, banned, presence, frequency, repetition, history,
                         prompt_len):
    """numpy, float32, row by row: vLLM's logits processing in the sampler's order (bias, allowed mask, banned ids,
    repetition over prompt and output tokens, then frequency and presence over the output's counts)."""
    out = logits.astype(np.float32).copy()
    R, V = out.shape
    for r in range(R):
        for t, b in zip(bias_ids[r], bias[r]):
            if t >= 0:
                out[r, t] += np.float32(b)
        for t in range(V):
            if not (allowed[r, t // 32] >> (t % 32)) & 1:
                out[r, t] = -np.inf
        for t in banned[r]:
            if t >= 0:
                out[r, t] = -np.inf
        tokens = [int(t) for t in history[r] if t >= 0]
        counts = np.bincount(tokens[prompt_len[r]:], minlength=V)[:V]
        for t in set(tokens):
            out[r, t] = out[r, t] / repetition[r] if out[r, t] > 0 else out[r, t] * repetition[r]
        out[r] = out[r] - np.float32(frequency[r]) * counts.astype(np.float32) - np.float32(presence[r]) * (counts > 0)
    return out


_process = jax.jit(process_logits)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_logits_processing_matches_numpy(data):
    """process_logits (logit bias, allowed-token bitmask, banned ids, repetition / frequency / presence penalties)
    against the numpy reference over random rows, vocabularies, histories and values; a batch where no row uses a
    step leaves the logits as they are."""
    # few shapes (each is a compile); the values vary freely
    R, V, H = data.draw(st.sampled_from([1, 3])), data.draw(st.sampled_from([7, 70])), 12
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = rng.standard_normal((R, V)).astype(np.float32) * 3
    bias_ids = np.where(rng.random((R, 3)) < 0.5, rng.integers(0, V, (R, 3)), -1).astype(np.int32)
    bias_ids[:, 1:][bias_ids[:, 1:] == bias_ids[:, :1]] = -1          # distinct ids per row (a dict's keys)
    bias = rng.uniform(-100, 100, (R, 3)).astype(np.float32)
    bits = rng.random((R, -(-V // 32) * 32)) < data.draw(st.sampled_from([1.0, 0.7]))
    allowed = np.packbits(bits.reshape(R, -1, 32), axis=-1, bitorder="little").view("<u4")[..., 0].view(np.int32)
    banned = np.where(rng.random((R, 2)) < 0.3, rng.integers(0, V, (R, 2)), -1).astype(np.int32)
    history = np.where(rng.random((R, H)) < 0.8, rng.integers(0, V, (R, H)), -1).astype(np.int32)
    history = np.sort(history, axis=1)[:, ::-1].copy()               # real tokens first, -1 padding after
    prompt_len = rng.integers(0, H + 1, R).astype(np.int32)
    presence, frequency = (rng.uniform(-2, 2, R).astype(np.float32) * (rng.random(R) < 0.5) for _ in range(2))
    repetition = np.where(rng.random(R) < 0.5, rng.uniform(0.5, 2, R), 1).astype(np.float32)
    s = inputs(R, V=V, bias_ids=jnp.asarray(bias_ids), bias=jnp.asarray(bias), allowed=jnp.asarray(allowed),
               banned=jnp.asarray(banned), presence=jnp.asarray(presence), frequency=jnp.asarray(frequency),
               repetition=jnp.asarray(repetition), history=jnp.asarray(history), prompt_len=jnp.asarray(prompt_len))
    got = np.asarray(_process(jnp.asarray(logits), s))
    expected = reference_processing(logits, bias_ids, bias, allowed, banned, presence, frequency, repetition,
                                    history, prompt_len)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(_process(jnp.asarray(logits), inputs(R, V=V))), logits)


def test_min_p_keeps_tokens_within_a_factor_of_the_top_one():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(min_p_mask(logits, jnp.array([0.35, 0.0]))))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    draws = {int(t) for t in np.asarray(jax.jit(sample_tokens)(jnp.tile(logits[:1], (400, 1)), inputs(
        400, V=4, min_p=jnp.full(400, 0.35)).replace(seed=jnp.arange(400, dtype=jnp.uint32))))}
    assert draws == {0, 1}


def test_logprob_of_the_target_token_or_the_sampled_one():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
    s = inputs(3, temperature=0.0, V=50).replace(logprobs=jnp.ones(3, bool), target=jnp.array([7, -1, 0], jnp.int32))
    out = jax.jit(sample, static_argnums=2)(logits, s, 4)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    greedy = logp.argmax(-1)
    np.testing.assert_array_equal(out.tokens, greedy)
    np.testing.assert_allclose(out.logprob, [logp[0, 7], logp[1, greedy[1]], logp[2, 0]], rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logp, axis=-1)[:, :4])
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-logp, axis=-1)[:, :4], rtol=1e-6)
