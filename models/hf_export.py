"""Write any model xyjax loads as an HF-format directory (config.json, model.safetensors, tokenizer files), so
peers that read HF checkpoints (transformers, vLLM) serve the very same weights: ``xyjax export-hf MODEL DIR``."""

from __future__ import annotations

import json
import os

import numpy as np

from models.hf_loader import BIAS_NAMES, LAYER_NAMES
from models.loader import LoadedModel
from models.weights import unstack_layers
from xyjax.ops.gemm.formats import dense


def export_hf(model: LoadedModel, directory: str, dtype=np.float32) -> None:
    """Writes ``model`` (weights cast to ``dtype``) into ``directory``; ``models.loader.load(directory)`` and
    transformers' ``from_pretrained`` read it back."""
    from safetensors.numpy import save_file

    cfg = model.config
    os.makedirs(directory, exist_ok=True)
    params = {k: np.asarray(dense(v)) for k, v in model.params.items() if k != "layers"}
    tensors = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = params["lm_head"]
    names = dict(LAYER_NAMES, **BIAS_NAMES)
    for i, layer in enumerate(unstack_layers(model.params["layers"])):
        tensors.update({f"model.layers.{i}.{names[key]}": value for key, value in layer.items()})
    save_file({k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    tok = model.tokenizer
    config = dict(cfg.to_hf(), torch_dtype=np.dtype(dtype).name, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id), f, indent=2)
    tok.save(directory)
