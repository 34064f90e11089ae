"""Turn per-layer HF-layout weights ([out, in] matrices) into ``models.llama``'s stacked, fused pytree (still
``[out, in]``: each output's weights are one contiguous row, which the ffi gemm streams in place), and back.
The stacked dense matrices may be in any weight format of ``xyjax.ops.gemm.formats``."""

from __future__ import annotations

import numpy as np

from xyjax.ops.gemm.formats import dense

DENSE = ("wqkv", "wo", "w_gate_up", "w_down")   # the stacked dense matrices (the gemms' weights)


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


def unstack_layers(params: dict) -> list[dict]:
    """Inverse of ``stack_layers``: the stacked, fused pytree's ``layers`` (any weight format) -> per-layer dicts
    in HF layout, plain numpy matrices."""
    stacked = {k: np.asarray(dense(v)) for k, v in params.items()}
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
