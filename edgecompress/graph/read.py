"""Reading an ONNX graph's weight layers: each Conv, Gemm, MatMul or Gather node with constant weights becomes
the torch layer it computes (Conv1d/Conv2d from its attributes, Linear from its weight, Embedding from a
Gather's table), placed in a stand-in module tree named after the nodes (``features.4/Conv`` -> layer
``features.4``), so that ``factorize_`` runs on it as on a PyTorch model. A MatMul whose bias is added by the
next node (torch.onnx writes ``MatMul`` + ``Add`` for a Linear on 3-D input) is read as one Linear with bias.
The graph is read after ``normalize``: its weights are initializers and BatchNormalization is folded.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensor name -> value for initializers, Constant nodes and Identity nodes of those (torch.onnx
    writes a repeated constant once and feeds the other uses through Identity nodes)."""
    constants = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a layer sits in the graph: its weight node, and the Add of its bias when that is a node of its own."""

    node: onnx.NodeProto
    bias_add: onnx.NodeProto | None = None

    @property
    def input(self) -> str:
        return activation(self.node)

    @property
    def output(self) -> str:
        return (self.bias_add or self.node).output[0]

    @property
    def nodes(self) -> tuple[onnx.NodeProto, ...]:
        return (self.node,) if self.bias_add is None else (self.node, self.bias_add)


def read_layers(model: onnx.ModelProto) -> tuple[nn.Module, dict[str, Site], list[tuple[str, str]]]:
    """The stand-in module tree of ``model``'s weight layers, where each sits, and the weight nodes that could
    not be read, with the reason (they stay as they are)."""
    weights, root, sites, unread = constants(model), nn.Module(), {}, []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        bias_add = _bias_add(node, weights, consumers, outputs)
        layer = as_layer(node, weights, None if bias_add is None else _bias_of(bias_add, node, weights))
        if layer is not None:
            sites[place(root, layer_name(node), layer)] = Site(node, bias_add)
        elif node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in weights:
            unread.append((node.name or node.output[0], _why_unread(node, weights)))
    return root, sites, unread


def _bias_add(node, weights, consumers, outputs) -> onnx.NodeProto | None:
    """The Add that adds a constant vector to a MatMul's output, when it is that output's only use."""
    if node.op_type != "MatMul" or node.input[1] not in weights or node.output[0] in outputs:
        return None
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    return users[0] if _bias_of(users[0], node, weights) is not None else None


def _bias_of(add: onnx.NodeProto, node: onnx.NodeProto, weights: dict) -> np.ndarray | None:
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    bias = _array(weights, other)
    width = weights[node.input[1]].dims[-1]
    if bias is None or bias.size != width or bias.shape[-1] != width:
        return None
    return bias.reshape(-1)


def _why_unread(node: onnx.NodeProto, weights: dict) -> str:
    a = _attrs(node)
    if weights[node.input[1]].data_type != onnx.TensorProto.FLOAT:
        return "its weight is not float32"
    if node.op_type == "Conv":
        dims = len(weights[node.input[1]].dims) - 2
        pads = list(a.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:]:
            return f"asymmetric padding {pads}"
        return "a Conv that is not 1-D or 2-D" if dims not in (1, 2) else "a computed bias"
    if node.op_type == "Gemm" and a.get("transA", 0):
        return "Gemm with transA"
    return "its bias is not a constant vector" if len(node.input) > 2 else "its weight is not a matrix"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _array(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]).astype(np.float32) if name in inits else None


def activation(node: onnx.NodeProto) -> str:
    """The node's activation input: a Gather reads its indices (input 1) from a constant table (input 0)."""
    return node.input[1] if node.op_type == "Gather" else node.input[0]


