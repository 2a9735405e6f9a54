"""What a layer's output goes through before the next layer: whether it feeds a ReLU (or a LeakyReLU).

A layer whose output ``y`` goes on as ``relu(scale * y + shift)`` (per output channel: a plain ReLU has
scale 1 and shift 0, an affine BatchNormalization between the two gives its own) needs its chain to match
the rectified outputs, not the pre-activations: a negative pre-activation the ReLU drops can be missed by
any amount. A LeakyReLU keeps ``slope`` of it (tf2onnx's speech embedding: 0.2) and is fitted the same way.
``reconstruct.refit_last_`` fits that (Zhang, Zou, He, Sun, TPAMI 2016, "nonlinear" case).

Found from the graph, never guessed: torch.fx traces a PyTorch model (a model it cannot trace gets none and
says so in the log), and an ONNX file's nodes say it directly. One ``Downstream`` per layer name, for both.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Rectifier:
    """``relu(scale * y + shift)`` follows the layer's output ``y``; ``scale``/``shift`` are ``[O]`` or None;
    ``slope`` is a LeakyReLU's on the negative side (0 for a ReLU)."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    slope: float = 0.0

    def describe(self) -> str:
        relu = f"LeakyReLU({self.slope:g})" if self.slope else "ReLU"
        return relu if self.scale is None else f"BatchNorm + {relu}"


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_LEAKY_FUNCTIONS = (F.leaky_relu, F.leaky_relu_)
_LEAKY_DEFAULT = 0.01  # torch's and ONNX's default negative slope


def _relu_slope(model: nn.Module, node) -> float | None:
    """0 for a ReLU, its negative slope for a LeakyReLU (below 1), else None."""
    slope = None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return 0.0
        if node.target in _LEAKY_FUNCTIONS:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else _LEAKY_DEFAULT)
    elif node.op == "call_method":
        return 0.0 if node.target in ("relu", "relu_") else None
    elif node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, nn.ReLU):
            return 0.0
        if isinstance(module, nn.LeakyReLU):
            slope = module.negative_slope
    return float(slope) if isinstance(slope, (int, float)) and 0 <= slope < 1 else None


def _affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``scale * x + shift``."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale.float(), (bn.bias.detach() - bn.running_mean * scale).float()


@dataclasses.dataclass
class Downstream:
    """What a layer's output goes through before the next layer: a ReLU (``rectifier``), or nothing known.

    Weighing the output channels by the BatchNorm scales around the ReLU was tried and measured worse (CREPE
    full, 64 tones, 4x: svd 87.0% -> 83.75% RPA, tucker 94.75% -> 93.0%): the next layer's weights already
    make up for those scales, so they are left out."""

    rectifier: Rectifier | None = None

    def __bool__(self) -> bool:
        return self.rectifier is not None


def _walk(first_user, relu_slope, batchnorm) -> Downstream:
    """``Downstream`` from the chain of single users after a layer: [BatchNorm] ReLU or LeakyReLU.
    ``first_user`` is the only user of the layer's output (or None), ``relu_slope(node)`` 0 for a ReLU, the
    slope for a LeakyReLU, else None, ``batchnorm(node)`` a BatchNorm's ``(scale, shift, next user)`` or None."""
    node, scale, shift = first_user, None, None
    norm = batchnorm(node) if node is not None else None
    if norm is not None:
        scale, shift, node = norm
    slope = relu_slope(node) if node is not None else None
    return Downstream(Rectifier(scale, shift, slope) if slope is not None else None)


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
        log.info("torch.fx cannot trace %s (%s): no layer is fitted through its ReLU", type(model).__name__,
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
            down = _walk(_FxNode(traced, node).next(), lambda n: _relu_slope(traced, n.node), batchnorm)
            if down:
                found[node.target] = down
    return found


class _OnnxNode:
    def __init__(self, node, users):
        self.node, self.users = node, users

    def next(self):
        return self.users(self.node.output[0])


def onnx_downstream(model: onnx.ModelProto, outputs: dict[str, str]) -> dict[str, Downstream]:
    """For the layers (name -> output tensor), what their outputs go through (``Downstream``): the nodes say."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    constants = {t.name: t for t in model.graph.initializer}

    def only_user(tensor: str) -> _OnnxNode | None:
        users = consumers.get(tensor, [])
        while len(users) == 1 and users[0].op_type in ("Identity", "Dropout") and tensor not in graph_outputs:
            tensor = users[0].output[0]
            users = consumers.get(tensor, [])
        return _OnnxNode(users[0], only_user) if len(users) == 1 and tensor not in graph_outputs else None

    def batchnorm(n: _OnnxNode):
        node = n.node
        if node.op_type != "BatchNormalization" or not all(t in constants for t in node.input[1:5]):
            return None
        gamma, beta, mean, var = (numpy_helper.to_array(constants[t]).astype(np.float64) for t in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        return torch.from_numpy(scale).float(), torch.from_numpy(beta - mean * scale).float(), n.next()

    def relu_slope(n: _OnnxNode) -> float | None:
        if n.node.op_type == "Relu":
            return 0.0
        if n.node.op_type == "LeakyRelu":
            alpha = next((a.f for a in n.node.attribute if a.name == "alpha"), _LEAKY_DEFAULT)
            return float(alpha) if 0 <= alpha < 1 else None
        return None

    found = {}
    for name, tensor in outputs.items():
        down = _walk(only_user(tensor), relu_slope, batchnorm)
        if down:
            found[name] = down
    return found
