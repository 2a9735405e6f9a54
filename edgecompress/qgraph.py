"""ONNX graph checks and rewrites around int8 quantization.

Owns: recognising an already-quantized graph, rewriting Gemm as MatMul (+ Add) so that dynamic
quantization (which skips Gemm) covers every Linear and every SVD factor, telling which weight nodes of
the fp32 graph ended up as integer ops in the quantized file (``coverage``) and which integer kernels
onnxruntime's CPU EP runs for it (``cpu_kernels``), and taking out what the file carries for nothing
(``compact``). Rewritten nodes keep their names (``fc1/svd/1`` stays ``fc1/svd/1``; its bias Add is
``fc1/svd/1/bias``) so chains stay recognisable.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress import exporters
from edgecompress.equalize import WEIGHT_OPS

log = logging.getLogger(__name__)

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM",
})


def quantized_ops(model: onnx.ModelProto) -> set[str]:
    """Op types in ``model`` that only a quantized graph has (QLinear* included)."""
    return {n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")}


def weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/MatMul/Gemm nodes whose weight (input 1) is an initializer: what int8 should cover."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy where each Gemm with a constant B (and no transA) is MatMul(A, alpha*B') [+ Add(beta*C)]."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    inits = {i.name: i for i in graph.initializer}
    rewritten, nodes = [], []
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits or _attr(node, "transA", 0):
            nodes.append(node)
            continue
        nodes.extend(_gemm_nodes(node, graph, inits))
        rewritten.append(node.name)
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten:
        log.info("rewrote %d Gemm nodes as MatMul for dynamic quantization", len(rewritten))
    return new, rewritten


def _gemm_nodes(node: onnx.NodeProto, graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias and beta != 1.0 and node.input[2] not in inits:
        return [node]  # a computed bias scaled by beta: leave this Gemm as it is
    weight = numpy_helper.to_array(inits[node.input[1]])
    weight = (weight.T if _attr(node, "transB", 0) else weight) * np.asarray(alpha, weight.dtype)
    weight_name = _fresh(f"{node.input[1]}_matmul", inits)
    _add_init(graph, inits, weight_name, np.ascontiguousarray(weight))
    out = node.output[0]
    matmul_out = f"{out}_matmul" if has_bias else out
    nodes = [helper.make_node("MatMul", [node.input[0], weight_name], [matmul_out], name=node.name)]
    if has_bias:
        bias = node.input[2]
        if beta != 1.0:
            bias_name = _fresh(f"{bias}_scaled", inits)
            _add_init(graph, inits, bias_name, numpy_helper.to_array(inits[bias]) * np.float32(beta))
            bias = bias_name
        nodes.append(helper.make_node("Add", [matmul_out, bias], [out], name=f"{node.name}/bias"))
    return nodes


def _add_init(graph: onnx.GraphProto, inits: dict, name: str, array: np.ndarray) -> None:
    tensor = numpy_helper.from_array(array, name)
    graph.initializer.append(tensor)
    inits[name] = tensor


def _fresh(base: str, taken: dict) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


_QDQ_SHORT = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ", "DynamicQuantizeLinear": "DynQ"}


# Weight zero points are dropped only before the ops whose QDQ fusion on onnxruntime's CPU EP was checked
# to take a DequantizeLinear without one (QLinearConv, QLinearMatMul). Its Gemm -> QGemm fusion does not:
# without B's zero point the Gemm stays float (measured, onnxruntime 1.32), so Gemm weights keep theirs.
ZERO_POINT_FREE_WEIGHTS = ("Conv", "MatMul")


def compact(quantized: onnx.ModelProto, fp32: onnx.ModelProto, zero_points: bool = True) -> dict[str, int]:
    """Take out what an int8 file carries for nothing, in place; returns the bytes saved per step.

    On a 350 KB Tucker-factorized cifar_conv these were a fifth of the int8 file:
    - names: the quantizer names each new tensor after the one it quantizes plus
      ``_QuantizeLinear_Output``, ``_scale``, ``_zero_point``..., so a name appears four or five times;
      the exporter's activation names (``/features/features.0/steps/steps.1/Conv_output_0``) come on top.
      Tensors become ``q12``; graph inputs/outputs, fp32 initializers and every node name of the fp32 graph
      stay (layer attribution in ``bench --profile`` and per-layer tables go by node name). New Q/DQ
      nodes are named after their output (``DQ:q7``). Value infos go: onnxruntime infers shapes at load.
    - with ``zero_points``: zero points that are all zero, on a DequantizeLinear of a constant: every
      int32 bias, and the symmetric int8 weights of ZERO_POINT_FREE_WEIGHTS. ONNX defines an absent zero
      point as 0 of the input's type; quantize() drops them for the CPU target only, where onnxruntime's
      fusions were checked without them.
    """
    saved = {}
    before = quantized.ByteSize()
    if zero_points:
        _drop_zero_points(quantized, ZERO_POINT_FREE_WEIGHTS)
    saved["zero_points"] = before - quantized.ByteSize()
    before = quantized.ByteSize()
    _short_names(quantized, fp32)
    saved["names"] = before - quantized.ByteSize()
    return saved


def _drop_zero_points(model: onnx.ModelProto, weight_ops: tuple[str, ...]) -> None:
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        zero_point = inits.get(node.input[2])
        if zero_point is None or numpy_helper.to_array(zero_point).any():
            continue
        is_bias = inits[node.input[0]].data_type == onnx.TensorProto.INT32
        if is_bias or all(op in weight_ops for op in consumers.get(node.output[0], ["?"])):
            del node.input[2]
    exporters.drop_unused_initializers(model)


def _short_names(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
    graph = fp32.graph
    keep = {i.name for i in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    keep |= exporters.subgraph_reads(quantized.graph)  # an If branch reads outer tensors by name
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return renamed.setdefault(name, f"q{len(renamed)}")

    fp32_nodes = {n.name for n in graph.node}
    for node in quantized.graph.node:
        node.input[:] = [short(t) for t in node.input]
        node.output[:] = [short(t) for t in node.output]
        if node.op_type in _QDQ_SHORT and node.name not in fp32_nodes:
            node.name = f"{_QDQ_SHORT[node.op_type]}:{node.output[0]}"
    for init in quantized.graph.initializer:
        init.name = short(init.name)
    for value in quantized.graph.output:
        value.name = short(value.name)
    del quantized.graph.value_info[:]


_FLOAT_WEIGHT_KERNELS = (*WEIGHT_OPS, "FusedConv", "FusedGemm", "FusedMatMul")  # onnxruntime's fused float ops
INTEGER_KERNEL_PREFIXES = ("QLinear", "QGemm", "QAttention", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                           "MatMulIntegerToFloat")


def _islands(graph: onnx.GraphProto) -> tuple[set[str], set[str], list[onnx.NodeProto]]:
    """(constant tensors, including dequantized weights; dequantized activations; the island nodes) of an
    optimized graph: ops that read a dequantized activation run in float between a DequantizeLinear and the
    next QuantizeLinear (HardSwish, BatchNormalization on the CPU EP), paying both conversions."""
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants for o in n.output}
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in constants for o in n.output}
    return constants, dequantized, [n for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                                    and not n.op_type.startswith(INTEGER_KERNEL_PREFIXES) and set(n.input) & dequantized]


def optimized(quantized: onnx.ModelProto) -> onnx.GraphProto:
    """The graph onnxruntime's CPU EP runs for ``quantized``, its QDQ pairs fused."""
    from edgecompress import runtime

    return runtime.optimized_graph(quantized).graph


