"""Load a Llama-family GGUF file: config, dequantized params (HF layout) and GGUF metadata."""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from models.config import ModelConfig
from models.weights import stack_layers


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of Q/K rows (interleaved rope -> HF half-split). w [out, ...]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF half-split -> interleaved rope); inverse of ``unpermute_qk``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str):
    """Open ``path`` with ``gguf.GGUFReader``; a clear ValueError if it is not a readable GGUF."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on corrupt files
        raise ValueError(f"corrupt or unsupported GGUF file {path}: {type(e).__name__}: {e}") from e


def dequantize(tensor, dtype) -> np.ndarray:
    """One GGUF tensor as a numpy array in HF (numpy) axis order, converted to ``dtype``."""
    from gguf import quants

    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"tensor {tensor.name!r} has unsupported GGUF type {tensor.tensor_type.name}") from e
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"tensor {tensor.name!r} ({tensor.tensor_type.name}) holds {data.size} values, "
                         f"expected shape {shape}: the file is corrupt")
    return data.reshape(shape).astype(dtype)


def load_gguf(path: str, dtype=np.float32, progress: bool = True) -> tuple[ModelConfig, dict, dict]:
    """Returns ``(config, params, metadata)``; params follow ``models.llama``'s pytree layout."""
    from models.tokenizer import gguf_metadata

    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, has_output_tensor="output.weight" in tensors,
                                has_qkv_bias="blk.0.attn_q.bias" in tensors)
    permuted = meta["general.architecture"] in ("llama", "mistral")

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"GGUF file {path} lacks tensor {name!r}")
        w = dequantize(tensors[name], dtype)
        kind = name.split(".")[-2]
        if permuted and kind in ("attn_q", "attn_k"):
            w = unpermute_qk(w, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
        return w

    layers = []
    for i in tqdm(range(cfg.num_layers), desc=f"loading {os.path.basename(path)}", disable=not progress):
        b = f"blk.{i}."
        layer = {
            "attn_norm": get(b + "attn_norm.weight"),
            "q": get(b + "attn_q.weight"), "k": get(b + "attn_k.weight"), "v": get(b + "attn_v.weight"),
            "o": get(b + "attn_output.weight"),
            "mlp_norm": get(b + "ffn_norm.weight"),
            "gate": get(b + "ffn_gate.weight"), "up": get(b + "ffn_up.weight"), "down": get(b + "ffn_down.weight"),
        }
        if cfg.attention_bias:
            layer.update(q_bias=get(b + "attn_q.bias"), k_bias=get(b + "attn_k.bias"), v_bias=get(b + "attn_v.bias"))
        layers.append(layer)
    params = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight"),
              "layers": stack_layers(layers)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("output.weight")
    return cfg, params, meta
