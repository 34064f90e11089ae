"""Load a Llama-family GGUF file: config, params (HF layout) and GGUF metadata.

A matrix (q, k, v, o, gate, up, down, the embedding, the LM head) of a block type ``GGUFBlocks`` holds (Q8_0,
Q4_0, Q4_1, Q4_K, Q6_K; ``xyjax.ops.gemm.formats``) keeps the file's blocks, row for row (the Q/K rows
un-permuted, fused q/k/v and gate/up rows concatenated, layers stacked, where the joined parts share their type;
else that matrix is dequantized); every other tensor (norms, biases, and matrices of other types) is dequantized
to float32 by ``gguf``. The engine's gemm backend picks the layout (``prepare_weights``).
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from models.config import ModelConfig
from models.tokenizer import gguf_metadata
from models.weights import stack_layers
from xyjax.ops.gemm.formats import GGUF_QTYPES, GGUFBlocks

# the matrices held as GGUFBlocks where their type allows
BLOCK_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd", "output")


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
        raise ValueError(f"tensor {tensor.name!r} has unsupported GGUF type {tensor.tensor_type.name}: the gguf "
                         f"package cannot dequantize it (dense matrices of {', '.join(GGUF_QTYPES)} load as their "
                         f"blocks; any type gguf dequantizes loads as float32)") from e
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"tensor {tensor.name!r} ({tensor.tensor_type.name}) holds {data.size} values, "
                         f"expected shape {shape}: the file is corrupt")
    return data.reshape(shape).astype(dtype)


def gguf_blocks(tensor) -> GGUFBlocks:
    """A 2-D GGUF tensor of a type in ``GGUF_QTYPES`` as ``GGUFBlocks`` [out, row_bytes]: the file's bytes."""
    out, k = (int(n) for n in reversed(tensor.shape))
    data = np.asarray(tensor.data, np.uint8)
    try:
        return GGUFBlocks(data.reshape(out, -1), tensor.tensor_type.name, k)
    except ValueError as e:
        raise ValueError(f"tensor {tensor.name!r} ({tensor.tensor_type.name}, shape {(out, k)}) holds "
                         f"{data.size} bytes: the file is corrupt ({e})") from e


def load_gguf(path: str, progress: bool = True) -> tuple[ModelConfig, dict, dict]:
    """Returns ``(config, params, metadata)``: params float32 numpy arrays (and ``GGUFBlocks``, see the module
    docstring) in ``models.llama``'s pytree layout."""
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, has_output_tensor="output.weight" in tensors,
                                has_qkv_bias="blk.0.attn_q.bias" in tensors)
    permuted = meta["general.architecture"] in ("llama", "mistral")

    def get(name: str) -> np.ndarray | GGUFBlocks:
        if name not in tensors:
            raise ValueError(f"GGUF file {path} lacks tensor {name!r}")
        tensor, kind = tensors[name], name.split(".")[-2]
        blocks = (kind in BLOCK_TENSORS and name.endswith(".weight") and len(tensor.shape) == 2
                  and tensor.tensor_type.name in GGUF_QTYPES)
        w = gguf_blocks(tensor) if blocks else dequantize(tensor, np.float32)
        if permuted and kind in ("attn_q", "attn_k"):   # a row permutation: block rows move whole
            heads = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
            w = GGUFBlocks(unpermute_qk(w.data, heads), w.qtype, w.k) if blocks else unpermute_qk(w, heads)
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
    stacked = stack_layers(layers)
    params = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight"), "layers": stacked}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("output.weight")
    return cfg, params, meta
