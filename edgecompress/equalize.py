"""Scale balancing (cross-layer equalization) between the factors of factorized chains, on an ONNX graph.

A factorized layer exports as a chain of Conv/MatMul/Gemm nodes named ``module.path/method/k``. Its
factors' per-channel value ranges can differ by orders of magnitude (CP especially), and an int8 grid
sized for the widest channel flattens the narrow ones. For consecutive factors A -> B (joined directly
or through A's bias Add) channel c of the tensor between them is rescaled: A's output channel (rows and
bias) by 1/s_c and B's input channel by s_c, with s_c = sqrt(range_A(c) / range_B(c)), which leaves the
product unchanged and gives both factors the range sqrt(range_A * range_B) (Nagel et al. 2019, "Data-free
quantization through weight equalization and bias correction"). Chains with a depthwise conv in the
middle are iterated a few times, as in that paper; pairs joined by anything else (Reshape in TT chains,
tensors with several consumers, shared weights) are left alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

CHAIN_METHODS = ("svd", "tucker", "cp", "tt")
WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def chain_of(node_name: str) -> str | None:
    """``layer2.0.conv1/tucker/1`` -> ``layer2.0.conv1/tucker``; None for a node outside any chain."""
    for method in CHAIN_METHODS:
        marker = f"/{method}/"
        if marker in node_name:
            return node_name.split(marker)[0] + f"/{method}"
    return None


def find_chains(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Chain prefix -> the names of its Conv/MatMul/Gemm nodes, in graph order."""
    chains: dict[str, list[str]] = {}
    for node in model.graph.node:
        chain = chain_of(node.name)
        if chain and node.op_type in WEIGHT_OPS:
            chains.setdefault(chain, []).append(node.name)
    return chains


@dataclasses.dataclass
class _Pair:
    first: onnx.NodeProto
    second: onnx.NodeProto
    bias_add: onnx.NodeProto | None  # MatMul -> Add(bias) -> next factor


def find_pairs(model: onnx.ModelProto) -> list[_Pair]:
    """Consecutive factors of one chain that can be balanced without changing the graph's function."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    uses = Counter(name for node in graph.node for name in node.input)

    def only_consumer(tensor: str) -> onnx.NodeProto | None:
        nodes = consumers.get(tensor, [])
        return nodes[0] if len(nodes) == 1 and tensor not in outputs else None

    pairs = []
    for node in graph.node:
        chain = chain_of(node.name)
        if not chain or not _has_weight(node, inits, uses):
            continue
        nxt, bias_add = only_consumer(node.output[0]), None
        if nxt is not None and nxt.op_type == "Add" and node.op_type == "MatMul" and chain_of(nxt.name) == chain:
            other = [i for i in nxt.input if i != node.output[0]]
            if len(other) == 1 and other[0] in inits and uses[other[0]] == 1:
                bias_add, nxt = nxt, only_consumer(nxt.output[0])
        if (nxt is not None and chain_of(nxt.name) == chain and _has_weight(nxt, inits, uses)
                and nxt.input[0] == (bias_add or node).output[0]):
            pairs.append(_Pair(node, nxt, bias_add))
    return pairs


def _has_weight(node: onnx.NodeProto, inits: set[str], uses: Counter) -> bool:
    if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits or uses[node.input[1]] != 1:
        return False
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return False
    return len(node.input) < 3 or not node.input[2] or (node.input[2] in inits and uses[node.input[2]] == 1)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _to_view(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """Weight as [out, in, ...] (Conv layout) whatever the op stores."""
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0)):
        return w.T
    return w


def _channel_index(node: onnx.NodeProto, view: np.ndarray) -> np.ndarray:
    """For each [out, in_per_group] weight entry, the input channel it reads (grouped convs included)."""
    groups = _attr(node, "group", 1) if node.op_type == "Conv" else 1
    out, in_per_group = view.shape[:2]
    per_group_out = out // groups
    return (np.arange(out)[:, None] // per_group_out) * in_per_group + np.arange(in_per_group)[None, :]


def balance(model: onnx.ModelProto, samples=None, iterations: int = 4) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with every balanceable pair of chain factors equalized; plus a summary.

    With calibration ``samples`` the range on A's side is the measured per-channel range of the tensor
    between A and B, not A's weight rows: with per-channel weights A's rows cost nothing to rescale,
    while that tensor is quantized with one scale for all its channels (SmoothQuant's balance, alpha 0.5)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    pairs = find_pairs(new)
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in new.graph.initializer}
    if samples and pairs:
        weights.update({_ACT + k: v for k, v in activation_ranges(new, pairs, samples).items()})
    changed: set[str] = set()
    ratio_before = _spread(pairs, weights)
    for _ in range(iterations if pairs else 0):
        for pair in pairs:
            changed |= _balance_pair(pair, weights)
    for init in new.graph.initializer:
        if init.name in changed:
            dtype = helper_dtype(init)
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(dtype), init.name))
    info = {"chains": len(find_chains(new)), "pairs": len(pairs), "ranges": "activations" if samples else "weights",
            "range_spread_before": ratio_before, "range_spread_after": _spread(pairs, weights)}
    log.info("balanced %d factor pairs in %d chains", info["pairs"], info["chains"])
    return new, info


def helper_dtype(init: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))


_ACT = "activation range:"  # key prefix of measured link-tensor ranges kept beside the weights


def _link(pair: _Pair) -> str:
    return (pair.bias_add or pair.first).output[0]


def activation_ranges(model: onnx.ModelProto, pairs: list[_Pair], samples) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor between two factors, over ``samples`` (fp32 run)."""
    from edgecompress import runtime

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    axis = {_link(p): 1 if p.first.op_type == "Conv" else -1 for p in pairs}
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                for t in axis if t not in present)
    session = runtime.make_session(exposed, "cpu")
    names = list(axis)
    ranges: dict[str, np.ndarray] = {}
    for sample in samples:
        for name, value in zip(names, session.run(names, dict(sample))):
            value = np.moveaxis(np.abs(np.asarray(value, np.float64)), axis[name], 0)
            peak = value.reshape(value.shape[0], -1).max(axis=1)
            ranges[name] = np.maximum(ranges.get(name, peak), peak)
    return ranges


