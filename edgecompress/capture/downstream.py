"""What a layer's output goes through before the next layer: whether it feeds a piecewise activation.

A layer whose output ``y`` goes on as ``act(scale * y + shift)`` (per output channel: a plain activation has
scale 1 and shift 0, an affine BatchNormalization between the two gives its own) needs its chain to match the
activated outputs, not the pre-activations: a negative pre-activation a ReLU drops can be missed by any amount.
``reconstruct.refit_last_`` fits that (Zhang, Zou, He, Sun, TPAMI 2016, "nonlinear" case). The activations
are the piecewise ones mobile nets use (``Activation``): ReLU and LeakyReLU (tf2onnx's speech embedding: 0.2),
ReLU6 and other clips (MobileNetV2), HardSigmoid and HardSwish (MobileNetV3, PaddlePaddle's PP-LCNet).

Found from the graph, never guessed: torch.fx traces a PyTorch model (a model it cannot trace gets none and
says so in the log), and an ONNX file's nodes say it directly, also where an exporter spelled HardSwish out
(PaddlePaddle: ``x * Clip(x + 3, 0, 6) / 6``; torch before opset 14: ``x * HardSigmoid(x)``). One
``Downstream`` per layer name, for both.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of an activation on ``[low, high]``: ``slope * v + offset``, or HardSwish's middle
    ``v (v + 3) / 6`` where ``quadratic``."""

    low: float
    high: float
    slope: float = 0.0
    offset: float = 0.0
    quadratic: bool = False

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return v * (v + 3) / 6 if self.quadratic else v * self.slope + self.offset


@dataclasses.dataclass(frozen=True)
class Activation:
    """A continuous piecewise activation, by its pieces in order (``relu``, ``clip``, ``hard_sigmoid``,
    ``hard_swish`` make them)."""

    name: str
    pieces: tuple[Piece, ...]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.pieces[-1](v)
        for piece in reversed(self.pieces[:-1]):
            out = torch.where(v < piece.high, piece(v), out)
        return out

    @property
    def slope(self) -> float:
        """The negative side's slope of a ReLU or LeakyReLU (0 for every other activation)."""
        return self.pieces[0].slope


INF = math.inf


def relu(slope: float = 0.0) -> Activation:
    return Activation(f"LeakyReLU({slope:g})" if slope else "ReLU", (Piece(-INF, 0.0, slope), Piece(0.0, INF, 1.0)))


def clip(low: float, high: float) -> Activation:
    name = "ReLU6" if (low, high) == (0.0, 6.0) else f"Clip({low:g}, {high:g})"
    return Activation(name, (Piece(-INF, low, 0.0, low), Piece(low, high, 1.0), Piece(high, INF, 0.0, high)))


def hard_sigmoid(alpha: float = 1 / 6, beta: float = 0.5) -> Activation:
    """``clip(alpha v + beta, 0, 1)`` (torch's alpha 1/6; ONNX's default 0.2)."""
    low, high = -beta / alpha, (1 - beta) / alpha
    return Activation("HardSigmoid", (Piece(-INF, low), Piece(low, high, alpha, beta), Piece(high, INF, 0.0, 1.0)))


def hard_swish() -> Activation:
    """``v * clip(v + 3, 0, 6) / 6``."""
    return Activation("HardSwish", (Piece(-INF, -3.0), Piece(-3.0, 3.0, quadratic=True), Piece(3.0, INF, 1.0)))


