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


@pytest.fixture(scope="session")
def digits_fitting():
    """The trained digits CNN (BatchNorm folded), 73 of its training digits as calibration (64 fit, 9 held
    out) and the test split: ``(model, calib, x_test, y_test)``."""
    from edgecompress import exporters
    from edgecompress.capture import calibration_set
    from edgecompress.loading import load_model
    from edgecompress.models import digits

    model = load_model("digits_cnn").module.eval()
    exporters.fold_batchnorm_(model)
    x_train, _ = digits.load_digits("train")
    x_test, y_test = digits.load_digits("test")
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:73]
    return model, calibration_set({"input": x_train[order].numpy()}, "digits train"), x_test, y_test