def float_island_nodes(quantized: onnx.ModelProto, graph: onnx.GraphProto | None = None) -> list[str]:
    """Names of the file's nodes that the CPU EP runs in float between a DequantizeLinear and the next
    QuantizeLinear (``cpu_kernels``'s float islands, found in the optimized ``graph``, where a HardSwish is
    inlined as HardSigmoid + Mul): the file's nodes that read an activation an island reads."""
    _, dequantized, islands = _islands(graph if graph is not None else optimized(quantized))
    read = {i for n in islands for i in set(n.input) & dequantized}
    return [n.name for n in quantized.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and set(n.input) & read]


def cpu_kernels(quantized: onnx.ModelProto, graph: onnx.GraphProto | None = None) -> dict:
    """What onnxruntime's CPU EP actually runs for ``quantized`` once it has fused the QDQ pairs (``graph``,
    its ``optimized`` graph, when already made): the integer kernels by op type, the Conv/MatMul/Gemm nodes
    still computing in float (a DQ -> Conv pair it did not fuse runs as a dequantize plus a float conv: int8
    in the file, fp32 in time), and the float islands by op type."""
    graph = graph if graph is not None else optimized(quantized)
    constants, _, islands = _islands(graph)
    integer = Counter(n.op_type for n in graph.node if n.op_type.startswith(INTEGER_KERNEL_PREFIXES))
    return {"integer": dict(sorted(integer.items())),
            "float_weight_ops": [n.name for n in graph.node
                                 if n.op_type in _FLOAT_WEIGHT_KERNELS and len(n.input) > 1 and n.input[1] in constants],
            "float_islands": dict(sorted(Counter(n.op_type for n in islands).items()))}


def coverage(fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> dict:
    """Which fp32 weight nodes became integer ops: in QDQ a node fed by DequantizeLinear on its data and
    weight inputs; otherwise a node that no longer exists as a float op (replaced by an integer one)."""
    producers = {o: n for n in quantized.graph.node for o in n.output}
    by_name = {n.name: n for n in quantized.graph.node}
    left = []
    for node in weight_nodes(fp32):
        q = by_name.get(node.name)
        if q is None or q.op_type != node.op_type:
            continue  # replaced (MatMulInteger, QLinearConv, ...)
        fed = [producers.get(i) for i in q.input[:2]]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in fed):
            left.append(node.name)
    total = len(weight_nodes(fp32))
    return {"weight_nodes": total, "integer": total - len(left), "left_float": left}
