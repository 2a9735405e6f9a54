"""Putting factorized layers back into an ONNX graph: each chain is exported alone (``edgecompress.exporters``)
and spliced in place of its node (and the Add of its bias), inputs and outputs rewired, its nodes named
``<layer>/<method>/<k>``. The replaced weights go with their nodes: nothing reads them any more.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn as nn

from edgecompress import exporters
from edgecompress.errors import ConfigError
from edgecompress.factorize.api import FactorizeReport
from edgecompress.factorize.base import FactorizedLayer
from edgecompress.graph.read import Site


def known_shape(shapes: dict[str, tuple[int, ...]], site: Site) -> tuple[int, ...]:
    shape = shapes.get(site.input)
    if shape is None:
        raise ConfigError(f"the input shape of node {site.node.name!r} is unknown (shape inference found none): "
                          "give --input-shape, or exclude that layer")
    return shape


def build(model: onnx.ModelProto, root: nn.Module, sites: dict[str, Site], report: FactorizeReport,
          shapes: dict[str, tuple[int, ...]], opset: int) -> onnx.ModelProto:
    """A copy of ``model`` with the nodes of every factorized record replaced by its chain, and the weights
    nothing reads any more removed."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for record in report.factorized:
        site = sites[record.name]
        splice(new, site, record.name, root.get_submodule(record.name), known_shape(shapes, site), opset)
    exporters.drop_unused_initializers(new)
    return new


def named_like_layers(model: onnx.ModelProto, sites: dict[str, Site]) -> onnx.ModelProto:
    """A copy whose weight nodes are named ``<layer>/<op>``, so the profiler charges them to the same
    layers as the factorized file's ``<layer>/<method>/<k>`` chains."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    by_output = {node.output[0]: name for name, site in sites.items() for node in site.nodes}
    for node in renamed.graph.node:
        if node.output[0] in by_output:
            node.name = f"{by_output[node.output[0]]}/{node.op_type}"
    return renamed


def splice(model: onnx.ModelProto, site: Site, name: str, chain: FactorizedLayer,
           shape: tuple[int, ...], opset: int) -> None:
    """Replace the site's nodes in ``model`` by the exported ``chain`` (inputs and outputs rewired, names
    prefixed)."""
    example = torch.zeros(shape, dtype=torch.int64 if site.node.op_type == "Gather" else torch.float32)
    sub = exporters.export_onnx(chain, [example], opset=opset)
    prefix = f"{name}/{chain.method}"
    outer = {sub.graph.input[0].name: site.input, sub.graph.output[0].name: site.output}

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
    replaced = {(n.op_type, n.output[0]) for n in site.nodes}
    nodes = list(model.graph.node)
    index = next(k for k, n in enumerate(nodes) if (n.op_type, n.output[0]) == (site.node.op_type, site.node.output[0]))
    nodes = [n for n in nodes[:index] if (n.op_type, n.output[0]) not in replaced] + new_nodes + \
        [n for n in nodes[index:] if (n.op_type, n.output[0]) not in replaced]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(sub.graph.initializer)
