"""Factorize an ONNX model directly: its Conv, Gemm, MatMul and Gather nodes with constant weights, no PyTorch source.

For users who have only the ONNX file, as an exporter wrote it. ``prepare`` reads it: weights folded into
initializers and BatchNormalization into its Conv (``normalize``), the inputs fixed for the analysis
(``--input-shape``, else the calibration data's shape, else a dynamic batch of 1) and every tensor's shape
inferred (``shapes``). Each weight node becomes the torch layer it computes (``read``), inside a stand-in
module tree named after the nodes, so the same ``factorize_`` runs on it: the same decomposers, rank rules,
plans, include/exclude patterns, size floor and per-layer records, with MACs counted from the shapes. Each
factorized layer's chain is then exported alone and spliced in place of its node (``splice``). The result
goes through onnxsim and the checker, and its output error against the original file is measured on
held-out calibration samples, else random inputs.

Methods: svd, svd-spatial, tucker, cp, whose chains are Conv/MatMul/Gemm/Add nodes that take any input size,
so the written file keeps the input's dynamic dims; and tt, whose chains bake the input's shape into Reshape
nodes, so with tt the file is written with the fixed input shape, and says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from edgecompress import calibration, exporters, io, runtime
from edgecompress.errors import ConfigError, ExportError, ParityError
from edgecompress.export import ExportConfig, loss_warning, plan_report
from edgecompress.factorize import FactorizeConfig
from edgecompress.factorize.api import FactorizeReport, factorize_
from edgecompress.graph import shapes as graph_shapes
from edgecompress.graph.normalize import normalize
from edgecompress.graph.read import Site, opset_of, read_layers
from edgecompress.graph.splice import build, known_shape, named_like_layers, splice
from edgecompress.stats import count_macs

METHODS = ("svd", "svd-spatial", "tucker", "cp", "tt")
SHAPE_FREE = ("svd", "svd-spatial", "tucker", "cp")  # chains that take any input size


@dataclasses.dataclass
class Prepared:
    """An ONNX file read for factorization: ``model`` normalized (dynamic dims kept), ``fixed`` the same with
    every input dim fixed, ``shapes`` the static shapes inferred on ``fixed``."""

    model: onnx.ModelProto
    fixed: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]]
    input_shapes: dict[str, tuple[int, ...]]
    normalized: str
    file_params: int = 0  # the parameters of the file as read (what the export summary's "before" counts)

    def describe(self) -> dict[str, Any]:
        return {"normalized": self.normalized, "dynamic": graph_shapes.is_dynamic(self.model),
                "analysed_at": {k: list(v) for k, v in self.input_shapes.items()}}


def prepare(model: onnx.ModelProto, input_shapes: str | dict | None = None, calib=None) -> Prepared:
    """Read ``model`` for factorization (see the module docstring). ``input_shapes``: ``--input-shape``'s
    text or ``{input: shape}``; without it a ``calib`` set's first sample fixes the dims. An int8 file is
    refused: its weights are integers behind ConvInteger / QLinear nodes, with no float layer to factorize."""
    from edgecompress.qgraph import quantized_ops

    found = quantized_ops(model)
    if found:
        raise ConfigError(f"the model is already quantized (it has {', '.join(sorted(found))}): factorize the fp32 "
                          "model, then quantize the factorized file")
    normalized, note = normalize(model, fold_batchnorm=False)  # folded into the written file (normalize's docstring)
    if isinstance(input_shapes, str) or input_shapes is None:
        input_shapes = graph_shapes.parse_input_shapes(input_shapes, normalized)
    input_shapes = dict(input_shapes)  # the calibration data's shapes join the given ones
    if calib is not None:
        sample = (calib.fit or calib.held)[0]
        for name, array in sample.items():
            given = input_shapes.get(name)
            if given is not None and tuple(given[1:]) != tuple(array.shape[1:]):
                raise ConfigError(f"the calibration data's input {name!r} has samples of "
                                  f"{'x'.join(map(str, array.shape[1:]))}, --input-shape says "
                                  f"{'x'.join(map(str, given[1:]))}")
            input_shapes.setdefault(name, (1, *array.shape[1:]))
    fixed = graph_shapes.fixed(normalized, input_shapes)
    done = {v.name: tuple(int(d) for d in graph_shapes.dims(v)) for v in graph_shapes.graph_inputs(fixed)}
    return Prepared(normalized, fixed, graph_shapes.infer(fixed), done, note, exporters.param_count(model))


def factorize_onnx(model: onnx.ModelProto | Prepared, config: FactorizeConfig, opset: int | None = None,
                   latency_config=None, calib=None, calib_path: str | Path | None = None,
                   sequential: bool = True, input_shapes: str | dict | None = None,
                   judge=None) -> tuple[onnx.ModelProto, FactorizeReport]:
    """A copy of ``model`` with its Conv/Gemm/MatMul/Gather weight nodes factorized, and the per-layer report.
    With calibration data (``calib``, a ``capture.CalibrationSet``, or ``calib_path``) each layer is fitted to
    its inputs, captured with onnxruntime (``capture.OnnxCapture``), as for a PyTorch model.
    With a ``LatencyConfig``, chains that do not run faster than their node go back to the node
    (``edgecompress.latency``; both files are profiled on the provider, as int8 if it says so). A plan's
    latency target and ``judge`` (the user's metric, ``--eval``) are measured on the file with the chains
    spliced in. The report's ``graph`` says how the file was read."""
    if calib is None and calib_path is not None:
        from edgecompress.capture.samples import onnx_calibration

        calib = onnx_calibration(model if isinstance(model, onnx.ModelProto) else model.model, calib_path)
    prepared = model if isinstance(model, Prepared) else prepare(model, input_shapes, calib)
    used = {config.method, *(s.get("method", config.method) for _, s in config.overrides), *config.methods} - {"dense"}
    if used - set(METHODS):
        raise ConfigError(f"an ONNX model can be factorized with {', '.join(METHODS)}, not {', '.join(sorted(used - set(METHODS)))}")
    if latency_config is not None:
        runtime.resolve_provider(latency_config.provider)  # an unavailable provider fails before any work
    # TT chains bake the input's shape in: with tt the file is written, and captured, at the fixed shape
    base = prepared.fixed if used - set(SHAPE_FREE) else prepared.model
    opset = opset or opset_of(base)
    root, sites, unread = read_layers(base)

    def put(proto: onnx.ModelProto, name: str, chain: nn.Module) -> None:  # the layer's chain spliced into proto
        splice(proto, sites[name], name, chain, known_shape(prepared.shapes, sites[name]), opset)

    capture = _capture(base, sites, calib, put, sequential, prepared.shapes) if calib is not None else None
    whole = None
    if judge is not None or "latency" in dict(config.targets):
        from edgecompress.plan.whole import onnx_whole

        whole = onnx_whole(base, put, calibration.random_samples(prepared.fixed, 1, 0)[0])
    # a plan's whole-model parameter count is the file's as read, and what the written file folds away
    # (BatchNormalization into its conv) whatever the plan is off it: its "params=2x" is the export summary's
    root.file_params = prepared.file_params or exporters.param_count(base)
    if "params" in dict(config.targets):
        root.params_folded = root.file_params - exporters.param_count(normalize(base)[0])
    root.layer_input_shapes = {name: known_shape(prepared.shapes, site) for name, site in sites.items()
                               if site.input in prepared.shapes}  # a plan's MACs without data
    macs = {name: _macs(root.get_submodule(name), site, prepared.shapes) for name, site in sites.items()}
    report = factorize_(root, config, capture=capture, judge=judge, whole=whole)
    _count_macs(report, root, sites, prepared.shapes, macs)
    new = build(base, root, sites, report, prepared.shapes, opset)
    if latency_config is not None and report.factorized:
        from edgecompress.latency import keep_faster_records

        layers_ms = [_layers_ms(m, latency_config, prepared) for m in (named_like_layers(base, sites), new)]
        if keep_faster_records(report, *layers_ms, latency_config):
            new = build(base, root, sites, report, prepared.shapes, opset)
    new, note = normalize(new)
    report.graph = {**prepared.describe(), "written": note, "unread": [{"node": n, "reason": r} for n, r in unread],
                    "fixed_output": base is prepared.fixed and graph_shapes.is_dynamic(prepared.model)}
    return new, report


def _macs(layer: nn.Module, site: Site, shapes: dict) -> int | None:
    shape = shapes.get(site.input)
    if shape is None:
        return None
    example = torch.zeros(shape, dtype=torch.int64 if site.node.op_type == "Gather" else torch.float32)
    return count_macs(layer, [example])[0]


def _count_macs(report: FactorizeReport, root: nn.Module, sites: dict[str, Site], shapes: dict, before: dict) -> None:
    """Each record's MACs at the analysed input shape, before and after."""
    for record in report.layers:
        if record.name in sites:
            record.macs_before = before[record.name]
            record.macs_after = (_macs(root.get_submodule(record.name), sites[record.name], shapes)
                                 if record.method != "dense" else before[record.name])


def _capture(model: onnx.ModelProto, sites: dict[str, Site], calib, put: Callable, sequential: bool, shapes: dict):
    """An ``OnnxCapture`` of ``model``'s weight layers whose ``replace`` splices a layer's chain in (``put``)."""
    from edgecompress.capture import OnnxCapture
    from edgecompress.capture.downstream import onnx_downstream

    def with_chain(proto: onnx.ModelProto, name: str, chain: nn.Module) -> onnx.ModelProto:
        new = onnx.ModelProto()
        new.CopyFrom(proto)
        put(new, name, chain)
        return new

    return OnnxCapture(model, {name: site.input for name, site in sites.items()}, calib, with_chain, sequential,
                       downstream=onnx_downstream(model, {name: site.output for name, site in sites.items()}, shapes))


def _layers_ms(model: onnx.ModelProto, config, prepared: Prepared) -> dict[str, float]:
    from edgecompress import profile
    from edgecompress.latency import int8_model

    if config.precision == "int8":
        model = int8_model(model, config.provider)
    feeds = calibration.random_samples(prepared.fixed, 1, 0)[0]
    return profile.profile(model, config.provider, config.threads, feeds, config.runs).layers


def export_factorized_onnx(path: str | Path, out: str | Path, config: FactorizeConfig | None,
                           export_config: ExportConfig = ExportConfig(),
                           stage: Callable[[str], None] | None = None, latency_config=None,
                           calib_path: str | Path | None = None, input_shapes: str | dict | None = None,
                           judge=None) -> dict[str, Any]:
    """``edgecompress export model.onnx [--method ...]``: read the file (``prepare``), factorize it (fitted to
    the samples at ``calib_path`` when given; with ``config`` None, a clean round trip), simplify, check,
    measure the output error against the original (on held-out calibration samples, else random inputs) and
    write ``out``, never larger than the input; return the report dict."""
    stage = stage or (lambda _: None)
    start = time.perf_counter()
    io.ensure_writable(out)
    original = runtime.load_onnx(path)
    calib = None
    if calib_path is not None:
        from edgecompress.capture.samples import onnx_calibration

        calib = onnx_calibration(original, calib_path)
    stage("reading the graph")
    prepared = prepare(original, input_shapes, calib)
    report = None
    if config is None:
        proto, written = normalize(prepared.model)
    else:
        stage("factorize" if latency_config is None else f"factorize, then time each layer on {latency_config.provider}")
        proto, report = factorize_onnx(prepared, config, latency_config=latency_config, calib=calib, judge=judge)
    simplified = False
    if export_config.simplify:
        stage("simplify")
        proto, simplified = exporters.simplify(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**props, "edgecompress.method": config.method if config else "none"})
    exporters.check_model(proto)
    exporters.strip_value_info(proto)
    stage("error against the original")
    if calib is not None:
        samples, inputs = calib.evaluation(), "held-out calibration samples" if calib.held else "calibration samples"
    else:
        samples = calibration.random_samples(prepared.fixed, export_config.parity_samples, export_config.seed)
        inputs = "random inputs"
    error = {**_output_error(original, proto, samples), "inputs": inputs}
    data = proto.SerializeToString()
    size = _file_bytes(path, original)
    notes = []
    if config is None and len(data) > size:  # nothing folded away: the input is its own clean round trip
        proto, data = original, original.SerializeToString()
        error = {**_output_error(original, proto, samples), "inputs": inputs}
        notes.append("nothing to fold or remove: the file is written as it was read")
    if len(data) > size:
        raise ExportError(f"the output would be {len(data)} bytes, larger than the input's {size} (its chains hold "
                          f"more than the nodes they replace): nothing written; use a higher --ratio, or keep the input")
    io.write_bytes(out, data)
    latency = None
    if latency_config is not None and report is not None:
        latency = {"kept": [r.name for r in report.factorized], "config": dataclasses.asdict(latency_config),
                   "reverted": [r.name for r in report.layers if r.method == "dense" and "latency" in r.details]}
    params, params_after = exporters.param_count(original), exporters.param_count(proto)
    graph = report.graph if report is not None else {**prepared.describe(), "written": written, "unread": [],
                                                     "fixed_output": False}
    graph = {**graph, "notes": notes}
    totals = report.totals() if report is not None else {}
    if totals.get("macs_before") is not None:  # the weight layers' MACs at the analysed shape
        totals.update(macs_dense=totals["macs_before"], macs=totals["macs_after"])
    return {
        "model": str(path), "source": "onnx", "method": config.method if config else None,
        "layers": [r.to_dict() for r in report.layers] if report else [],
        "totals": {**totals, "params": params_after, "params_dense": params},
        "onnx": {"path": str(out), "bytes": len(data), "bytes_input": size, "opset": opset_of(proto),
                 "simplified": simplified, "nodes": len(proto.graph.node), "op_counts": exporters.op_counts(proto),
                 "seconds": round(time.perf_counter() - start, 3)},
        "graph": graph,
        "error_vs_dense": error,
        "warnings": [w for w in [loss_warning(error)] if w] if config is not None else [],
        **({"calibration": calib.describe()} if calib is not None else {}),
        **({"latency": latency} if latency else {}),
        **(plan_report(report) if report is not None else {}),
    }


def _file_bytes(path: str | Path, model: onnx.ModelProto) -> int:
    """The input's size: on disk, or in memory with its external data loaded, whichever is more."""
    return max(Path(path).stat().st_size, model.ByteSize())


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
            if x.shape != y.shape:
                raise ParityError(f"the written model's output {original.graph.output[k].name!r} has shape "
                                  f"{'x'.join(map(str, y.shape))} where the original's has {'x'.join(map(str, x.shape))}")
            diff = x - y
            num, den = num + float((diff ** 2).sum()), den + float((x ** 2).sum())
            worst = max(worst, float(np.abs(diff).max(initial=0.0)))
            if k == 0 and x.ndim == 2 and x.shape[1] > 1:
                same, count = same + int((x.argmax(1) == y.argmax(1)).sum()), count + len(x)
    samples_seen = sum(len(next(iter(s.values()))) for s in samples)
    result = {"max_abs_diff": worst, "rel_error": (num / den) ** 0.5 if den else 0.0, "samples": samples_seen}
    return {**result, "top1_agreement": same / count} if count else result
