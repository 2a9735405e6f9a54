"""ONNX graph tools: onnxsim simplification, the full checker, op counts and allowed-op checks."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import onnx

from edgecompress.errors import ExportError

log = logging.getLogger(__name__)

# What a factorized chain may contain (issues 3 and 4): small standard nodes every provider runs.
# Pad and Slice come only from a conv's non-zero padding mode (reflect/replicate: Pad; circular:
# Slice + Concat), exactly as the dense conv exports it.
CHAIN_OPS = frozenset(
    {"Conv", "MatMul", "Gemm", "Add", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat",
     "Gather", "Div", "Mod", "Pad", "Slice"}
)


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """onnxsim's constant folding, shape inference and dead-node removal; the original comes back if it fails.

    onnxsim's optimizer passes are off (``perform_optimization=False``): recent onnxsim fuses
    attention into the ``com.microsoft::Attention`` contrib op and renames fused nodes, which would
    make the graph unportable to mobile runtimes and lose our ``module/method/k`` node names.
    onnxruntime applies its own fusions when it loads the model, per provider.
    onnxsim's own record (some twenty ``onnxsim.*`` metadata keys, most of them empty) becomes a
    single ``onnxsim`` key with its version: 0.7 KB that a 100 KB int8 model would otherwise carry.
    """
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model, perform_optimization=False)
    except Exception as exc:  # onnxsim surfaces C++ errors as RuntimeError and others
        log.warning("onnxsim failed, keeping the unsimplified graph: %s", str(exc).splitlines()[0])
        return model, False
    if not ok:
        log.warning("onnxsim's check failed, keeping the unsimplified graph")
        return model, False
    props = {p.key: p.value for p in simplified.metadata_props if not p.key.startswith("onnxsim.")}
    onnx.helper.set_model_props(simplified, {**props, "onnxsim": onnxsim.__version__.lstrip("v")})
    return simplified, True


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker's full check (shape inference included), as an ExportError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name the subgraphs of ``graph``'s nodes (If branches, Loop and Scan bodies) read, at any depth:
    they see the outer graph's tensors by name, so a rewrite of the outer graph must keep those names."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (attribute.g,) if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                names |= {t for n in sub.node for t in n.input} | subgraph_reads(sub)
    return names


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove, in place, the initializers no node reads (subgraphs included) and no graph output names
    (after a rewrite)."""
    used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    used |= subgraph_reads(model.graph)
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def param_count(model: onnx.ModelProto) -> int:
    """How many values the initializers and Constant nodes hold (the file's parameters; paddle2onnx writes
    its weights as Constant nodes)."""
    tensors = [*model.graph.initializer, *(a.t for n in model.graph.node if n.op_type == "Constant"
                                           for a in n.attribute if a.name == "value")]
    total = 0
    for tensor in tensors:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count
    return total


def strip_value_info(model: onnx.ModelProto) -> None:
    """Drop, in place, the inferred shapes of intermediate tensors: onnxruntime infers them again at load,
    and on a 600-tensor file they are 4 kB that would make a round trip larger than its input."""
    del model.graph.value_info[:]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph has, sorted by name."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def nodes_under(model: onnx.ModelProto, prefix: str) -> list[onnx.NodeProto]:
    """The nodes whose name starts with ``prefix`` + '/', e.g. a factorized layer's chain."""
    return [n for n in model.graph.node if n.name.startswith(prefix + "/")]


def foreign_ops(nodes: Iterable[onnx.NodeProto], allowed: Iterable[str] = CHAIN_OPS) -> set[str]:
    """Op types (or custom domains) among ``nodes`` that are not in ``allowed``."""
    allowed = set(allowed)
    return {n.op_type if not n.domain else f"{n.domain}::{n.op_type}" for n in nodes if n.op_type not in allowed or n.domain}
