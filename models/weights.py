"""Turn per-layer HF-layout weights ([out, in] matrices) into ``models.llama``'s stacked, fused pytree (still
``[out, in]``: each output's weights are one contiguous row, which the ffi gemm streams in place), and back.
The stacked dense matrices may be in any weight format of ``xyjax.ops.gemm.formats``; ``stack_layers`` keeps
``GGUFBlocks`` (a GGUF's block rows) where the fused and stacked parts share their qtype."""

from __future__ import annotations

import numpy as np

from xyjax.ops.gemm.formats import GGUFBlocks, dense

DENSE = ("wqkv", "wo", "w_gate_up", "w_down")   # the stacked dense matrices (the gemms' weights)


def _join(parts: list, join) -> np.ndarray | GGUFBlocks:
    """``join`` (np.concatenate: rows; np.stack: layers) of matrices; ``GGUFBlocks`` of one qtype and K join
    their block rows (a row is independent of the others), any other mix joins their dense views."""
    first = parts[0]
    if isinstance(first, GGUFBlocks) and all(isinstance(p, GGUFBlocks) and (p.qtype, p.k) == (first.qtype, first.k)
                                             for p in parts):
        return GGUFBlocks(join([np.asarray(p.data) for p in parts]), first.qtype, first.k)
    return join([np.asarray(dense(p), np.float32) if isinstance(p, GGUFBlocks) else p for p in parts])


def stack_layers(layers: list[dict]) -> dict:
    """Per-layer dicts with keys attn_norm, q, k, v, o, mlp_norm, gate, up, down (+ q_bias, k_bias, v_bias),
    matrices in HF ``[out, in]`` layout (numpy, or ``GGUFBlocks``) -> stacked ``[L, ...]`` arrays with fused
    ``[out, in]`` matrices (``GGUFBlocks`` where every part is blocks of one qtype, else float32)."""

    def stack(fn):
        return _join([fn(layer) for layer in layers], np.stack)

    def cat(*names):
        return lambda p: _join([p[name] for name in names], np.concatenate)

    out = {
        "attn_norm": stack(lambda p: p["attn_norm"]),
        "wqkv": stack(cat("q", "k", "v")),
        "wo": stack(lambda p: p["o"]),
        "mlp_norm": stack(lambda p: p["mlp_norm"]),
        "w_gate_up": stack(cat("gate", "up")),
        "w_down": stack(lambda p: p["down"]),
    }
    if "q_bias" in layers[0]:
        out["bqkv"] = stack(cat("q_bias", "k_bias", "v_bias"))
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
