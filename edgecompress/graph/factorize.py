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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.nn as nn

from edgecompress import calibration, exporters, io, runtime
from edgecompress.errors import ConfigError
from edgecompress.export import ExportConfig, plan_report
from edgecompress.factorize import FactorizeConfig
from edgecompress.factorize.api import FactorizeReport, factorize_
from edgecompress.graph.read import (
    activation,
    as_layer,
    constants,
    layer_name,
    opset_of,
    place,
    tensor_shapes,
)
from edgecompress.graph.splice import (
    build,
    known_shape,
    named_like_layers,
    same_node,
    splice,
)

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
    opset = opset or opset_of(model)
    weights, root, nodes = constants(model), nn.Module(), {}
    for node in model.graph.node:
        layer = as_layer(node, weights)
        if layer is not None:
            nodes[place(root, layer_name(node), layer)] = node
    if calib is None and calib_path is not None:
        from edgecompress.capture.samples import onnx_calibration

        calib = onnx_calibration(model, calib_path)
    capture = _capture(model, nodes, calib, opset, sequential) if calib is not None else None
    root.file_params = exporters.param_count(model)  # a plan's whole-model parameter count
    report = factorize_(root, config, capture=capture)
    new = build(model, root, nodes, report, opset)
    if latency_config is not None and report.factorized:
        from edgecompress.latency import keep_faster_records

        layers_ms = [_layers_ms(m, latency_config) for m in (named_like_layers(model, nodes), new)]
        if keep_faster_records(report, *layers_ms, latency_config):
            new = build(model, root, nodes, report, opset)
    return new, report


def _capture(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], calib, opset: int, sequential: bool):
    """An ``OnnxCapture`` of ``model``'s weight nodes whose ``replace`` splices a layer's chain in."""
    from edgecompress.capture import OnnxCapture

    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(model))

    def with_chain(proto: onnx.ModelProto, name: str, chain: nn.Module) -> onnx.ModelProto:
        new = onnx.ModelProto()
        new.CopyFrom(proto)
        node = nodes[name]
        splice(new, same_node(new, node), name, chain, known_shape(shapes, node), opset)
        return new

    return OnnxCapture(model, {name: activation(node) for name, node in nodes.items()}, calib, with_chain, sequential)


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
        "onnx": {"path": str(out), "bytes": len(data), "opset": opset_of(proto), "simplified": simplified,
                 "nodes": len(proto.graph.node), "op_counts": exporters.op_counts(proto),
                 "seconds": round(time.perf_counter() - start, 3)},
        "error_vs_dense": error,
        **({"calibration": calib.describe()} if calib is not None else {}),
        **({"latency": latency} if latency else {}),
        **plan_report(report),
    }


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