def as_layer(node: onnx.NodeProto, inits: dict, added_bias: np.ndarray | None = None) -> nn.Module | None:
    """The torch layer ``node`` computes (with ``added_bias``: a MatMul and the Add after it), or None when it
    is not a weight layer this can rebuild."""
    if node.op_type == "Gather":
        return _embedding(node, inits)
    if len(node.input) < 2 or node.input[1] not in inits or inits[node.input[1]].data_type != onnx.TensorProto.FLOAT:
        return None
    weight = _array(inits, node.input[1])
    bias = _array(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        return None  # a computed bias
    a = _attrs(node)
    if node.op_type == "Conv" and weight.ndim in (3, 4):
        return _conv(weight, bias, a)
    if node.op_type == "Gemm" and weight.ndim == 2 and not a.get("transA", 0):
        weight = (weight if a.get("transB", 0) else weight.T) * a.get("alpha", 1.0)
        if bias is not None and bias.size == weight.shape[0] and bias.ndim == 2 and bias.shape[0] == 1:
            bias = bias.reshape(-1)  # (1, N) broadcasts like (N,)
        if bias is not None and (bias.ndim != 1 or bias.shape[0] != weight.shape[0]):
            return None  # a bias broadcast over rows: not a Linear's
        return _linear(weight, None if bias is None else bias * a.get("beta", 1.0))
    if node.op_type == "MatMul" and weight.ndim == 2:
        return _linear(weight.T, added_bias)
    return None


def _embedding(node: onnx.NodeProto, inits: dict) -> nn.Module | None:
    """A Gather along axis 0 of a constant 2-D float table by computed indices: an Embedding."""
    table, indices = node.input[0], node.input[1]
    if table not in inits or indices in inits or inits[table].data_type != onnx.TensorProto.FLOAT:
        return None
    weight = _array(inits, table)
    if weight.ndim != 2 or _attrs(node).get("axis", 0) != 0:
        return None
    layer = nn.Embedding(*weight.shape)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    return layer.eval()


def _conv(weight: np.ndarray, bias: np.ndarray | None, a: dict) -> nn.Module | None:
    dims = weight.ndim - 2
    pads = list(a.get("pads", [0] * 2 * dims))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:dims] != pads[dims:]:
        return None  # asymmetric or automatic padding: no torch Conv padding equals it
    groups = int(a.get("group", 1))
    cls = nn.Conv2d if dims == 2 else nn.Conv1d
    layer = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=tuple(a.get("strides", [1] * dims)),
                padding=tuple(pads[:dims]), dilation=tuple(a.get("dilations", [1] * dims)), groups=groups,
                bias=bias is not None)
    return _load(layer, weight, bias)


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Module:
    return _load(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), weight, bias)


def _load(layer: nn.Module, weight: np.ndarray, bias: np.ndarray | None) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(bias))
    return layer.eval()


def layer_name(node: onnx.NodeProto) -> str:
    """The layer path a node stands for: ``features.4/Conv`` (our exports) -> ``features.4``;
    ``/layer1/layer1.0/conv1/Conv`` (torch.onnx scope names) -> ``layer1.0.conv1``; otherwise the node or
    output name, made into a dotted path of safe parts."""
    name = node.name
    if name.startswith("/"):
        scopes: list[str] = []
        for scope in name.strip("/").split("/")[:-1]:  # a scope is a child's name, or qualified from its parent's
            if scopes and scope.startswith(scopes[-1] + "."):
                scopes[-1] = scope
            else:
                scopes.append(scope)
        name = ".".join(scopes)
    elif "/" in name and not name.startswith("/"):
        name = name.rsplit("/", 1)[0]
    name = name.strip("/") or node.output[0]
    parts = [re.sub(r"[^0-9A-Za-z_-]+", "_", p).strip("_") or "node" for p in name.split(".")]
    return ".".join(f"{p}_" if hasattr(nn.Module, p) else p for p in parts)  # 'train', 'eval', ... are taken


def place(root: nn.Module, name: str, layer: nn.Module) -> str:
    """Put ``layer`` at the dotted path ``name``; on a clash, at a fresh flat name. Returns the path used."""
    path, flat, k = name, name.replace(".", "_"), 1
    while not _free(root, path):  # ends: a flat name has no parents, and each try is a new leaf
        path, k = (flat if k == 1 else f"{flat}_{k}"), k + 1
    module = root
    *parents, leaf = path.split(".")
    for part in parents:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    module.add_module(leaf, layer)
    return path


def _free(root: nn.Module, path: str) -> bool:
    """Whether ``path`` can hold a new layer: its parents are absent or plain containers, the leaf absent."""
    module = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = module._modules.get(part)
        if child is None:
            return True
        if type(child) is not nn.Module:  # a layer cannot hold another layer
            return False
        module = child
    return leaf not in module._modules
