"""Load a Llama-family GGUF file: config, params (HF layout) and GGUF metadata.

Where every dense matrix of the file is Q4_1 (w = d * q + m per block of 32 inputs), the stacked dense matrices
keep their blocks as ``SplitBlocks`` (``xyjax.ops.gemm.formats``): the same weights, whose parts are exact in
bfloat16 pairs; every other tensor is dequantized.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from models.config import ModelConfig
from models.tokenizer import gguf_metadata
from models.weights import DENSE, stack_layers
from xyjax.ops.gemm.formats import SplitBlocks

DENSE_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
Q4_1_BLOCK = 32    # inputs per Q4_1 block
Q4_1_BYTES = 20    # bytes per block: d and m float16, 32 4-bit q (element j in byte j % 16, high nibble j >= 16)


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


def split_q4_1(tensor) -> np.ndarray:
    """A Q4_1 tensor [out, in] in the split block layout [out, in + in / 32] float32: ``[d * q | m]``. Checked
    to give gguf's own dequantization exactly (d * q + m rounded once), so both layouts hold the same weights."""
    raw = np.asarray(tensor.data, np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)       # [out, in / 32]
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32)  # [out, in / 32, 32]
    split = np.concatenate([(d[..., None] * q).reshape(rows, -1), mins], axis=-1)
    if not np.array_equal(np.asarray(SplitBlocks(split, Q4_1_BLOCK).dense()), dequantize(tensor, np.float32)):
        raise ValueError(f"tensor {tensor.name!r}: the split Q4_1 layout does not reproduce gguf's dequantization")
    return split


def load_gguf(path: str, progress: bool = True) -> tuple[ModelConfig, dict, dict]:
    """Returns ``(config, params, metadata)``: params float32 numpy arrays (and ``SplitBlocks``, see the module
    docstring) in ``models.llama``'s pytree layout."""
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, has_output_tensor="output.weight" in tensors,
                                has_qkv_bias="blk.0.attn_q.bias" in tensors)
    permuted = meta["general.architecture"] in ("llama", "mistral")
    from gguf import GGMLQuantizationType

    dense = [tensors.get(f"blk.{i}.{kind}.weight") for i in range(cfg.num_layers) for kind in DENSE_TENSORS]
    split = all(t is not None and t.tensor_type == GGMLQuantizationType.Q4_1 for t in dense)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"GGUF file {path} lacks tensor {name!r}")
        kind = name.split(".")[-2]
        w = split_q4_1(tensors[name]) if split and kind in DENSE_TENSORS else dequantize(tensors[name], np.float32)
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
    stacked = stack_layers(layers)
    if split:
        stacked.update({name: SplitBlocks(stacked[name], Q4_1_BLOCK) for name in DENSE})
    params = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight"), "layers": stacked}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("output.weight")
    return cfg, params, meta
