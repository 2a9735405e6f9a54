"""What a layer's output goes through before the next layer: whether it feeds an activation.

A layer whose output ``y`` goes on as ``act(scale * y + shift)`` (per output channel: a plain activation has
scale 1 and shift 0, an affine BatchNormalization between the two gives its own, a bias added after the layer
a shift) needs its chain to match the activated outputs, not the pre-activations: a negative pre-activation a
ReLU drops can be missed by any amount. ``reconstruct.refit_last_`` fits that (Zhang, Zou, He, Sun, TPAMI
2016, "nonlinear" case). The activations (``Activation``) are the piecewise ones mobile nets use: ReLU and
LeakyReLU (tf2onnx's speech embedding: 0.2), ReLU6 and other clips (MobileNetV2), HardSigmoid and HardSwish
(MobileNetV3, PaddlePaddle's PP-LCNet); and the smooth ones: GELU (Transformers, Magika), SiLU (EfficientNet,
YOLO), Mish.

Found from the graph, never guessed: torch.fx traces a PyTorch model (a model it cannot trace gets none and
says so in the log). In an ONNX file the element-wise nodes after a layer are run on a grid of values and
named by what they compute, however an exporter spelled the activation (PaddlePaddle's HardSwish
``x * Clip(x + 3, 0, 6) / 6``, torch's ``x * HardSigmoid(x)`` before opset 14, GELU through ``Erf``, SiLU
as ``x * Sigmoid(x)``). One ``Downstream`` per layer name, for both.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable

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
    """An activation: continuous piecewise, by its pieces in order (``relu``, ``clip``, ``hard_sigmoid``,
    ``hard_swish`` make them), or ``smooth``, a torch function of one tensor (``gelu``, ``silu``, ``mish``): the
    refit measures through those but does not fit through them (``reconstruct.fits_through``)."""

    name: str
    pieces: tuple[Piece, ...] = ()
    smooth: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            return self.smooth(v)
        out = self.pieces[-1](v)
        for piece in reversed(self.pieces[:-1]):
            out = torch.where(v < piece.high, piece(v), out)
        return out

    @property
    def slope(self) -> float:
        """The negative side's slope of a ReLU or LeakyReLU (0 for every other activation)."""
        return self.pieces[0].slope if self.pieces else 0.0


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


def gelu(approximate: str = "none") -> Activation:
    """``v * Phi(v)`` (Transformers, Magika), or its tanh approximation."""
    name = "GELU" if approximate == "none" else "GELU(tanh)"
    return Activation(name, smooth=functools.partial(F.gelu, approximate=approximate))


def silu() -> Activation:
    """``v * sigmoid(v)`` (Swish: EfficientNet, YOLOv5 and later)."""
    return Activation("SiLU", smooth=F.silu)


def mish() -> Activation:
    """``v * tanh(softplus(v))`` (YOLOv4)."""
    return Activation("Mish", smooth=F.mish)


