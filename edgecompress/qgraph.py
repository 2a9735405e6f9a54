"""ONNX graph checks and rewrites around int8 quantization.

Owns: recognising an already-quantized graph, rewriting Gemm as MatMul (+ Add) so that dynamic
quantization (which skips Gemm) covers every Linear and every SVD factor, and telling which weight
nodes of the fp32 graph ended up as integer ops in the quantized one. Rewritten nodes keep their names
(``fc1/svd/1`` stays ``fc1/svd/1``; its bias Add is ``fc1/svd/1/bias``) so chains stay recognisable.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

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


def compact_names(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> int:
    """Give the tensors and nodes onnxruntime's quantizer created short names (``q12``), in place; the
    fp32 graph's own node and tensor names stay. Returns the bytes saved.

    The quantizer names each new tensor after the one it quantizes plus ``_QuantizeLinear_Output``,
    ``_scale``, ``_zero_point``..., so a name appears four or five times: on a 350 KB Tucker-factorized
    cifar_conv those strings were 15% of the int8 file. Value infos are dropped too (onnxruntime
    infers shapes again at load)."""
    before = quantized.ByteSize()
    graph = fp32.graph
    keep = {t for n in graph.node for t in (*n.input, *n.output)}
    keep |= {i.name for i in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    node_names = {n.name for n in graph.node}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return renamed.setdefault(name, f"q{len(renamed)}")

    for node in quantized.graph.node:
        node.input[:] = [short(t) for t in node.input]
        node.output[:] = [short(t) for t in node.output]
        if node.name not in node_names:
            node.name = f"{node.op_type}_{short(node.output[0])}"
    for init in quantized.graph.initializer:
        init.name = short(init.name)
    for value in quantized.graph.output:
        value.name = short(value.name)
    del quantized.graph.value_info[:]
    return before - quantized.ByteSize()


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