def _ranges(pair: _Pair, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    first = _to_view(pair.first, weights[pair.first.input[1]])
    second = _to_view(pair.second, weights[pair.second.input[1]])
    measured = weights.get(_ACT + _link(pair))
    r1 = measured if measured is not None else np.abs(first.reshape(first.shape[0], -1)).max(axis=1)
    index = _channel_index(pair.second, second)
    per_entry = np.abs(second.reshape(*second.shape[:2], -1)).max(axis=2)
    r2 = np.zeros(r1.shape[0])
    np.maximum.at(r2, index.ravel(), per_entry.ravel())
    return r1, r2


def _balance_pair(pair: _Pair, weights: dict[str, np.ndarray]) -> set[str]:
    channels = _to_view(pair.first, weights[pair.first.input[1]]).shape[0]
    bias = _bias_of(pair)
    if channels != _in_channels(pair.second, weights) or (bias is not None and weights[bias].size != channels):
        return set()  # not a plain channel-to-channel link: rescaling would change the function
    r1, r2 = _ranges(pair, weights)
    ok = (r1 > 0) & (r2 > 0)
    s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
    first = _to_view(pair.first, weights[pair.first.input[1]])  # a view: writes land in ``weights``
    first /= s.reshape(-1, *[1] * (first.ndim - 1))
    second = _to_view(pair.second, weights[pair.second.input[1]])
    multiplier = s[_channel_index(pair.second, second)]
    second *= multiplier.reshape(*multiplier.shape, *[1] * (second.ndim - 2))
    changed = {pair.first.input[1], pair.second.input[1]}
    if bias is not None:
        weights[bias] = weights[bias] / s.reshape(weights[bias].shape)
        changed.add(bias)
    if _ACT + _link(pair) in weights:
        weights[_ACT + _link(pair)] = weights[_ACT + _link(pair)] / s
    return changed


def _bias_of(pair: _Pair) -> str | None:
    if pair.bias_add is not None:
        return next(i for i in pair.bias_add.input if i != pair.first.output[0])
    if len(pair.first.input) > 2 and pair.first.input[2]:
        return pair.first.input[2]
    return None


def _in_channels(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> int:
    view = _to_view(node, weights[node.input[1]])
    groups = _attr(node, "group", 1) if node.op_type == "Conv" else 1
    return view.shape[1] * groups


def _spread(pairs: list[_Pair], weights: dict[str, np.ndarray]) -> float | None:
    """Median over pairs of the largest channel's range ratio between the two factors (1 = balanced)."""
    if not pairs:
        return None
    spreads = []
    for pair in pairs:
        r1, r2 = _ranges(pair, weights)
        ok = (r1 > 0) & (r2 > 0)
        spreads.append(float(np.max(np.maximum(r1[ok] / r2[ok], r2[ok] / r1[ok]))) if ok.any() else 1.0)
    return float(np.median(spreads))
