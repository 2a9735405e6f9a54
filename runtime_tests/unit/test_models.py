"""The reference zoo: every entry builds, takes its declared input, and has the expected size."""

import pytest
import torch

from edgecompress import models as zoo
from edgecompress.errors import UnknownNameError
from edgecompress.loading import InputSpec, sample_inputs
from edgecompress.stats import count_macs, count_params

REQUIRED = ["cifar_conv", "cifar_conv_fc", "lenet5", "mobilenet_v2", "resnet18", "resnet18_cifar", "text_classifier"]

# parameter counts of the reference architectures (torchvision's for resnet18 / mobilenet_v2)
PARAMS = {"resnet18": 11_689_512, "mobilenet_v2": 3_504_872, "lenet5": 61_706}


def test_zoo_has_required_models():
    assert set(REQUIRED) <= set(zoo.list_models())


@pytest.mark.parametrize("name", REQUIRED)
def test_model_runs_on_declared_input(name):
    spec = zoo.get_spec(name)
    model = zoo.create_model(name)
    assert not model.training
    (x,) = sample_inputs(model, InputSpec(spec.input_shape, spec.input_dtype))
    assert x.dtype == (torch.int64 if spec.input_dtype == "int64" else torch.float32)
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == spec.input_shape[0]
    assert count_macs(model, [x])[0] > 0


@pytest.mark.parametrize("name,params", PARAMS.items())
def test_parameter_counts_match_reference(name, params):
    assert count_params(zoo.create_model(name)) == params


def test_cifar_conv_fc_has_seed_003_fc_layers():
    model = zoo.create_model("cifar_conv_fc")
    assert (model.fc1.in_features, model.fc1.out_features) == (8192, 1536)
    assert (model.fc2.in_features, model.fc2.out_features) == (1536, 512)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 128, 128, 128]


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        zoo.create_model("resnet81")
