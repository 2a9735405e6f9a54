"""What a layer's output goes through (``capture.downstream``), read from a torch.fx trace and from ONNX nodes,
and the refit that uses it: the last step fitted through the layer's ReLU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from edgecompress.capture.downstream import onnx_downstream, torch_downstream


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)  # -> nn.ReLU
        self.act = nn.ReLU()
        self.normed = nn.Conv2d(8, 8, 3, padding=1)  # -> BatchNorm -> F.relu
        self.bn = nn.BatchNorm2d(8)
        self.after = nn.Conv2d(8, 8, 1)  # -> Dropout -> relu -> BatchNorm (CREPE's order)
        self.drop = nn.Dropout()
        self.bn_after = nn.BatchNorm2d(8)
        self.residual = nn.Conv2d(8, 8, 1)  # two users: nothing
        self.head = nn.Linear(8, 4)  # -> sigmoid: nothing

    def forward(self, x):
        x = self.act(self.plain(x))
        x = F.relu(self.bn(self.normed(x)))
        x = self.bn_after(torch.relu(self.drop(self.after(x))))
        y = self.residual(x)
        x = x + y * y
        return torch.sigmoid(self.head(x.mean((2, 3))))


def test_torch_layers_feeding_a_relu_and_batchnorm_scales():
    net = _Net().eval()
    with torch.no_grad():
        for bn in (net.bn, net.bn_after):
            bn.running_var.uniform_(0.5, 4.0)
            bn.running_mean.normal_()
            bn.weight.uniform_(0.1, 2.0)
    found = torch_downstream(net, ["plain", "normed", "after", "residual", "head"])
    assert set(found) == {"plain", "normed", "after"}
    assert found["plain"].rectifier is not None and found["plain"].rectifier.scale is None
    scale = net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)
    normed = found["normed"]
    torch.testing.assert_close(normed.rectifier.scale, scale.detach())
    torch.testing.assert_close(normed.rectifier.shift, (net.bn.bias - net.bn.running_mean * scale).detach())
    assert found["after"].rectifier.scale is None  # through the Dropout; the BatchNorm after the ReLU changes nothing


def test_an_untraceable_model_gets_nothing_and_no_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x)) if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace it

    assert torch_downstream(Branchy(), ["fc"]) == {}


def _onnx_chain() -> onnx.ModelProto:
    """conv_a -> BatchNormalization -> Relu; conv_b -> Identity -> Relu; conv_c -> Add (graph output)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), n) for n in ("wa", "wb", "wc")]
    gamma, beta = np.array([1.0, 2.0, 0.5, 0.0], np.float32), np.zeros(4, np.float32)
    mean, var = np.zeros(4, np.float32), np.array([1.0, 4.0, 0.25, 1.0], np.float32)
    inits += [numpy_helper.from_array(a, n) for a, n in ((gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"))]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="conv_a"),
             helper.make_node("BatchNormalization", ["ya", "g", "b", "m", "v"], ["na"], epsilon=0.0),
             helper.make_node("Relu", ["na"], ["ra"]),
             helper.make_node("Conv", ["ra", "wb"], ["yb"], name="conv_b"),
             helper.make_node("Identity", ["yb"], ["ib"]),
             helper.make_node("Relu", ["ib"], ["rb"]),
             helper.make_node("Conv", ["rb", "wc"], ["yc"], name="conv_c"),
             helper.make_node("Add", ["yc", "rb"], ["out"])]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [info("out", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_layers_feeding_a_relu_and_batchnorm_scales():
    found = onnx_downstream(_onnx_chain(), {"conv_a": "ya", "conv_b": "yb", "conv_c": "yc"})
    assert set(found) == {"conv_a", "conv_b"}
    np.testing.assert_allclose(found["conv_a"].rectifier.scale.numpy(), [1.0, 1.0, 1.0, 0.0])
    assert found["conv_b"].rectifier.scale is None


@pytest.fixture(scope="module")
def relu_net():
    """A stack whose middle conv feeds a BatchNorm and a ReLU that drops 84% of its outputs, and calibration."""
    from edgecompress.capture import calibration_set

    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                        nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 8, 1)).eval()
    with torch.no_grad():  # a decaying spectrum, as trained layers have: the rank kept matters, not noise
        u, _, v = torch.linalg.svd(torch.randn(64, 64 * 9, generator=gen), full_matrices=False)
        net[2].weight.copy_((u * torch.arange(1, 65.0) ** -1.0 @ v).reshape(64, 64, 3, 3))
        y = net[:3](torch.randn(64, 8, 12, 12, generator=gen))
        std = y.std((0, 2, 3))
        net[3].running_var.copy_(std ** 2)
        net[3].running_mean.copy_(y.mean((0, 2, 3)) + 1.0 * std)  # most pre-activations below the ReLU's knee
    x = torch.randn(80, 8, 12, 12, generator=gen)
    return net, calibration_set({"input": x[:73].numpy()}, "random"), x[73:]


def test_the_refit_through_the_relu_lowers_the_models_error(relu_net, monkeypatch):
    """At the same ranks, fitting through the BatchNorm and ReLU brings what the next layer sees (on samples
    not fitted) closer to the dense model's than the linear refit does (downstream switched off), and the
    record says what was fitted."""
    from edgecompress.capture import TorchCapture
    from edgecompress.factorize import FactorizeConfig, factorize

    net, calib, x = relu_net
    config = FactorizeConfig(method="svd", ratio=4, include=("2",))
    aware, report = factorize(net, config, calib=calib)
    (record,) = report.factorized
    assert "through its BatchNorm + ReLU" in record.fit
    monkeypatch.setattr(TorchCapture, "downstream", lambda self, name: None)  # the fit before this feature
    plain, plain_report = factorize(net, config, calib=calib)
    assert plain_report.factorized[0].ranks == record.ranks
    with torch.no_grad():  # after the ReLU, what the next layer sees
        dense = net[:5](x)
        errors = [float((m[:5](x) - dense).norm() / dense.norm()) for m in (plain, aware)]
    assert errors[1] < errors[0], errors
    before, after = (float(v) for v in record.fit.split("error ")[1].rstrip(")").split(" -> "))
    assert after < before


def test_a_leaky_relu_is_found_with_its_slope_in_torch_and_onnx():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.act = nn.LeakyReLU(0.2)

        def forward(self, x):
            x = F.leaky_relu(self.a(x), negative_slope=0.1)
            return self.c(self.act(self.b(x)))

    found = torch_downstream(Leaky(), ["a", "b", "c"])
    assert {n: d.rectifier.slope for n, d in found.items()} == {"a": 0.1, "b": 0.2}
    assert found["b"].rectifier.describe() == "LeakyReLU(0.2)"
    model = _onnx_chain()
    model.graph.node[5].CopyFrom(helper.make_node("LeakyRelu", ["ib"], ["rb"], alpha=0.25))
    found = onnx_downstream(model, {"conv_a": "ya", "conv_b": "yb"})
    assert found["conv_a"].rectifier.slope == 0.0 and found["conv_b"].rectifier.slope == 0.25


def test_the_refit_through_a_leaky_relu_lowers_the_models_error(relu_net, monkeypatch):
    """The same stack with a LeakyReLU(0.2) after the BatchNorm (as tf2onnx's speech embedding has): fitted
    through it, what the next layer sees is closer to dense than with the linear refit."""
    import copy

    from edgecompress.capture import TorchCapture
    from edgecompress.factorize import FactorizeConfig, factorize

    net, calib, x = relu_net
    net = copy.deepcopy(net)
    net[4] = nn.LeakyReLU(0.2)
    config = FactorizeConfig(method="svd", ratio=4, include=("2",))
    aware, report = factorize(net, config, calib=calib)
    (record,) = report.factorized
    assert "through its BatchNorm + LeakyReLU(0.2)" in record.fit
    monkeypatch.setattr(TorchCapture, "downstream", lambda self, name: None)
    plain, _ = factorize(net, config, calib=calib)
    with torch.no_grad():
        dense = net[:5](x)
        errors = [float((m[:5](x) - dense).norm() / dense.norm()) for m in (plain, aware)]
    assert errors[1] < errors[0], errors
