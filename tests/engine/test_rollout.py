"""examples/rollout.py: best-of-n sampling and scoring in one jitted call, on the tiny model."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from helpers import reference_logits

PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "rollout.py")


def load_example():
    spec = importlib.util.spec_from_file_location("rollout_example", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_score(model, prompt, cont):
    """The mean log-probability of ``cont`` after ``prompt``, token by token from the reference logits."""
    return np.mean([jax.nn.log_softmax(reference_logits(model.config, model.params, prompt + cont[:k]))[t]
                    for k, t in enumerate(cont)])


def test_rollout_scores_are_mean_logprobs_and_the_best_is_the_max(tiny_model):
    rollout = load_example().rollout
    prompts = [[5, 6, 7, 8, 9], [40, 41]]
    ids = jnp.asarray([p + [0] * (5 - len(p)) for p in prompts], jnp.int32)
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    n, steps = 3, 4
    run = lambda eos: map(np.asarray, rollout(tiny_model.params, ids, lens, jax.random.key(1),  # noqa: E731
                                              jnp.float32(1.0), eos, cfg=tiny_model.config, n=n, max_new_tokens=steps))
    tokens, lengths, scores, best, chosen = run(jnp.zeros(1, jnp.int32) - 1)
    assert tokens.shape == (2, n, steps) and lengths.shape == scores.shape == (2, n)
    assert best.shape == (2,) and chosen.shape == (2, steps)
    assert (lengths == steps).all() and np.isfinite(scores).all() and (scores < 0).all()
    assert (scores[np.arange(2), best] == scores.max(axis=1)).all()
    assert (chosen == tokens[np.arange(2), best]).all()
    assert len({tuple(row) for row in tokens.reshape(-1, steps).tolist()}) > 1      # rows draw their own samples
    for p, row in enumerate(prompts):                                                 # the score, token by token
        for j in (0, n - 1):
            np.testing.assert_allclose(scores[p, j], reference_score(tiny_model, row, tokens[p, j].tolist()),
                                       rtol=1e-4, atol=1e-4)
    eos = tokens[0, 0, 1]                                     # the same samples, row (0, 0) stops at its 2nd token
    tokens2, lengths2, scores2, _, _ = run(jnp.asarray([eos], jnp.int32))
    assert lengths2[0, 0] == 2 and (tokens2[0, 0, 2:] == -1).all()
    np.testing.assert_allclose(scores2[0, 0], reference_score(tiny_model, prompts[0], tokens[0, 0, :2].tolist()),
                               rtol=1e-4, atol=1e-4)
