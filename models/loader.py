"""Resolve a model argument (known name, GGUF path or HF directory) and load config, params, tokenizer."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import registry
from models.config import ModelConfig
from models.gguf_loader import load_gguf
from models.hf_loader import load_hf
from models.tokenizer import Tokenizer
from xyjax.ops.gemm import formats


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: dict          # device arrays (and weight formats), models.llama layout
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


def load(model: str | None = None, dtype="float32", progress: bool = True) -> LoadedModel:
    """Load ``model`` (see ``resolve``) with weights in ``dtype``, each in the file's format: a GGUF's
    block-quantized dense matrices stay ``GGUFBlocks`` (uint8, the file's bytes) in a float32 load
    (``models.gguf_loader``), everything else is a plain array. The engine's gemm backend picks their layout for
    this machine (``prepare_weights``)."""
    path = resolve(model)
    dtype = jnp.dtype(dtype)
    if os.path.isdir(path):
        cfg, params = load_hf(path, np.float32, progress)
        tokenizer = Tokenizer.from_dir(path)
    else:
        cfg, params, meta = load_gguf(path, progress)
        tokenizer = Tokenizer.from_gguf(meta)
    if dtype != jnp.float32:   # block formats are exact in float32 only
        params = formats.convert(params, "plain")
    # floating leaves in dtype; GGUFBlocks' bytes stay uint8
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype if np.issubdtype(a.dtype, np.floating) else None), params)
    return LoadedModel(name=model or registry.DEFAULT_MODEL, config=cfg, params=params, tokenizer=tokenizer,
                       dtype=dtype)
