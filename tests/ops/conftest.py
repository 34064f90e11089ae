"""Tier `ops`: op backends: attention (xla, ffi, pallas), gemm, sampler, the C++ contract. Every test under this folder is marked `ops`."""

import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.ops)
