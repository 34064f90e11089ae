"""Turn per-layer HF-layout weights ([out, in] matrices) into ``models.llama``'s stacked, fused pytree."""

from __future__ import annotations

import numpy as np


def stack_layers(layers: list[dict]) -> dict:
    """Per-layer dicts with keys attn_norm, q, k, v, o, mlp_norm, gate, up, down (+ q_bias, k_bias, v_bias),
    matrices in HF ``[out, in]`` layout -> stacked ``[L, ...]`` arrays with fused ``[in, out]`` matrices."""

    def stack(fn):
        return np.stack([fn(layer) for layer in layers])

    out = {
        "attn_norm": stack(lambda p: p["attn_norm"]),
        "wqkv": stack(lambda p: np.concatenate([p["q"], p["k"], p["v"]]).T),
        "wo": stack(lambda p: p["o"].T),
        "mlp_norm": stack(lambda p: p["mlp_norm"]),
        "w_gate_up": stack(lambda p: np.concatenate([p["gate"], p["up"]]).T),
        "w_down": stack(lambda p: p["down"].T),
    }
    if "q_bias" in layers[0]:
        out["bqkv"] = stack(lambda p: np.concatenate([p["q_bias"], p["k_bias"], p["v_bias"]]))
    return out