@dataclasses.dataclass
class Rectifier:
    """``activation(scale * y + shift)`` follows the layer's output ``y``; ``scale``/``shift`` are ``[O]`` or
    None (no BatchNorm between; a shift alone: a bias added after the layer)."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    activation: Activation = dataclasses.field(default_factory=relu)

    @property
    def slope(self) -> float:
        return self.activation.slope

    def describe(self) -> str:
        between = "BatchNorm + " if self.scale is not None else "bias + " if self.shift is not None else ""
        return between + self.activation.name


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _argument(node, index: int, key: str, default):
    return node.kwargs.get(key, node.args[index] if len(node.args) > index else default)


def _leaky(slope) -> Activation | None:
    slope = _number(slope)
    return relu(slope) if slope is not None and 0 <= slope < 1 else None


def _gelu(approximate) -> Activation | None:
    return gelu(approximate) if approximate in ("none", "tanh") else None


def _clip(low, high) -> Activation | None:
    low, high = _number(low), _number(high)
    return clip(low, high) if low is not None and high is not None and low < high else None


_FUNCTIONS = {F.relu: relu, torch.relu: relu, torch.relu_: relu, F.relu6: lambda: clip(0.0, 6.0),
              F.hardsigmoid: hard_sigmoid, F.hardswish: hard_swish, F.silu: silu, F.mish: mish}
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
        if node.target is F.gelu:
            return _gelu(node.kwargs.get("approximate", "none"))
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
    if isinstance(module, nn.GELU):
        return _gelu(module.approximate)
    if isinstance(module, nn.SiLU):
        return silu()
    if isinstance(module, nn.Mish):
        return mish()
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


def _scalar(constants: dict[str, np.ndarray], tensor: str) -> bool:
    return tensor in constants and constants[tensor].size == 1


# the element-wise ops exporters spell activations with; a region of them after a layer, fed by its output and
# scalar constants alone, is run on ``_GRID`` (onnx's reference evaluator) and named by what it computes
_ELEMENTWISE = frozenset({"Abs", "Add", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
                          "Identity", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow", "Reciprocal",
                          "Relu", "Sigmoid", "Softplus", "Sqrt", "Sub", "Tanh"})
_REGION = 12  # nodes at most: GELU spelled with its tanh takes 8
_GRID = np.concatenate([np.linspace(-12, 12, 2401), [-40.0, 40.0]])  # a Clip's bounds from the ends
_TOLERANCE = 1e-5  # relative, on float32 values: GELU and its tanh approximation differ by up to 5e-4


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _named(values: np.ndarray) -> Activation | None:
    """The known activation whose values on ``_GRID`` are ``values``, if any (its parameters read from them)."""
    at = dict(zip(_GRID.tolist(), values.astype(np.float64).tolist()))
    candidates = [_leaky(_round(-at[-1.0])), _clip(_round(at[-40.0]), _round(at[40.0])), hard_swish(), gelu(),
                  gelu("tanh"), silu(), mish()]
    alpha, beta = _round(at[0.5] - at[-0.5]), _round(at[0.0])
    if alpha > 0:
        candidates.insert(2, hard_sigmoid(alpha, beta))
    grid = torch.from_numpy(_GRID)
    for act in filter(None, candidates):
        expected = act(grid).numpy()
        if np.all(np.abs(values - expected) <= _TOLERANCE * np.maximum(1.0, np.abs(expected))):
            return act
    return None


def _run_region(nodes: list[onnx.NodeProto], x: str, out: str, constants: dict[str, np.ndarray],
                opsets) -> np.ndarray | None:
    """``nodes``' output ``out`` with ``x`` on ``_GRID`` (in the constants' float type), or None where they do
    not run."""
    from onnx.reference import ReferenceEvaluator

    made = {o for n in nodes for o in n.output}
    used = sorted({t for n in nodes for t in n.input if t and t != x and t not in made})
    floats = [constants[t].dtype for t in used if constants[t].dtype.kind == "f"]
    dtype = floats[0] if floats else np.dtype(np.float32)
    kind = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    graph = onnx.helper.make_graph(nodes, "activation", [onnx.helper.make_tensor_value_info(x, kind, [len(_GRID)])],
                                   [onnx.helper.make_tensor_value_info(out, kind, None)],
                                   [numpy_helper.from_array(constants[t], t) for t in used])
    try:
        with np.errstate(all="ignore"):  # the reference Sigmoid's exp overflows at -40 in float32, harmlessly
            values = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets)).run(
                None, {x: _GRID.astype(dtype)})[0]
    except Exception as exc:  # an op the reference evaluator lacks at this opset: no activation known
        log.debug("the element-wise nodes after %s do not run alone (%s)", x, exc)
        return None
    return np.asarray(values, np.float64) if np.shape(values) == _GRID.shape else None


def _activation_after(x: str, graph: onnx.GraphProto, consumers: dict[str, list[onnx.NodeProto]],
                      constants: dict[str, np.ndarray], ends: set[str], opsets) -> Activation | None:
    """The activation that the element-wise nodes after ``x`` compute of it (with scalar constants), however an
    exporter spelled it (``HardSwish``, or ``x * Clip(x + 3, 0, 6) / 6``; ``Gelu``, or ``x * 0.5 * (1 +
    Erf(x / sqrt 2))``; ``x * Sigmoid(x)``): the first tensor of them that all of them before it feed alone,
    and that a known activation computes. ``ends``: the graph outputs, which nothing may read but their own."""
    known, region = {x}, []
    for node in graph.node:  # in topological order
        if len(region) == _REGION:
            break
        if (node.op_type in _ELEMENTWISE and any(t in known for t in node.input)
                and all(not t or t in known or _scalar(constants, t) for t in node.input)):
            region.append(node)
            known.update(node.output)
    for k, node in enumerate(region):
        out = node.output[0]
        needed, wanted = [], {out}
        for n in reversed(region[:k + 1]):  # the nodes ``out`` is made of
            if wanted & set(n.output):
                needed.insert(0, n)
                wanted.update(n.input)
        inside = {id(n) for n in needed}
        inner = ({x} | {o for n in needed for o in n.output}) - {out}
        if any(t in ends or any(id(u) not in inside for u in consumers.get(t, [])) for t in inner):
            continue
        values = _run_region(needed, x, out, constants, opsets)
        if values is not None and (act := _named(values)) is not None:
            return act
    return None


def onnx_downstream(model: onnx.ModelProto, outputs: dict[str, str],
                    shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Downstream]:
    """For the layers (name -> output tensor), what their outputs go through (``Downstream``): the nodes say.
    Between the layer and its activation: Identity, Dropout, a Reshape that keeps each value's channel (from
    ``shapes``), a BatchNormalization, and an Add of a constant channel vector (Tensordot's bias, after its
    Reshape)."""
    from edgecompress.graph.read import constants as tensors  # here: graph imports capture

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    producers = {o: n for n in model.graph.node for o in n.output}
    ends = {o.name for o in model.graph.output}
    constants = {name: numpy_helper.to_array(t) for name, t in tensors(model).items()}
    shapes = shapes or {}

    def single(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in ends else None

    def channel_axis(tensor: str) -> int:
        node = producers.get(tensor)
        while node is not None and node.op_type == "Add":  # a MatMul's bias
            node = next((producers[t] for t in node.input if t in producers), None)
        return 1 if node is not None and node.op_type in ("Conv", "ConvTranspose") else -1

    def keeps_channels(a: str, b: str, axis: int) -> bool:
        sa, sb = shapes.get(a), shapes.get(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return False
        return sa[-1] == sb[-1] if axis == -1 else tuple(sa[:2]) == tuple(sb[:2])

    def channel_vector(node: onnx.NodeProto, tensor: str, axis: int) -> np.ndarray | None:
        """The constant an Add adds to ``tensor``, where it is one value per channel."""
        other = [t for t in node.input if t != tensor]
        shape = shapes.get(tensor)
        if len(node.input) != 2 or len(other) != 1 or other[0] not in constants or shape is None:
            return None
        value = constants[other[0]]
        padded = (1,) * (len(shape) - value.ndim) + value.shape
        channel = len(shape) + axis if axis < 0 else axis
        ones = all(d == 1 for k, d in enumerate(padded) if k != channel)
        return value.reshape(-1).astype(np.float64) if len(padded) == len(shape) and ones and \
            padded[channel] == shape[channel] else None

    def batchnorm(node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        if node.op_type != "BatchNormalization" or not all(t in constants for t in node.input[1:5]):
            return None
        gamma, beta, mean, var = (constants[t].astype(np.float64) for t in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        return scale, beta - mean * scale

    found = {}
    for name, tensor in outputs.items():
        if tensor in ends:
            continue
        axis, scale, shift = channel_axis(tensor), None, None
        for _ in range(6):  # the nodes between the layer and its activation
            node = single(tensor)
            if node is None:
                break
            if node.op_type in ("Identity", "Dropout") or node.op_type == "Reshape" and keeps_channels(
                    tensor, node.output[0], axis):
                tensor = node.output[0]
            elif (norm := batchnorm(node)) is not None:
                s, b = norm
                scale = s if scale is None else scale * s
                shift = b if shift is None else shift * s + b
                tensor = node.output[0]
            elif node.op_type == "Add" and (bias := channel_vector(node, tensor, axis)) is not None:
                shift = bias if shift is None else shift + bias
                tensor = node.output[0]
            else:
                break
        act = _activation_after(tensor, model.graph, consumers, constants, ends, model.opset_import)
        if act is not None:
            as_torch = (lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float64)).float())
            found[name] = Downstream(Rectifier(as_torch(scale), as_torch(shift), act))
    return found
