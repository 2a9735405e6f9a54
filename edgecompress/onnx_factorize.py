"""Factorize an ONNX model directly: its Conv, Gemm, MatMul and Gather nodes with constant weights, no PyTorch source.

For users who have only the ONNX file. Each such node becomes the torch layer it computes (Conv1d/Conv2d
from its attributes, Linear from its weight, Embedding from a Gather's table) inside a stand-in module tree named after the nodes
(``features.4/Conv`` -> layer ``features.4``), so the same ``factorize_`` runs on it: the same
decomposers, rank rules, include/exclude patterns, size floor and per-layer records. Each factorized
layer's chain is then exported alone (the exporter of ``edgecompress.exporters``) and spliced in place of
its node, under the names ``<layer>/<method>/<k>``. The result goes through onnxsim and the checker, and
its output error against the original file is measured on random inputs.

Methods: svd, svd-spatial, tucker, cp. Their chains are Conv/MatMul/Gemm/Add nodes that take any input
size. TT chains bake the input's shape into Reshape nodes, so for TT factorize the PyTorch model.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from edgecompress import calibration, exporters, io, runtime
from edgecompress.errors import ConfigError
from edgecompress.export import ExportConfig, plan_report
from edgecompress.factorize import FactorizeConfig
from edgecompress.factorize.api import FactorizeReport, factorize_
from edgecompress.factorize.base import FactorizedLayer

METHODS = ("svd", "svd-spatial", "tucker", "cp")


def factorize_onnx(model: onnx.ModelProto, config: FactorizeConfig, opset: int | None = None,
                   latency_config=None, calib=None, calib_path: str | Path | None = None,
                   sequential: bool = True) -> tuple[onnx.ModelProto, FactorizeReport]:
    """A copy of ``model`` with its Conv/Gemm/MatMul/Gather weight nodes factorized, and the per-layer report.
    With calibration data (``calib``, a ``capture.CalibrationSet``, or ``calib_path``) each layer is fitted to
    its inputs, captured with onnxruntime (``capture.OnnxCapture``), as for a PyTorch model.
    With a ``LatencyConfig``, chains that do not run faster than their node go back to the node
    (``edgecompress.latency``; both files are profiled on the provider, as int8 if it says so)."""
    if config.targets and not config.methods:
        from edgecompress.plan.allocate import DEFAULT_METHODS

        config = dataclasses.replace(config, methods=tuple(m for m in DEFAULT_METHODS if m in METHODS))
    if config.method not in METHODS or any(s.get("method", config.method) not in (*METHODS, "dense")
                                           for _, s in config.overrides) or any(m not in (*METHODS, "dense")
                                                                                for m in config.methods):
        raise ConfigError(f"an ONNX model can be factorized with {', '.join(METHODS)}; TT chains bake the input "
                          "shape in, so for tt factorize the PyTorch model")
    if latency_config is not None:
        runtime.resolve_provider(latency_config.provider)  # an unavailable provider fails before any work
    opset = opset or _opset(model)
    constants, root, nodes = _constants(model), nn.Module(), {}
    for node in model.graph.node:
        layer = _as_layer(node, constants)
        if layer is not None:
            nodes[_place(root, _layer_name(node), layer)] = node
    if calib is None and calib_path is not None:
        from edgecompress.capture.samples import onnx_calibration

        calib = onnx_calibration(model, calib_path)
    capture = _capture(model, nodes, calib, opset, sequential) if calib is not None else None
    root.file_params = exporters.param_count(model)  # a plan's whole-model parameter count
    report = factorize_(root, config, capture=capture)
    new = _build(model, root, nodes, report, opset)
    if latency_config is not None and report.factorized:
        from edgecompress.latency import keep_faster_records

        layers_ms = [_layers_ms(m, latency_config) for m in (_named_like_layers(model, nodes), new)]
        if keep_faster_records(report, *layers_ms, latency_config):
            new = _build(model, root, nodes, report, opset)
    return new, report


def _capture(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], calib, opset: int, sequential: bool):
    """An ``OnnxCapture`` of ``model``'s weight nodes whose ``replace`` splices a layer's chain in."""
    from edgecompress.capture import OnnxCapture

    shapes = _shapes(onnx.shape_inference.infer_shapes(model))

    def splice(proto: onnx.ModelProto, name: str, chain: nn.Module) -> onnx.ModelProto:
        new = onnx.ModelProto()
        new.CopyFrom(proto)
        node = nodes[name]
        _splice(new, _same_node(new, node), name, chain, _known_shape(shapes, node), opset)
        return new

    return OnnxCapture(model, {name: _activation(node) for name, node in nodes.items()}, calib, splice, sequential)


def _known_shape(shapes: dict[str, tuple[int, ...]], node: onnx.NodeProto) -> tuple[int, ...]:
    shape = shapes.get(_activation(node))
    if shape is None:
        raise ConfigError(f"the input shape of node {node.name!r} is unknown (ONNX shape inference found none): "
                          "give the model static input shapes, or exclude that layer")
    return shape


def _build(model: onnx.ModelProto, root: nn.Module, nodes: dict[str, onnx.NodeProto], report: FactorizeReport,
           opset: int) -> onnx.ModelProto:
    """A copy of ``model`` with the node of every factorized record replaced by its chain."""
    shapes = _shapes(onnx.shape_inference.infer_shapes(model))
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for record in report.factorized:
        node = nodes[record.name]
        _splice(new, _same_node(new, node), record.name, root.get_submodule(record.name), _known_shape(shapes, node), opset)
    exporters.drop_unused_initializers(new)
    return new


def _same_node(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.output[0] == node.output[0] and n.op_type == node.op_type)


def _named_like_layers(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto]) -> onnx.ModelProto:
    """A copy whose weight nodes are named ``<layer>/<op>``, so the profiler charges them to the same
    layers as the factorized file's ``<layer>/<method>/<k>`` chains."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    by_output = {node.output[0]: name for name, node in nodes.items()}
    for node in renamed.graph.node:
        if node.output[0] in by_output:
            node.name = f"{by_output[node.output[0]]}/{node.op_type}"
    return renamed


