"""Generate for a batch of prompts in one jitted call (xyjax.functional): no engine, no host work per token."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.loader import load
from xyjax import functional as F
from xyjax.ops.gemm import prepare_weights

model = load()  # the default model (SmolLM2-135M-Instruct), fetched once into ~/.cache/xyjax/models
params = prepare_weights(model.params, "xla")  # the GGUF's blocks in the xla gemm backend's layout
texts = ["The capital of France is", "def fibonacci(n):", "Three rivers in Europe are"]
prompts = [model.tokenizer.encode(t) for t in texts]
width = max(map(len, prompts))
ids = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
lens = jnp.asarray([len(p) for p in prompts], jnp.int32)

run = jax.jit(functools.partial(F.generate, cfg=model.config, max_new_tokens=32))
eos = jnp.asarray(sorted(model.tokenizer.stop_token_ids), jnp.int32)
for name, sampling in [("greedy", F.Sampling()),
                       ("sampled", F.Sampling(temperature=jnp.float32(0.7), top_p=jnp.float32(0.9)))]:
    tokens, lengths, steps = run(params, ids, lens, sampling=sampling, key=jax.random.key(0), eos_ids=eos)
    print(f"=== {name}: {int(steps)} steps")
    for text, row, n in zip(texts, np.asarray(tokens), np.asarray(lengths)):
        print(f"--- {text!r} + {n} tokens\n{model.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)}")
