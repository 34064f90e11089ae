"""Resolve a model argument (known name, GGUF path or HF directory) and load config, params, tokenizer."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import registry
from models.config import ModelConfig
from models.tokenizer import Tokenizer
from models.weights import DENSE

WEIGHT_LAYOUTS = ("auto", "plain", "split", "tiles")


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: dict          # device arrays, models.llama layout
    tokenizer: Tokenizer
    dtype: jnp.dtype


def resolve(model: str | None) -> str:
    """A local path for ``model``: a known name (fetched once), a .gguf file, or an HF directory."""
    model = registry.DEFAULT_MODEL if model is None else str(model)
    if model.lower() in registry.KNOWN_MODELS:
        return registry.fetch(model.lower())
    path = os.path.expanduser(model)
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    tried = [f"known model names ({', '.join(registry.KNOWN_MODELS)})", f"a GGUF file at {os.path.abspath(path)}",
             f"an HF directory with config.json at {os.path.abspath(path)}"]
    raise FileNotFoundError(f"unknown model {model!r}; tried " + "; ".join(tried))


def load(model: str | None = None, dtype="float32", progress: bool = True, weight_layout: str = "auto") -> LoadedModel:
    """Load ``model`` (see ``resolve``) with weights in ``dtype``. weight_layout: how a float32 load of an all-Q4_1
    GGUF keeps its dense matrices (other models: always "plain"): "plain" [out, in] float32, "split" the split
    block layout ``[d * q | m]`` (``models.gguf_loader``), "tiles" that as ``xyjax.ops.gemm.TileWeights`` (read
    in place by the ffi gemm's AMX kernel, at every m), "auto" split where it pays (``split_layout_pays``), else
    plain."""
    from models.gguf_loader import load_gguf
    from models.hf_loader import load_hf
    from xyjax.ops.gemm import pack_tiles, split_layout_pays

    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {', '.join(WEIGHT_LAYOUTS)}, got {weight_layout!r}")
    if weight_layout == "auto":
        weight_layout = "split" if split_layout_pays() else "plain"

    path = resolve(model)
    dtype = jnp.dtype(dtype)
    if os.path.isdir(path):
        cfg, params = load_hf(path, np.float32, progress)
        tokenizer = Tokenizer.from_dir(path)
    else:
        split = dtype == jnp.float32 and weight_layout != "plain"
        cfg, params, meta = load_gguf(path, np.float32, progress, split)
        tokenizer = Tokenizer.from_gguf(meta)
    tiles = {}
    if cfg.quant_block and weight_layout == "tiles":
        tiles = {name: pack_tiles(params["layers"].pop(name)) for name in DENSE}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    params["layers"].update(tiles)
    return LoadedModel(name=model or registry.DEFAULT_MODEL, config=cfg, params=params, tokenizer=tokenizer,
                       dtype=dtype)
