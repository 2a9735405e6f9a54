"""The bundled default model: trained weights ship with it, its data split is fixed, and it is accurate."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgecompress import models as zoo
from edgecompress.loading import load_model
from edgecompress.models import digits
from edgecompress.stats import count_params


@pytest.fixture(scope="module")
def test_split():
    return digits.load_digits("test")


def test_zoo_entry_loads_the_shipped_weights():
    spec = zoo.get_spec("digits_cnn")
    assert spec.input_shape == (1, 1, 32, 32)
    trained, fresh = zoo.create_model("digits_cnn"), digits.DigitsCNN()
    assert not torch.equal(trained.classifier.weight, fresh.classifier.weight)
    assert torch.equal(load_model("digits_cnn").module.classifier.weight, trained.classifier.weight)


def test_model_size_is_small_but_has_wide_convs():
    model = zoo.create_model("digits_cnn")
    assert 0.5e6 <= 4 * count_params(model) <= 1.5e6
    convs = [(m.in_channels, m.out_channels, m.kernel_size) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(1, 64, (3, 3)), (64, 128, (3, 3)), (128, 128, (3, 3))]


def test_data_split_is_fixed_stratified_and_disjoint():
    with np.load(digits.DATA_FILE) as data:
        images, labels, test = data["images"], data["labels"], data["test"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert test.sum() == 360 and (~test).sum() == 1437
    assert np.bincount(labels[test], minlength=10).min() >= 35  # every class held out in proportion


def test_preprocessing_upsamples_to_32x32(test_split):
    x, y = test_split
    assert x.shape == (360, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_dense_accuracy_on_held_out_set_is_at_least_95_percent(test_split):
    x, y = test_split
    with torch.no_grad():
        accuracy = float((zoo.create_model("digits_cnn")(x).argmax(1) == y).float().mean())
    assert accuracy >= 0.95


def test_unknown_split_is_a_config_error():
    from edgecompress.errors import ConfigError

    with pytest.raises(ConfigError, match="use 'train' or 'test'"):
        digits.load_digits("validation")


def test_scikit_learn_is_not_a_runtime_dependency():
    code = "import sys, edgecompress.models, edgecompress.pipeline; sys.exit('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