@dataclasses.dataclass
class Rectifier:
    """``activation(scale * y + shift)`` follows the layer's output ``y``; ``scale``/``shift`` are ``[O]`` or
    None (no BatchNorm between)."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    activation: Activation = dataclasses.field(default_factory=relu)

    @property
    def slope(self) -> float:
        return self.activation.slope

    def describe(self) -> str:
        return self.activation.name if self.scale is None else f"BatchNorm + {self.activation.name}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _argument(node, index: int, key: str, default):
    return node.kwargs.get(key, node.args[index] if len(node.args) > index else default)


def _leaky(slope) -> Activation | None:
    slope = _number(slope)
    return relu(slope) if slope is not None and 0 <= slope < 1 else None


def _clip(low, high) -> Activation | None:
    low, high = _number(low), _number(high)
    return clip(low, high) if low is not None and high is not None and low < high else None


_FUNCTIONS = {F.relu: relu, torch.relu: relu, torch.relu_: relu, F.relu6: lambda: clip(0.0, 6.0),
              F.hardsigmoid: hard_sigmoid, F.hardswish: hard_swish}
_LEAKY_FUNCTIONS = (F.leaky_relu, F.leaky_relu_)
_HARDTANH_FUNCTIONS = (F.hardtanh, F.hardtanh_)
_LEAKY_DEFAULT = 0.01  # torch's and ONNX's default negative slope


def _torch_activation(model: nn.Module, node) -> Activation | None:
    """The piecewise activation a torch.fx node applies, if it is one."""
    if node.op == "call_function":
        if node.target in _LEAKY_FUNCTIONS:
            return _leaky(_argument(node, 1, "negative_slope", _LEAKY_DEFAULT))
        if node.target in _HARDTANH_FUNCTIONS:
            return _clip(_argument(node, 1, "min_val", -1.0), _argument(node, 2, "max_val", 1.0))
        make = _FUNCTIONS.get(node.target)
        return make() if make is not None else None
    if node.op == "call_method":
        return relu() if node.target in ("relu", "relu_") else None
    if node.op != "call_module":
        return None
    module = model.get_submodule(node.target)
    if isinstance(module, nn.ReLU):
        return relu()
    if isinstance(module, nn.LeakyReLU):
        return _leaky(module.negative_slope)
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return _clip(module.min_val, module.max_val)
    if isinstance(module, nn.Hardsigmoid):
        return hard_sigmoid()
    if isinstance(module, nn.Hardswish):
        return hard_swish()
    return None


def _affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``scale * x + shift``."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale.float(), (bn.bias.detach() - bn.running_mean * scale).float()


@dataclasses.dataclass
class Downstream:
    """What a layer's output goes through before the next layer: an activation (``rectifier``), or nothing
    known.

    Weighing the output channels by the BatchNorm scales around the ReLU was tried and measured worse (CREPE
    full, 64 tones, 4x: svd 87.0% -> 83.75% RPA, tucker 94.75% -> 93.0%): the next layer's weights already
    make up for those scales, so they are left out."""

    rectifier: Rectifier | None = None

    def __bool__(self) -> bool:
        return self.rectifier is not None


def _walk(first_user, activation, batchnorm) -> Downstream:
    """``Downstream`` from the chain of single users after a layer: [BatchNorm] activation. ``first_user`` is
    the only user of the layer's output (or None), ``activation(node)`` the ``Activation`` a node applies or
    None, ``batchnorm(node)`` a BatchNorm's ``(scale, shift, next user)`` or None."""
    node, scale, shift = first_user, None, None
    norm = batchnorm(node) if node is not None else None
    if norm is not None:
        scale, shift, node = norm
    act = activation(node) if node is not None else None
    return Downstream(Rectifier(scale, shift, act) if act is not None else None)


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)  # at inference (a folded BatchNorm: Identity)


class _FxNode:
    def __init__(self, traced, node):
        self.traced, self.node = traced, node

    def next(self):
        users = list(self.node.users)
        while len(users) == 1 and users[0].op == "call_module" and isinstance(
                self.traced.get_submodule(users[0].target), _PASS_THROUGH):
            users = list(users[0].users)
        return _FxNode(self.traced, users[0]) if len(users) == 1 else None


def torch_downstream(model: nn.Module, names: list[str]) -> dict[str, Downstream]:
    """For the layers of ``names``, what their outputs go through (``Downstream``), from a torch.fx trace."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, custom ops: the linear fit then serves every layer
        log.info("torch.fx cannot trace %s (%s): no layer is fitted through its activation", type(model).__name__,
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}

    def batchnorm(n: _FxNode):
        if n.node.op != "call_module":
            return None
        bn = traced.get_submodule(n.node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            return None
        return (*_affine(bn), n.next())

    wanted, found = set(names), {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            down = _walk(_FxNode(traced, node).next(), lambda n: _torch_activation(traced, n.node), batchnorm)
            if down:
                found[node.target] = down
    return found


class _OnnxNode:
    def __init__(self, node, users):
        self.node, self.users = node, users

    def next(self):
        return self.users(self.node.output[0])


def _attribute(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _scalar(constants: dict[str, np.ndarray], tensor: str) -> float | None:
    value = constants.get(tensor)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _clip_bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> tuple[float | None, float | None]:
    """A Clip's (min, max): attributes before opset 11, constant inputs after; None where absent."""
    if len(node.input) <= 1:
        return _attribute(node, "min", None), _attribute(node, "max", None)

    def bound(k: int) -> float | None:
        return _scalar(constants, node.input[k]) if len(node.input) > k and node.input[k] else None

    return bound(1), bound(2)


