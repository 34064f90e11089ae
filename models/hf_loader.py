"""Load an HF-format directory: config.json + *.safetensors (Llama, Mistral, Qwen2 layouts)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from tqdm import tqdm

from models.config import ModelConfig
from models.weights import stack_layers

LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
BIAS_NAMES = {"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias"}


def load_hf(path: str, dtype=np.float32, progress: bool = True) -> tuple[ModelConfig, dict]:
    """Returns ``(config, params)`` from an HF directory; params follow ``models.llama``'s layout."""
    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not an HF model directory: no config.json")
    with open(config_path) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    handles = [safe_open(f, framework="flax") for f in files]
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise ValueError(f"{path}: checkpoint lacks tensor {name!r}")
        return np.asarray(where[name].get_tensor(name).astype(np.float32)).astype(dtype)

    names = dict(LAYER_NAMES, **(BIAS_NAMES if cfg.attention_bias else {}))
    layers = [{key: get(f"model.layers.{i}.{name}") for key, name in names.items()}
              for i in tqdm(range(cfg.num_layers), desc=f"loading {os.path.basename(path)}", disable=not progress)]
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"),
              "layers": stack_layers(layers)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight")
    return cfg, params
