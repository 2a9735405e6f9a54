"""Putting factorized layers back into an ONNX graph: each chain is exported alone (``edgecompress.exporters``)
and spliced in place of its node, inputs and outputs rewired, its nodes named ``<layer>/<method>/<k>``.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn as nn

from edgecompress import exporters
from edgecompress.errors import ConfigError
from edgecompress.factorize.api import FactorizeReport
from edgecompress.factorize.base import FactorizedLayer
from edgecompress.graph.read import activation, tensor_shapes


def known_shape(shapes: dict[str, tuple[int, ...]], node: onnx.NodeProto) -> tuple[int, ...]:
    shape = shapes.get(activation(node))
    if shape is None:
        raise ConfigError(f"the input shape of node {node.name!r} is unknown (ONNX shape inference found none): "
                          "give the model static input shapes, or exclude that layer")
    return shape


def build(model: onnx.ModelProto, root: nn.Module, nodes: dict[str, onnx.NodeProto], report: FactorizeReport,
           opset: int) -> onnx.ModelProto:
    """A copy of ``model`` with the node of every factorized record replaced by its chain."""
    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(model))
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for record in report.factorized:
        node = nodes[record.name]
        splice(new, same_node(new, node), record.name, root.get_submodule(record.name), known_shape(shapes, node), opset)
    exporters.drop_unused_initializers(new)
    return new


def same_node(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.output[0] == node.output[0] and n.op_type == node.op_type)


def named_like_layers(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto]) -> onnx.ModelProto:
    """A copy whose weight nodes are named ``<layer>/<op>``, so the profiler charges them to the same
    layers as the factorized file's ``<layer>/<method>/<k>`` chains."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    by_output = {node.output[0]: name for name, node in nodes.items()}
    for node in renamed.graph.node:
        if node.output[0] in by_output:
            node.name = f"{by_output[node.output[0]]}/{node.op_type}"
    return renamed


def splice(model: onnx.ModelProto, node: onnx.NodeProto, name: str, chain: FactorizedLayer,
            shape: tuple[int, ...], opset: int) -> None:
    """Replace ``node`` in ``model`` by the exported ``chain`` (inputs and outputs rewired, names prefixed)."""
    example = torch.zeros(shape, dtype=torch.int64 if node.op_type == "Gather" else torch.float32)
    sub = exporters.export_onnx(chain, [example], opset=opset)
    prefix = f"{name}/{chain.method}"
    outer = {sub.graph.input[0].name: activation(node), sub.graph.output[0].name: node.output[0]}

    def rename(tensor: str) -> str:
        return outer.get(tensor, f"{prefix}/{tensor}" if tensor else tensor)

    for init in sub.graph.initializer:
        init.name = rename(init.name)
    new_nodes = []
    for k, n in enumerate(sub.graph.node):
        n.input[:] = [rename(t) for t in n.input]
        n.output[:] = [rename(t) for t in n.output]
        n.name = f"{prefix}/{k}"
        new_nodes.append(n)
    index = list(model.graph.node).index(node)
    nodes = list(model.graph.node)
    nodes[index:index + 1] = new_nodes
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(sub.graph.initializer)
