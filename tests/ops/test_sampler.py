"""The jitted batch sampler: masks, greedy, seeded reproducibility, distribution."""

import jax
import jax.numpy as jnp
import numpy as np

from xyjax.ops.sampler import SamplingInputs, argmax_rows, mask_banned, sample, top_k_top_p_mask


def sample_tokens(logits, s):
    return sample(logits, s).tokens


def inputs(R, temperature=1.0, top_k=0, top_p=1.0, seed=0, counter=0, banned=None):
    full = lambda v, dt: jnp.full(R, v, dt)  # noqa: E731
    return SamplingInputs(temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
                          top_p=full(top_p, jnp.float32), seed=full(seed, jnp.uint32),
                          counter=full(counter, jnp.int32),
                          banned=jnp.full((R, 4), -1, jnp.int32) if banned is None else banned,
                          logprobs=jnp.zeros(R, bool))


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
    draws = jax.jit(sample_tokens)(jnp.tile(logits, (n, 1)), SamplingInputs(
        temperature=jnp.full(n, 0.5), top_k=jnp.zeros(n, jnp.int32), top_p=jnp.ones(n),
        seed=jnp.arange(n, dtype=jnp.uint32), counter=jnp.zeros(n, jnp.int32), banned=jnp.full((n, 1), -1, jnp.int32),
        logprobs=jnp.zeros(n, bool)))
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
