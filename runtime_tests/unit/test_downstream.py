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


@pytest.mark.parametrize("activation, name", [(nn.LeakyReLU(0.2), "LeakyReLU(0.2)"), (nn.Hardswish(), "HardSwish")])
def test_the_refit_through_a_leaky_relu_or_a_hard_swish_lowers_the_models_error(relu_net, monkeypatch, activation,
                                                                                   name):
    """The same stack with a LeakyReLU(0.2) (tf2onnx's speech embedding) or a HardSwish (MobileNetV3,
    PP-LCNet) after the BatchNorm: fitted through it, what the next layer sees is closer to dense than with the
    linear refit."""
    import copy

    from edgecompress.capture import TorchCapture
    from edgecompress.factorize import FactorizeConfig, factorize

    net, calib, x = relu_net
    net = copy.deepcopy(net)
    net[4] = activation
    config = FactorizeConfig(method="svd", ratio=4, include=("2",))
    aware, report = factorize(net, config, calib=calib)
    (record,) = report.factorized
    assert f"through its BatchNorm + {name}" in record.fit
    monkeypatch.setattr(TorchCapture, "downstream", lambda self, name: None)
    plain, _ = factorize(net, config, calib=calib)
    with torch.no_grad():
        dense = net[:5](x)
        errors = [float((m[:5](x) - dense).norm() / dense.norm()) for m in (plain, aware)]
    assert errors[1] < errors[0], errors


