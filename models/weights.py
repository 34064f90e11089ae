"""Turn per-layer HF-layout weights ([out, in] matrices) into ``models.llama``'s stacked, fused pytree (still
``[out, in]``: each output's weights are one contiguous row, which the ffi gemm streams in place), and back.

The dense matrices may be in the split block layout (``ModelConfig.quant_block`` = b > 0, see
``xyjax.ops.gemm``): each row ``[d * q | m]`` [out, in + in / b], the block minimums m as extra columns.
``merge_blocks`` turns them into plain ``[out, in]`` weights.
"""

from __future__ import annotations

import numpy as np

DENSE = ("wqkv", "wo", "w_gate_up", "w_down")   # the stacked dense matrices (the gemms' weights)


def in_features(w, block: int) -> int:
    """in of a dense matrix [..., out, in] (split layout: [..., out, in + in / block])."""
    return w.shape[-1] * block // (block + 1) if block else w.shape[-1]


def quantize_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """Plain [..., out, in] -> the split layout of its 4-bit block quantization, rounded as GGUF's Q4_1
    quantizer rounds: per block of ``block`` inputs, d = (max - min) / 15 and q = trunc((w - min) / d + 0.5) in
    [0, 15] from the float32 min and d, then d and m = min stored as float16."""
    w = np.asarray(w, np.float32)
    b = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.clip(np.trunc((b - lo) * inv + np.float32(0.5)), 0, 15)
    d16, mins = (v.astype(np.float16).astype(np.float32) for v in (d, lo))
    return np.concatenate([(d16 * q).reshape(w.shape), mins[..., 0]], axis=-1)


def merge_blocks(w, block: int) -> np.ndarray:
    """Split layout [..., out, in + in / block] (an array or ``xyjax.ops.gemm.TileWeights``) -> plain [..., out, in]
    float32 (d * q + m, rounded once, as gguf's dequantization computes it); plain weights (block = 0) are
    returned as numpy arrays."""
    from xyjax.ops.gemm import TileWeights, unpack_tiles

    if isinstance(w, TileWeights):
        w = unpack_tiles(w)
    if not block:
        return np.asarray(w)
    K = in_features(w, block)
    dq, mins = np.asarray(w[..., :K], np.float32), np.asarray(w[..., K:], np.float32)
    return (dq.reshape(*dq.shape[:-1], K // block, block) + mins[..., None]).reshape(dq.shape)


def stack_layers(layers: list[dict]) -> dict:
    """Per-layer dicts with keys attn_norm, q, k, v, o, mlp_norm, gate, up, down (+ q_bias, k_bias, v_bias),
    matrices in HF ``[out, in]`` layout -> stacked ``[L, ...]`` arrays with fused ``[out, in]`` matrices."""

    def stack(fn):
        return np.stack([fn(layer) for layer in layers])

    out = {
        "attn_norm": stack(lambda p: p["attn_norm"]),
        "wqkv": stack(lambda p: np.concatenate([p["q"], p["k"], p["v"]])),
        "wo": stack(lambda p: p["o"]),
        "mlp_norm": stack(lambda p: p["mlp_norm"]),
        "w_gate_up": stack(lambda p: np.concatenate([p["gate"], p["up"]])),
        "w_down": stack(lambda p: p["down"]),
    }
    if "q_bias" in layers[0]:
        out["bqkv"] = stack(lambda p: np.concatenate([p["q_bias"], p["k_bias"], p["v_bias"]]))
    return out


def unstack_layers(params: dict, block: int = 0) -> list[dict]:
    """Inverse of ``stack_layers``: the stacked, fused pytree's ``layers`` (dense matrices in the split layout
    of ``block``, 0: plain) -> per-layer dicts in HF layout, plain matrices."""
    stacked = {k: merge_blocks(v, block if k in DENSE else 0) for k, v in params.items()}
    q_size = stacked["wo"].shape[2]                         # wo [L, hidden, q_size]
    kv_size = (stacked["wqkv"].shape[1] - q_size) // 2
    inter = stacked["w_down"].shape[2]                      # w_down [L, hidden, intermediate]
    layers = []
    for i in range(stacked["wqkv"].shape[0]):
        qkv = stacked["wqkv"][i]                            # [q + 2 kv, hidden]
        gate_up = stacked["w_gate_up"][i]                   # [2 inter, hidden]
        layer = {"attn_norm": stacked["attn_norm"][i], "mlp_norm": stacked["mlp_norm"][i],
                 "q": qkv[:q_size], "k": qkv[q_size:q_size + kv_size], "v": qkv[q_size + kv_size:],
                 "o": stacked["wo"][i], "gate": gate_up[:inter], "up": gate_up[inter:], "down": stacked["w_down"][i]}
        if "bqkv" in stacked:
            b = stacked["bqkv"][i]
            layer.update(q_bias=b[:q_size], k_bias=b[q_size:q_size + kv_size], v_bias=b[q_size + kv_size:])
        layers.append(layer)
    return layers