def _layers_ms(model: onnx.ModelProto, config) -> dict[str, float]:
    from edgecompress import profile
    from edgecompress.latency import int8_model

    if config.precision == "int8":
        model = int8_model(model, config.provider)
    feeds = calibration.random_samples(model, 1, 0)[0]
    return profile.profile(model, config.provider, config.threads, feeds, config.runs).layers


def export_factorized_onnx(path: str | Path, out: str | Path, config: FactorizeConfig,
                           export_config: ExportConfig = ExportConfig(),
                           stage: Callable[[str], None] | None = None, latency_config=None,
                           calib_path: str | Path | None = None) -> dict[str, Any]:
    """``edgecompress export model.onnx --method ...``: factorize the file (fitted to the samples at
    ``calib_path`` when given), simplify, check, measure the output error against the original (on held-out
    calibration samples, else random inputs), write ``out``; return the report dict."""
    stage = stage or (lambda _: None)
    start = time.perf_counter()
    io.ensure_writable(out)
    original = runtime.load_onnx(path)
    calib = None
    if calib_path is not None:
        from edgecompress.capture.samples import onnx_calibration

        calib = onnx_calibration(original, calib_path)
    stage("factorize" if latency_config is None else f"factorize, then time each layer on {latency_config.provider}")
    proto, report = factorize_onnx(original, config, latency_config=latency_config, calib=calib)
    simplified = False
    if export_config.simplify:
        stage("simplify")
        proto, simplified = exporters.simplify(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**props, "edgecompress.method": config.method})
    exporters.check_model(proto)
    stage("error against the original")
    if calib is not None:
        samples, inputs = calib.evaluation(), "held-out calibration samples" if calib.held else "calibration samples"
    else:
        samples, inputs = calibration.random_samples(original, export_config.parity_samples, export_config.seed), "random inputs"
    error = {**_output_error(original, proto, samples), "inputs": inputs}
    data = proto.SerializeToString()
    io.write_bytes(out, data)
    latency = None
    if latency_config is not None:
        latency = {"kept": [r.name for r in report.factorized], "config": dataclasses.asdict(latency_config),
                   "reverted": [r.name for r in report.layers if r.method == "dense" and "latency" in r.details]}
    params, params_after = exporters.param_count(original), exporters.param_count(proto)
    return {
        "model": str(path), "source": "onnx", "method": config.method, "layers": [r.to_dict() for r in report.layers],
        "totals": {**report.totals(), "params": params_after, "params_dense": params},
        "onnx": {"path": str(out), "bytes": len(data), "opset": _opset(proto), "simplified": simplified,
                 "nodes": len(proto.graph.node), "op_counts": exporters.op_counts(proto),
                 "seconds": round(time.perf_counter() - start, 3)},
        "error_vs_dense": error,
        **({"calibration": calib.describe()} if calib is not None else {}),
        **({"latency": latency} if latency else {}),
        **plan_report(report),
    }


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, unknown dimensions (a dynamic batch) taken as 1; tensors of unknown rank left out."""
    shapes = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                                       for d in t.shape.dim)
    return shapes


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensor name -> value for initializers, Constant nodes and Identity nodes of those (torch.onnx
    writes a repeated constant once and feeds the other uses through Identity nodes)."""
    constants = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _array(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]).astype(np.float32) if name in inits else None