def test_the_piecewise_activations_of_mobile_nets_are_found_in_torch():
    class Mobile(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e, self.f, self.g = (nn.Linear(4, 4) for _ in range(7))
            self.six, self.swish, self.gate = nn.ReLU6(), nn.Hardswish(), nn.Hardsigmoid()

        def forward(self, x):
            x = self.six(self.a(x))
            x = self.swish(self.b(x)) + self.gate(self.c(x))
            x = F.hardswish(self.d(x)) + F.relu6(self.e(x))
            return F.hardtanh(self.f(x), -2.0, 2.0) * self.g(x)  # g feeds a Mul: nothing

    found = torch_downstream(Mobile(), list("abcdefg"))
    assert {n: d.rectifier.describe() for n, d in found.items()} == {
        "a": "ReLU6", "b": "HardSwish", "c": "HardSigmoid", "d": "HardSwish", "e": "ReLU6", "f": "Clip(-2, 2)"}


def _spelled_out() -> onnx.ModelProto:
    """Four 1x1 convs: a HardSwish as PaddlePaddle writes it (``x * Clip(x + 3, 0, 6) / 6``, its constants
    in Constant nodes), as torch did before opset 14 (``x * HardSigmoid(x)``), a Clip(0, 6) with initializer
    bounds, and the Paddle form whose ``x`` also feeds an Add: that one is no HardSwish of ``x`` alone."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{k}") for k in range(4)]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0.0), ("six", 6.0))]

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))

    def paddle(x, tag):
        return [const(f"three{tag}", 3.0), const(f"lo{tag}", 0.0), const(f"hi{tag}", 6.0), const(f"sixth{tag}", 6.0),
                helper.make_node("Add", [x, f"three{tag}"], [f"p{tag}"]),
                helper.make_node("Clip", [f"p{tag}", f"lo{tag}", f"hi{tag}"], [f"c{tag}"]),
                helper.make_node("Mul", [x, f"c{tag}"], [f"m{tag}"]),
                helper.make_node("Div", [f"m{tag}", f"sixth{tag}"], [f"h{tag}"])]

    nodes = [helper.make_node("Conv", ["x", "w0"], ["y0"], name="paddle"), *paddle("y0", "a"),
             helper.make_node("Conv", ["ha", "w1"], ["y1"], name="torch"),
             helper.make_node("HardSigmoid", ["y1"], ["g1"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["g1", "y1"], ["h1"]),
             helper.make_node("Conv", ["h1", "w2"], ["y2"], name="clip"),
             helper.make_node("Clip", ["y2", "zero", "six"], ["h2"]),
             helper.make_node("Conv", ["h2", "w3"], ["y3"], name="shared"), *paddle("y3", "b"),
             helper.make_node("Add", ["hb", "y3"], ["out"])]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [info("out", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_hard_swish_spelled_out_by_an_exporter_is_found_in_onnx():
    import onnxruntime as ort

    model = _spelled_out()
    onnx.checker.check_model(model)
    found = onnx_downstream(model, {"paddle": "y0", "torch": "y1", "clip": "y2", "shared": "y3"})
    assert {n: d.rectifier.describe() for n, d in found.items()} == {
        "paddle": "HardSwish", "torch": "HardSwish", "clip": "ReLU6"}
    # the stand-in applies what the spelled-out nodes compute
    extra = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("y0", "ha", "y1", "h1")]
    model.graph.output.extend(extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 4, 2, 2)).astype(np.float32) * 4
    y0, ha, y1, h1 = session.run(["y0", "ha", "y1", "h1"], {"x": x})
    for pre, post, name in ((y0, ha, "paddle"), (y1, h1, "torch")):
        act = found[name].rectifier.activation
        np.testing.assert_allclose(act(torch.from_numpy(pre)).numpy(), post, rtol=1e-5, atol=1e-6)


def test_the_z_step_is_each_values_least_cost():
    """For every activation, the z-step's value costs no more than the best of a fine grid."""
    from edgecompress.capture.downstream import clip, hard_sigmoid, hard_swish, relu
    from edgecompress.factorize.reconstruct import z_step

    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    for act in (relu(), relu(0.2), clip(0.0, 6.0), hard_sigmoid(), hard_sigmoid(0.2, 0.5), hard_swish()):
        values = act(grid)
        for lam in (0.03, 1.0):
            pre = torch.randn(300, generator=gen, dtype=torch.float64) * 3
            target, u = act(pre), pre + torch.randn(300, generator=gen, dtype=torch.float64) * 2
            z = z_step(act, target, u, lam)
            cost = (target - act(z)).pow(2) + lam * (z - u).pow(2)
            best = ((target[:, None] - values).pow(2) + lam * (grid - u[:, None]).pow(2)).min(1).values
            assert bool((cost <= best + 1e-9).all()), (act.name, lam, float((cost - best).max()))


def test_a_layer_feeding_a_gelu_is_measured_through_it_and_fitted_linearly(relu_net):
    """The stack with a GELU after the BatchNorm: the record tells the error after the GELU, what the next
    layer sees, and the last step is refit linearly."""
    import copy

    from edgecompress.factorize import FactorizeConfig, factorize

    net, calib, x = relu_net
    net = copy.deepcopy(net)
    net[4] = nn.GELU()
    aware, report = factorize(net, FactorizeConfig(method="svd", ratio=4, include=("2",)), calib=calib)
    (record,) = report.factorized
    assert "last step refit (shrinkage" in record.fit and "GELU" not in record.fit
    with torch.no_grad():
        dense = net[:5](x)
        seen = float((aware[:5](x) - dense).norm() / dense.norm())
    assert record.output_error_after_activation is not None
    assert 0.3 * seen < record.output_error_after_activation < 3 * seen  # the held-out samples are other ones


def test_the_smooth_activations_are_found_in_torch():
    class Smooth(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (nn.Linear(4, 4) for _ in range(5))
            self.gelu, self.silu, self.mish = nn.GELU(), nn.SiLU(), nn.Mish()

        def forward(self, x):
            x = self.gelu(self.a(x)) + F.gelu(self.b(x), approximate="tanh")
            return self.silu(self.c(x)) + F.silu(self.d(x)) + self.mish(self.e(x))

    found = torch_downstream(Smooth(), list("abcde"))
    assert {n: d.rectifier.describe() for n, d in found.items()} == {
        "a": "GELU", "b": "GELU(tanh)", "c": "SiLU", "d": "SiLU", "e": "Mish"}


def _smooth_spelled() -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """Five layers, each feeding a smooth activation as an exporter writes it: torch's GELU before opset 20
    (``x * 0.5 * (1 + Erf(x / sqrt 2))``, as Div/Erf/Add/Mul/Mul), tf2onnx's (Magika: ``0.5 * x`` times
    ``1 + Erf(x * (1 / sqrt 2))``, after a Tensordot's Reshape and bias Add), the ``Gelu`` op, SiLU
    (``x * Sigmoid(x)``), and a SiLU whose ``x`` also feeds the graph's last Add: that one is nothing. Returns
    the model and, per layer, (its output, the activation's output)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{k}") for k in range(4)]
    inits += [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "wm"),
              numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias"),
              numpy_helper.from_array(np.array([1, 2, 2, 4], np.int64), "back"),
              numpy_helper.from_array(np.array([4, 4], np.int64), "rows")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", 0.5), ("rsqrt2", 2 ** -0.5))]
    node = helper.make_node
    nodes = [node("Conv", ["x", "w0"], ["y0"], name="torch"),
             node("Div", ["y0", "sqrt2"], ["d0"]), node("Erf", ["d0"], ["e0"]), node("Add", ["e0", "one"], ["a0"]),
             node("Mul", ["y0", "a0"], ["m0"]), node("Mul", ["m0", "half"], ["g0"]),
             # tf2onnx: NCHW -> rows of 4 channels (a Tensordot), the bias after the Reshape back
             node("Transpose", ["g0"], ["t1"], perm=[0, 2, 3, 1]), node("Reshape", ["t1", "rows"], ["r1"]),
             node("MatMul", ["r1", "wm"], ["y1"], name="tensordot"), node("Reshape", ["y1", "back"], ["s1"]),
             node("Add", ["s1", "bias"], ["b1"]),
             node("Mul", ["half", "b1"], ["h1"]), node("Mul", ["b1", "rsqrt2"], ["d1"]), node("Erf", ["d1"], ["e1"]),
             node("Add", ["one", "e1"], ["a1"]), node("Mul", ["h1", "a1"], ["g1"]),
             node("Transpose", ["g1"], ["q1"], perm=[0, 3, 1, 2]),
             node("Conv", ["q1", "w1"], ["y2"], name="gelu_op"), node("Gelu", ["y2"], ["g2"]),
             node("Conv", ["g2", "w2"], ["y3"], name="silu"), node("Sigmoid", ["y3"], ["s3"]),
             node("Mul", ["y3", "s3"], ["g3"]),
             node("Conv", ["g3", "w3"], ["y4"], name="shared"), node("Sigmoid", ["y4"], ["s4"]),
             node("Mul", ["s4", "y4"], ["g4"]), node("Add", ["g4", "y4"], ["out"])]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [info("out", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return model, {"torch": ("y0", "g0"), "tensordot": ("y1", "g1"), "gelu_op": ("y2", "g2"), "silu": ("y3", "g3"),
                   "shared": ("y4", "g4")}


def test_a_smooth_activation_however_spelled_is_found_in_onnx_with_the_bias_before_it():
    import onnxruntime as ort

    from edgecompress.graph import shapes as graph_shapes

    model, tensors = _smooth_spelled()
    onnx.checker.check_model(model)
    found = onnx_downstream(model, {n: t[0] for n, t in tensors.items()}, graph_shapes.infer(model))
    assert {n: d.rectifier.describe() for n, d in found.items()} == {
        "torch": "GELU", "tensordot": "bias + GELU", "gelu_op": "GELU", "silu": "SiLU"}
    # without shapes, the Reshape between the MatMul and its bias is not known to keep the channels
    assert "tensordot" not in onnx_downstream(model, {"tensordot": "y1"})
    # the activation with its bias computes what the nodes do
    names = [t for pair in tensors.values() for t in pair]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 4, 2, 2)).astype(np.float32) * 3
    values = dict(zip(names, session.run(names, {"x": x})))
    for name, down in found.items():
        pre, post = tensors[name]
        shift = 0.0 if down.rectifier.shift is None else down.rectifier.shift.numpy()
        got = down.rectifier.activation(torch.from_numpy(values[pre] + shift)).numpy()
        np.testing.assert_allclose(got.reshape(values[post].shape), values[post], rtol=1e-5, atol=1e-5)
