"""Best-of-n rollouts in one jitted call (xyjax.functional): sample ``n`` continuations per prompt, score each by
its mean token log-probability under the model, keep the best per prompt.

The score is the model's own confidence in a continuation: the mean over its tokens (an emitted EOS included) of
log p(token | prompt, the tokens before it), at temperature 1, from one forward pass over prompt + continuation.
Averaging (not summing) keeps short and long continuations comparable; the best has the highest score.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from xyjax import functional as F
from xyjax.ops import device_planner


def joined(prompt_ids, prompt_lens, tokens, lengths):
    """Each row's prompt followed by its first ``lengths`` tokens: ids [B, P + N] int32, lens [B] int32."""
    batch, width = prompt_ids.shape
    steps = jnp.arange(tokens.shape[1])
    cols = jnp.where(steps[None] < lengths[:, None], prompt_lens[:, None] + steps[None], width + tokens.shape[1])
    ids = jnp.pad(prompt_ids, ((0, 0), (0, tokens.shape[1])))
    ids = ids.at[jnp.arange(batch)[:, None], cols].set(tokens, mode="drop")
    return ids, prompt_lens + lengths


def mean_logprob(params, prompt_ids, prompt_lens, tokens, lengths, *, cfg, block_size=16, tile=16):
    """[B] float32 mean log-probability of each row's ``lengths`` tokens after its prompt, from one forward
    pass over prompt + continuation that takes the logits of the rows predicting the continuation."""
    ids, lens = joined(prompt_ids, prompt_lens, tokens, lengths)
    batch, width = ids.shape
    steps = tokens.shape[1]
    cache = F.init_cache(cfg, batch, width, block_size=block_size, dtype=params["final_norm"].dtype)
    inputs = device_planner.prefill_inputs(ids, lens, pages=cache.num_blocks // batch, block_size=block_size,
                                           num_kv_heads=cfg.num_kv_heads, tile=tile)
    q_start = jnp.cumsum(lens) - lens
    rows = q_start[:, None] + prompt_lens[:, None] - 1 + jnp.arange(steps)[None]          # [B, N]
    rows = jnp.minimum(rows, q_start[:, None] + lens[:, None] - 1)                        # past the end: unused
    inputs = inputs.replace(sample_index=rows.reshape(-1), num_samples=jnp.int32(batch * steps))
    logits, _ = llama.forward(params, cache, inputs, cfg=cfg)
    logp = jax.nn.log_softmax(logits.reshape(batch, steps, -1), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[..., None], axis=-1)[..., 0]
    valid = jnp.arange(steps)[None] < lengths[:, None]
    return jnp.sum(jnp.where(valid, picked, 0.0), axis=1) / jnp.maximum(lengths, 1)


@functools.partial(jax.jit, static_argnames=("cfg", "n", "max_new_tokens"))
def rollout(params, prompt_ids, prompt_lens, key, temperature, eos_ids=(), *, cfg, n, max_new_tokens):
    """Sample ``n`` continuations of each of the B prompts ([B, P], ``generate``'s contract; every row its own
    seed from ``key``), score them (``mean_logprob``) and pick the best. Returns tokens [B, n, N], lengths
    [B, n], scores [B, n], best [B] (the index of the highest score) and its tokens [B, N]."""
    batch = prompt_ids.shape[0]
    ids, lens = jnp.repeat(prompt_ids, n, axis=0), jnp.repeat(prompt_lens, n)
    tokens, lengths, _ = F.generate(params, ids, lens, cfg=cfg, max_new_tokens=max_new_tokens, key=key,
                                    sampling=F.Sampling(temperature=temperature), eos_ids=eos_ids)
    scores = mean_logprob(params, ids, lens, tokens, lengths, cfg=cfg).reshape(batch, n)
    best = jnp.argmax(scores, axis=1)
    tokens, lengths = tokens.reshape(batch, n, -1), lengths.reshape(batch, n)
    return tokens, lengths, scores, best, tokens[jnp.arange(batch), best]


def main():
    from models.loader import load
    from xyjax.ops.gemm import prepare_weights

    model = load()  # the default model (SmolLM2-135M-Instruct), fetched once into ~/.cache/xyjax/models
    params = prepare_weights(model.params, "xla")
    texts = ["The capital of France is", "def fibonacci(n):", "Three rivers in Europe are"]
    prompts = [model.tokenizer.encode(t) for t in texts]
    width = max(map(len, prompts))
    ids = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    eos = jnp.asarray(sorted(model.tokenizer.stop_token_ids), jnp.int32)
    tokens, lengths, scores, best, _ = rollout(params, ids, lens, jax.random.key(0), jnp.float32(1.0), eos,
                                               cfg=model.config, n=4, max_new_tokens=24)
    decode = lambda row, k: model.tokenizer.decode(row[:k].tolist(), skip_special_tokens=True)  # noqa: E731
    tokens, lengths, scores, best = map(np.asarray, (tokens, lengths, scores, best))
    for i, text in enumerate(texts):
        print(f"=== {text!r}: {scores.shape[1]} samples, mean log-prob each, * the best")
        for j in range(scores.shape[1]):
            mark = "*" if j == best[i] else " "
            print(f"{mark} {scores[i, j]:7.3f} {decode(tokens[i, j], lengths[i, j])!r}")


if __name__ == "__main__":
    main()
