"""What int8 cost, measured: the quantized model against its fp32 source on held-out samples.

Whole-model figures: SQNR in dB (10 log10 of signal power over error power, all outputs and samples
together), the largest absolute difference, the relative L2 error and, for classifier outputs
([batch, classes]), how often the top-1 class agrees. Per layer: both graphs are run with every weight
node's input and output exposed and matched by tensor name (quantization keeps float tensor names);
``rel_error`` is the error a layer's output carries (accumulated from upstream), ``local_error`` the
part this layer added, sqrt(max(rel_out^2 - rel_in^2, 0)), which ranks the worst layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecompress import runtime
from edgecompress.equalize import chain_of
from edgecompress.qgraph import weight_nodes

Sample = dict[str, np.ndarray]


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def output_metrics(reference: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]]) -> dict:
    """Compare per-sample output lists (fp32 reference first)."""
    signal = noise = 0.0
    worst = 0.0
    agree = total = 0
    for ref_outs, act_outs in zip(reference, actual):
        for ref, act in zip(ref_outs, act_outs):
            if not np.issubdtype(np.asarray(ref).dtype, np.floating):
                continue
            r, a = np.asarray(ref, np.float64), np.asarray(act, np.float64)
            signal += float((r**2).sum())
            noise += float(((r - a) ** 2).sum())
            worst = max(worst, float(np.abs(r - a).max(initial=0.0)))
        first = np.asarray(ref_outs[0])
        if first.ndim == 2 and first.shape[1] > 1:
            agree += int((first.argmax(1) == np.asarray(act_outs[0]).argmax(1)).sum())
            total += first.shape[0]
    rel = math.sqrt(noise / signal) if signal > 0 else math.inf
    return {"sqnr_db": _finite(sqnr_db(signal, noise)), "max_abs_diff": worst, "rel_error": rel,
            "top1_agreement": agree / total if total else None, "samples": len(reference)}


def _finite(x: float) -> float | None:
    # JSON has no inf: a bit-exact result reports None and says so in the table
    return x if math.isfinite(x) else None


def run(model: onnx.ModelProto, samples: Sequence[Sample]) -> list[list[np.ndarray]]:
    session = runtime.make_session(model, "cpu")
    return [runtime.run(session, s) for s in samples]


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the float tensors ``names``."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    present = {o.name for o in new.graph.output}
    new.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in present)
    return new


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    # outputs of quantizing ops are int8/uint8, not comparable with the fp32 tensors
    return {t for t, op in produced.items() if op not in ("QuantizeLinear", "DynamicQuantizeLinear")
            and not op.startswith("QLinear")} | inputs


def layer_errors(fp32: onnx.ModelProto, quantized: onnx.ModelProto, samples: Sequence[Sample]) -> list[dict]:
    """Per weight node of ``fp32``: the error its output carries in ``quantized`` and the part it added."""
    nodes = weight_nodes(fp32)
    common = _float_tensors(fp32) & _float_tensors(quantized)
    names = sorted({t for n in nodes for t in (n.input[0], n.output[0]) if t in common})
    if not names or not samples:
        return []
    graph_inputs = {i.name for i in fp32.graph.input}
    wanted = [n for n in names if n not in graph_inputs]
    errors = _tensor_errors(expose(fp32, wanted), expose(quantized, wanted), samples, wanted)
    records = []
    for node in nodes:
        out = node.output[0]
        if out not in errors:
            continue
        rel_out = errors[out]
        rel_in = 0.0 if node.input[0] in graph_inputs else errors.get(node.input[0], 0.0)
        records.append({
            "name": node.name, "op": node.op_type, "chain": chain_of(node.name),
            "sqnr_db": _finite(sqnr_db(1.0, rel_out**2)), "rel_error": rel_out,
            "local_error": math.sqrt(max(rel_out**2 - rel_in**2, 0.0)),
        })
    return sorted(records, key=lambda r: r["local_error"], reverse=True)


def _tensor_errors(reference: onnx.ModelProto, quantized: onnx.ModelProto, samples: Sequence[Sample],
                   names: Sequence[str]) -> dict[str, float]:
    """Relative L2 error of each tensor ``names`` (quantized vs reference) over all samples, streamed one
    sample at a time: holding every intermediate tensor of every sample took >10 GB on a TT ResNet-18."""
    ref_session, act_session = runtime.make_session(reference, "cpu"), runtime.make_session(quantized, "cpu")
    ref_names = {o.name for o in ref_session.get_outputs()}
    available = [o.name for o in act_session.get_outputs() if o.name in set(names) and o.name in ref_names]
    signal = dict.fromkeys(available, 0.0)
    noise = dict.fromkeys(available, 0.0)
    for sample in samples:
        feed = dict(sample)
        for name, r, a in zip(available, ref_session.run(available, feed), act_session.run(available, feed)):
            r64 = np.asarray(r, np.float64)
            signal[name] += float((r64**2).sum())
            noise[name] += float(((r64 - a) ** 2).sum())
    return {n: math.sqrt(noise[n] / signal[n]) if signal[n] > 0 else 0.0 for n in available}

