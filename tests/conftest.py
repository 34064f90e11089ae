"""Fixtures of every tier: the tiny random-weight model and its synthetic tokenizer (nothing downloaded).

Tiers are folders, each test marked with its folder's name (below): unit/ (host logic: scheduler, block manager,
prefix cache, tiling, tokenizer, CLI, layering), ops/ (op backends: attention, gemm, sampler, the C++ contract),
engine/ (engine, LLM, server on the tiny model), e2e/ (the real default model, transformers references).
``pytest -m "not e2e"`` fetches no model; the real model's fixtures live in e2e/conftest.py only."""

import os
import pathlib

# Four CPU devices for the tensor- and data-parallel tests (engine/test_parallel.py), set before jax starts: one
# process runs the suite, and a device count cannot change once jax has started. Programs run on device 0 as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import helpers  # noqa: E402
from models.loader import LoadedModel  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TIERS = {"unit", "ops", "engine", "e2e"}   # the folders; each test is marked with its folder's name
HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        tier = item.path.relative_to(HERE).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's compiled programs: one process runs the whole suite, and the programs of
    every module kept alive exhaust the process's memory maps (XLA's CPU code is mapped per program)."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The tiny model's synthetic byte-level BPE tokenizer (e2e/conftest.py overrides it with the real one)."""
    return helpers.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> LoadedModel:
    """A 2-layer random-weight Llama (helpers.TINY) with the synthetic tokenizer (outputs are gibberish)."""
    return helpers.tiny_model(tokenizer)