def _activation(node: onnx.NodeProto) -> str:
    """The node's activation input: a Gather reads its indices (input 1) from a constant table (input 0)."""
    return node.input[1] if node.op_type == "Gather" else node.input[0]


def _as_layer(node: onnx.NodeProto, inits: dict) -> nn.Module | None:
    """The torch layer ``node`` computes, or None when it is not a weight layer this can rebuild."""
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
        return _linear(weight.T, None)
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


def _layer_name(node: onnx.NodeProto) -> str:
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


def _place(root: nn.Module, name: str, layer: nn.Module) -> str:
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


def _splice(model: onnx.ModelProto, node: onnx.NodeProto, name: str, chain: FactorizedLayer,
            shape: tuple[int, ...], opset: int) -> None:
    """Replace ``node`` in ``model`` by the exported ``chain`` (inputs and outputs rewired, names prefixed)."""
    example = torch.zeros(shape, dtype=torch.int64 if node.op_type == "Gather" else torch.float32)
    sub = exporters.export_onnx(chain, [example], opset=opset)
    prefix = f"{name}/{chain.method}"
    outer = {sub.graph.input[0].name: _activation(node), sub.graph.output[0].name: node.output[0]}

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


def _output_error(original: onnx.ModelProto, factorized: onnx.ModelProto, samples: list[dict]) -> dict[str, float]:
    """Max |difference| and relative L2 error of the outputs, factorized vs original, on ``samples`` (feeds),
    and the top-1 agreement of the first output where it is a batch of scores."""
    from edgecompress.capture.onnx_capture import _Runner

    a, b = _Runner(original, [o.name for o in original.graph.output]), _Runner(factorized, [o.name for o in factorized.graph.output])
    num = den = worst = 0.0
    same = count = 0
    for sample in samples:
        for k, (x, y) in enumerate(zip(a(sample).values(), b(sample).values())):
            x, y = x.double().numpy(), y.double().numpy()
            diff = x - y
            num, den = num + float((diff ** 2).sum()), den + float((x ** 2).sum())
            worst = max(worst, float(np.abs(diff).max(initial=0.0)))
            if k == 0 and x.ndim == 2 and x.shape[1] > 1:
                same, count = same + int((x.argmax(1) == y.argmax(1)).sum()), count + len(x)
    samples_seen = sum(len(next(iter(s.values()))) for s in samples)
    result = {"max_abs_diff": worst, "rel_error": (num / den) ** 0.5 if den else 0.0, "samples": samples_seen}
    return {**result, "top1_agreement": same / count} if count else result
