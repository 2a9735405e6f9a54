"""Shared fixtures: a click runner and a torch seeded per test. CUDA tests skip without the provider."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner


def pytest_configure(config):
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    from edgecompress.runtime import available_providers

    if "cuda" in available_providers():
        return
    skip = pytest.mark.skip(reason="onnxruntime has no CUDA execution provider here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner):
    """Invoke the real ``edgecompress`` command: ``cli("export", "lenet5", "-o", path)``."""
    from edgecompress.cli import main

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke
