"""Tier `unit`: pure host logic: scheduler, block manager, prefix cache, tiling, config, CLI options. Every test under this folder is marked `unit`."""

import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
