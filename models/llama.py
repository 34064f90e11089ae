"""Llama-family decoder as pure functions over a param pytree (Llama, Mistral, Qwen2 with q/k/v bias).

Params (weights ``[out, in]`` like ``torch.nn.Linear``, each output's weights one contiguous row, which the
ffi gemm streams in place; layers stacked on a leading axis L so ``lax.scan`` runs them):
    embed [V, D]; final_norm [D]; lm_head [V, D] (absent when tied to ``embed``)
    layers: attn_norm [L, D], wqkv [L, (H + 2 Hkv) Dh, D], bqkv [L, (H + 2 Hkv) Dh] (optional),
            wo [L, D, H Dh], mlp_norm [L, D], w_gate_up [L, 2 F, D], w_down [L, D, F]
The dense matrices (``DENSE``) and the LM head may be in any weight format of ``xyjax.ops.gemm.formats``: the model
only hands them to ``smooth_gemm``.

Tensor parallelism (Megatron's layout, ``tp_plan``): over n shards, QKV and gate/up are column-parallel (each shard
its heads' q, k, v rows and its slice of gate and up), O and down row-parallel (one ``psum`` each), the embedding
and LM head cut by vocabulary rows (a lookup outside a shard's rows gives zeros, then one ``psum``; the logits
are gathered whole for the sampler). ``forward`` with ``tp_axis`` runs inside ``shard_map`` on one shard's params
and KV heads, ``cfg`` being ``local_config(cfg, n)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.weights import DENSE
from xyjax.ops import Backends, KVCache, StepInputs, take_rows


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) * weight`` computed in float32; x [..., D]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float32, with linear / llama3 scaling applied."""
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    kind, factor, *rest = cfg.rope_scaling
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    low, high, original = rest
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, HF half-split convention. x [T, H, Dh]; cos, sin [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def tp_plan(cfg: ModelConfig) -> dict:
    """How each param is cut over tensor-parallel shards, by name (``layers`` entries by their own name):
    ("outputs", sections) column-parallel by output rows, each fused section cut alike (("bias", sections): their
    bias [L, N] alike); "inputs" row-parallel along K; "vocab" by vocabulary rows; absent: replicated (norms)."""
    qkv = (cfg.q_size, cfg.kv_size, cfg.kv_size)
    return {"embed": "vocab", "lm_head": "vocab", "wqkv": ("outputs", qkv), "bqkv": ("bias", qkv), "wo": "inputs",
            "w_gate_up": ("outputs", (cfg.intermediate_size,) * 2), "w_down": "inputs"}


def local_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """One of n tensor-parallel shards' shapes; a ValueError naming what does not divide by n."""
    sizes = {"attention heads": cfg.num_heads, "KV heads": cfg.num_kv_heads,
             "intermediate size": cfg.intermediate_size, "vocabulary": cfg.vocab_size}
    bad = [f"{name} {size}" for name, size in sizes.items() if size % n]
    if bad:
        raise ValueError(f"tensor_parallel_size={n} does not divide the model's {', '.join(bad)} (every shard "
                         f"holds whole KV heads, their query heads, and equal slices of the MLP and vocabulary)")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                               intermediate_size=cfg.intermediate_size // n, vocab_size=cfg.vocab_size // n)


def embed_tokens(w, ids: jax.Array, tp_axis: str | None = None) -> jax.Array:
    """Rows ``ids`` [T] of the embedding [V, D]; with ``tp_axis``, w is this shard's vocabulary rows: ids outside
    them give zeros and the shards' rows are summed (exactly one shard contributes each row)."""
    if tp_axis is None:
        return take_rows(w, ids)
    local = ids - jax.lax.axis_index(tp_axis) * w.shape[0]
    inside = (local >= 0) & (local < w.shape[0])
    x = take_rows(w, jnp.where(inside, local, 0))
    return jax.lax.psum(jnp.where(inside[:, None], x, 0).astype(x.dtype), tp_axis)


def forward(params: dict, kv: KVCache, inputs: StepInputs, *, cfg: ModelConfig,
            backends: Backends = Backends(), tp_axis: str | None = None) -> tuple[jax.Array, KVCache]:
    """One step: writes this step's K/V into ``kv`` and returns float32 logits [R, V] for the sampled rows.
    ``tp_axis``: the mesh axis of tensor parallelism when run under ``shard_map`` on one shard (module docstring;
    the logits are then all of the vocabulary, gathered)."""
    m = inputs.num_tokens
    reduce = (lambda y: y) if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))  # noqa: E731
    x = embed_tokens(params["embed"], inputs.token_ids, tp_axis)              # [T, D]
    angles = inputs.positions[:, None].astype(jnp.float32) * rope_frequencies(cfg)[None]
    cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
    # The dense weights stay stacked [L, out, in] and are read by layer index (the ffi backend in place);
    # only the small per-layer params are scanned over.
    dense = {name: params["layers"][name] for name in DENSE}
    scanned_params = {name: p for name, p in params["layers"].items() if name not in DENSE}
    num_tokens = x.shape[0]

    def layer(carry, scanned):
        x, kv = carry
        index, p = scanned
        gemm = lambda a, name: backends.smooth_gemm(a, dense[name], m, layer=index, transpose_w=True)  # noqa: E731
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        qkv = gemm(h, "wqkv")
        if "bqkv" in p:
            qkv = qkv + p["bqkv"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = apply_rope(q.reshape(num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        kv = kv.write(index, k, v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim), inputs.slot_mapping)
        attn = backends.meta_attention(q, kv, index, inputs.attention)
        x = x + reduce(gemm(attn.reshape(num_tokens, cfg.q_size), "wo"))
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        gate, up = jnp.split(gemm(h, "w_gate_up"), 2, axis=-1)
        x = x + reduce(gemm(jax.nn.silu(gate) * up, "w_down"))
        return (x, kv), None

    (x, kv), _ = jax.lax.scan(layer, (x, kv), (jnp.arange(cfg.num_layers), scanned_params))
    h = rms_norm(x[inputs.sample_index], params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]   # [V, D]
    logits = backends.smooth_gemm(h, head, inputs.num_samples, transpose_w=True).astype(jnp.float32)
    if tp_axis is not None:
        logits = jax.lax.all_gather(logits, tp_axis, axis=1, tiled=True)
    return logits, kv


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> dict:
    """Random plain params with the right structure (for tests and tiny configs)."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    shapes = {"wqkv": (L, qkv, D), "wo": (L, D, cfg.q_size), "w_gate_up": (L, 2 * F, D), "w_down": (L, D, F)}
    if cfg.attention_bias:
        shapes["bqkv"] = (L, qkv)
    keys = iter(jax.random.split(key, len(shapes) + 5))   # + norms, embed, final norm, lm_head
    normal = lambda shape: (scale * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
    layers = {name: normal(shape) for name, shape in shapes.items()}
    layers["attn_norm"] = (1.0 + normal((L, D))).astype(dtype)
    layers["mlp_norm"] = (1.0 + normal((L, D))).astype(dtype)
    params = {"embed": normal((cfg.vocab_size, D)), "final_norm": (1.0 + normal((D,))).astype(dtype),
              "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((cfg.vocab_size, D))
    return params


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """(K, N, transpose_w) of each linear layer, as ``forward`` calls ``smooth_gemm``."""
    return {"qkv": (cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, True),
            "o": (cfg.q_size, cfg.hidden_size, True),
            "gate_up": (cfg.hidden_size, 2 * cfg.intermediate_size, True),
            "down": (cfg.intermediate_size, cfg.hidden_size, True),
            "lm_head": (cfg.hidden_size, cfg.vocab_size, True)}