def _onnx_activation(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> Activation | None:
    """The piecewise activation an ONNX node applies, if it is one."""
    if node.op_type == "Relu":
        return relu()
    if node.op_type == "LeakyRelu":
        return _leaky(_attribute(node, "alpha", _LEAKY_DEFAULT))
    if node.op_type == "Clip":
        low, high = _clip_bounds(node, constants)
        return relu() if low == 0 and high is None else _clip(low, high)
    if node.op_type == "HardSigmoid":
        alpha, beta = _attribute(node, "alpha", 0.2), _attribute(node, "beta", 0.5)
        return hard_sigmoid(alpha, beta) if alpha > 0 else None
    if node.op_type == "HardSwish":
        return hard_swish()
    return None


def _close(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))


def _spelled_hard_swish(graph: onnx.GraphProto, consumers: dict[str, list[onnx.NodeProto]],
                        constants: dict[str, np.ndarray]) -> dict[str, onnx.NodeProto]:
    """HardSwish as exporters spell it out, by input tensor -> a stand-in ``HardSwish`` node from that tensor to
    the spelled-out form's output: ``Mul(x, Clip(Add(x, 3), 0, 6))`` then ``Div`` by 6 or ``Mul`` by 1/6
    (PaddlePaddle), or ``Mul(x, HardSigmoid(x; 1/6, 0.5))`` (torch before opset 14). ``x`` must feed nothing
    else."""
    producers = {o: n for n in graph.node for o in n.output}

    def operand(node: onnx.NodeProto, tensor: str) -> float | None:
        """The other input of a binary node, where it is a constant scalar."""
        others = [t for t in node.input if t != tensor]
        return _scalar(constants, others[0]) if len(node.input) == 2 and len(others) == 1 else None

    def gate(x: str, tensor: str) -> tuple[onnx.NodeProto, bool] | None:
        """The node that reads ``x`` to make the gate ``tensor``, and whether the product is still to be
        divided by 6."""
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "HardSigmoid" and node.input[0] == x:
            usual = _close(_attribute(node, "alpha", 0.2), 1 / 6) and _close(_attribute(node, "beta", 0.5), 0.5)
            return (node, False) if usual else None
        if node.op_type == "Clip" and _clip_bounds(node, constants) == (0.0, 6.0):
            add = producers.get(node.input[0])
            if add is not None and add.op_type == "Add" and x in add.input and _close(operand(add, x), 3.0):
                return add, True
        return None

    def divided(tensor: str) -> str | None:
        """The output of the only user of ``tensor`` where it divides by 6 (or multiplies by 1/6)."""
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return None
        node = users[0]
        by_six = (node.op_type == "Div" and node.input[0] == tensor and _close(_scalar(constants, node.input[1]), 6.0)
                  or node.op_type == "Mul" and _close(operand(node, tensor), 1 / 6))
        return node.output[0] if by_six else None

    found = {}
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for x, tensor in (mul.input, mul.input[::-1]):
            made = gate(x, tensor)
            if made is None or {id(n) for n in consumers.get(x, [])} != {id(mul), id(made[0])}:
                continue
            output = divided(mul.output[0]) if made[1] else mul.output[0]
            if output is not None:
                found[x] = onnx.helper.make_node("HardSwish", [x], [output])
                break
    return found


def onnx_downstream(model: onnx.ModelProto, outputs: dict[str, str]) -> dict[str, Downstream]:
    """For the layers (name -> output tensor), what their outputs go through (``Downstream``): the nodes say."""
    from edgecompress.graph.read import constants as tensors  # here: graph imports capture

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    constants = {name: numpy_helper.to_array(t) for name, t in tensors(model).items()}
    spelled = _spelled_hard_swish(model.graph, consumers, constants)

    def only_user(tensor: str) -> _OnnxNode | None:
        users = consumers.get(tensor, [])
        while len(users) == 1 and users[0].op_type in ("Identity", "Dropout") and tensor not in graph_outputs:
            tensor = users[0].output[0]
            users = consumers.get(tensor, [])
        if tensor in spelled and tensor not in graph_outputs:
            return _OnnxNode(spelled[tensor], only_user)
        return _OnnxNode(users[0], only_user) if len(users) == 1 and tensor not in graph_outputs else None

    def batchnorm(n: _OnnxNode):
        node = n.node
        if node.op_type != "BatchNormalization" or not all(t in constants for t in node.input[1:5]):
            return None
        gamma, beta, mean, var = (constants[t].astype(np.float64) for t in node.input[1:5])
        eps = _attribute(node, "epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        return torch.from_numpy(scale).float(), torch.from_numpy(beta - mean * scale).float(), n.next()

    found = {}
    for name, tensor in outputs.items():
        down = _walk(only_user(tensor), lambda n: _onnx_activation(n.node, constants), batchnorm)
        if down:
            found[name] = down
    return found
