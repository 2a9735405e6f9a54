"""What a session does inside: node placement per provider, time per original layer, peak memory.

onnxruntime's profiler writes one event per executed kernel with the kernel's node name and the
provider that ran it. Optimizers rename nodes: a fused Gemm is ``"fused <name>"``, the NCHWc layout
transformer names a node after its output tensor (``/layer1/layer1.0/relu/Relu_output_0_nchwc``: a
Conv fused with the Relu that follows it), some passes append ``_token_<n>``. ``attribute`` maps each
event back to a node of the ONNX file (by name, by output tensor, by name prefix), walks from a fused
activation back to the op that was fused (the Conv of Conv+Relu), and takes the layer as the part of
the node name before its first '/' (``layer1.0.conv1/tucker/2`` -> ``layer1.0.conv1``).
Peak memory is measured in a fresh process (``peak_memory``) so that sessions do not share the count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress import runtime

# ops that ORT fuses into the preceding compute op; walking back through them finds that op
_FUSABLE = {"Relu", "Clip", "Add", "Sum", "Sigmoid", "Mul", "HardSigmoid", "LeakyRelu", "Tanh", "BatchNormalization"}
_UNATTRIBUTED = "(unattributed)"
_ROOT = "(root)"


@dataclasses.dataclass
class ProfileResult:
    """Node placement and time per layer from one profiled session (times in ms per run)."""

    provider: str
    nodes_total: int
    nodes_on_provider: int
    node_ms: float
    layers: dict[str, float]
    attributed_fraction: float
    unattributed: dict[str, float]
    cpu_fallback_ops: dict[str, int]
    op_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # time per op type (QLinearConv, HardSwish)

    @property
    def placement_fraction(self) -> float:
        return self.nodes_on_provider / self.nodes_total if self.nodes_total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "nodes_total": self.nodes_total, "nodes_on_provider": self.nodes_on_provider,
                "placement_fraction": round(self.placement_fraction, 4), "node_ms": round(self.node_ms, 4),
                "attributed_fraction": round(self.attributed_fraction, 4),
                "layers_ms": {k: round(v, 4) for k, v in self.layers.items()},
                "unattributed_ms": {k: round(v, 4) for k, v in self.unattributed.items()},
                "cpu_fallback_ops": self.cpu_fallback_ops}


def compare_layers(baseline_ms: Mapping[str, float], other_ms: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per layer: its time in the baseline and in the other model (both from ``profile``) and the speedup,
    slowest baseline layer first. A layer present in one model only (renamed, removed) gets None on the
    other side. This is how to see which factorized layers pay off on this provider, and which do not."""
    names = sorted(set(baseline_ms) | set(other_ms), key=lambda n: (-baseline_ms.get(n, 0.0), -other_ms.get(n, 0.0), n))
    rows = []
    for name in names:
        base, other = baseline_ms.get(name), other_ms.get(name)
        rows.append({"layer": name, "baseline_ms": base, "ms": other,
                     "speedup": round(base / other, 4) if base and other else None})
    return rows


def profile(model: onnx.ModelProto, provider: str, threads: int, feeds: Mapping[str, np.ndarray],
            runs: int = 10) -> ProfileResult:
    """Run ``model`` ``runs`` times in a profiled session and attribute node time to layers."""
    ort = runtime.ort_module()
    with tempfile.TemporaryDirectory(prefix="edgecompress-prof-") as tmp:
        options = runtime.session_options(threads, profile_prefix=os.path.join(tmp, "p"))
        # the optimized graph tells which layer an inserted node (layout reorder, copy) sits next to
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        chosen = runtime.resolve_provider(provider)
        providers = [chosen] + ([] if chosen == "CPUExecutionProvider" else ["CPUExecutionProvider"])
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except Exception:  # some EPs cannot save their compiled graph: profile without it
            options.optimized_model_filepath = ""
            session = runtime.make_session(model, provider, threads, profile_prefix=os.path.join(tmp, "q"))
        for _ in range(runs + 1):  # the first run pays allocations; it is dropped below
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = _load_optional(options.optimized_model_filepath)
    return attribute(model, events, runtime.resolve_provider(provider), runs, optimized)


def _load_optional(path: str) -> onnx.ModelProto | None:
    try:
        return onnx.load(path, load_external_data=False) if path and Path(path).is_file() else None
    except Exception:
        return None


def attribute(model: onnx.ModelProto, events: list[dict], provider: str, runs: int,
              optimized: onnx.ModelProto | None = None) -> ProfileResult:
    """Turn profile ``events`` (the last ``runs`` model runs) into placement and per-layer times."""
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cutoff = starts[-runs] if 0 < runs <= len(starts) else 0
    resolver = _Resolver(model, optimized)
    layers: dict[str, float] = defaultdict(float)
    unattributed: dict[str, float] = defaultdict(float)
    placement: dict[str, str] = {}
    total = 0.0
    op_ms: dict[str, float] = defaultdict(float)
    for event in kernels:
        name = event["name"][: -len("_kernel_time")]
        args = event.get("args", {})
        placement.setdefault(name, args.get("provider", ""))
        if event["ts"] < cutoff:
            continue
        ms = event["dur"] / 1000.0 / max(runs, 1)
        total += ms
        op_ms[args.get("op_name", "?")] += ms
        node = resolver.node_for(name, args.get("op_name", ""))
        layer = _layer_of(node.name) if node is not None else None
        if layer is None:
            unattributed[_ROOT if node is not None else _kind(name)] += ms
        else:
            layers[layer] += ms
    on_provider = sum(1 for where in placement.values() if where == provider)
    attributed = sum(layers.values())
    return ProfileResult(provider, len(placement), on_provider, total, dict(layers),
                         attributed / total if total else 0.0, dict(unattributed), _fallback_by_op(kernels, provider),
                         dict(sorted(op_ms.items(), key=lambda kv: -kv[1])))


def _fallback_by_op(kernels: list[dict], provider: str) -> dict[str, int]:
    seen: dict[str, str] = {}
    for e in kernels:
        if e.get("args", {}).get("provider") != provider:
            seen[e["name"]] = e["args"].get("op_name", "?")
    counts: dict[str, int] = defaultdict(int)
    for op in seen.values():
        counts[op] += 1
    return dict(counts)


def _layer_of(node_name: str) -> str | None:
    """'layer1.0.conv1/tucker/2' -> 'layer1.0.conv1'; a name without a module path -> None."""
    return node_name.split("/", 1)[0] if "/" in node_name and not node_name.startswith("/") else None


def _kind(name: str) -> str:
    # nodes ORT inserted: layout reorders (NCHWc), device copies, casts
    for kind in ("Reorder", "Memcpy", "Cast", "Transpose"):
        if kind in name:
            return f"{_UNATTRIBUTED} {kind}"
    return _UNATTRIBUTED


class _Resolver:
    """Maps a profiled (possibly renamed) node back to a node of the original ONNX graph."""

    def __init__(self, model: onnx.ModelProto, optimized: onnx.ModelProto | None = None):
        self.by_name = {n.name: n for n in model.graph.node}
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.prefixes = sorted(self.by_name, key=len, reverse=True)
        nodes = optimized.graph.node if optimized is not None else []
        self.opt_by_name = {n.name: n for n in nodes}
        self.opt_producer = {out: n for n in nodes for out in n.output}
        self.opt_consumers: dict[str, list] = defaultdict(list)
        for n in nodes:
            for tensor in n.input:
                self.opt_consumers[tensor].append(n)

    def node_for(self, name: str, op_type: str, hops: int = 3) -> onnx.NodeProto | None:
        node = self._direct(name, op_type)
        if node is None and hops and name in self.opt_by_name:
            node = self._neighbour(self.opt_by_name[name], hops)
        return node

    def _direct(self, name: str, op_type: str) -> onnx.NodeProto | None:
        name = name.removeprefix("fused ")
        name = re.sub(r"(_token_\d+)+$", "", name)
        node = self.by_name.get(name)
        if node is None:
            stripped = re.sub(r"_nchwc$", "", name)
            node = self.producer.get(stripped) or self.by_name.get(stripped)
        if node is None:
            node = next((self.by_name[p] for p in self.prefixes if p and name.startswith(p)), None)
        if node is not None and op_type and not _same_op(node.op_type, op_type):
            node = self._fused_source(node, op_type) or node
        return node

    def _neighbour(self, inserted: onnx.NodeProto, hops: int) -> onnx.NodeProto | None:
        """An inserted node (ReorderOutput, Memcpy) belongs to the layer that produces its input,
        else to the one that consumes its output (a ReorderInput before a layer)."""
        producers = [self.opt_producer[t] for t in inserted.input[:1] if t in self.opt_producer]
        consumers = [c for t in inserted.output for c in self.opt_consumers.get(t, [])]
        order = consumers + producers if inserted.op_type.startswith("ReorderInput") else producers + consumers
        for other in order:
            node = self.node_for(other.name, other.op_type, hops - 1)
            if node is not None and _layer_of(node.name) is not None:
                return node
        return None

    def _fused_source(self, node: onnx.NodeProto, op_type: str, depth: int = 4) -> onnx.NodeProto | None:
        """From a fused activation (Relu) back to the op it was fused into (Conv), breadth first."""
        frontier = [node]
        for _ in range(depth):
            nxt = []
            for current in frontier:
                if current.op_type not in _FUSABLE:
                    continue
                for tensor in current.input:
                    parent = self.producer.get(tensor)
                    if parent is None:
                        continue
                    if _same_op(parent.op_type, op_type):
                        return parent
                    nxt.append(parent)
            frontier = nxt
        return None


def _same_op(original: str, executed: str) -> bool:
    # FusedConv / FusedGemm / FusedMatMul / QLinearConv run what was a Conv / Gemm / MatMul
    return original == executed or executed.endswith(original) or original.endswith(executed)


_PROBE = r"""
import json, sys
import numpy as np
from edgecompress import runtime
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
path, provider, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
feeds = dict(np.load(sys.argv[5]))
before = hwm()
session = runtime.make_session(path, provider, threads)
for _ in range(runs):
    session.run(None, feeds)
print(json.dumps({"peak_rss_bytes": hwm(), "baseline_rss_bytes": before}))
"""


def peak_memory(model: onnx.ModelProto, provider: str, threads: int, feeds: Mapping[str, np.ndarray],
                runs: int = 3) -> dict[str, int] | None:
    """Peak RSS (VmHWM) of a fresh process that creates the session and runs it, and its growth over
    the process's peak before the session (Python, numpy and onnxruntime loaded). Linux only."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="edgecompress-mem-") as tmp:
        path, data = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "feeds.npz")
        onnx.save(model, path)
        np.savez(data, **feeds)
        proc = subprocess.run([sys.executable, "-c", _PROBE, path, provider, str(threads), str(runs), data],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return None
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_bytes": probe["peak_rss_bytes"],
            "rss_delta_bytes": probe["peak_rss_bytes"] - probe["baseline_rss_bytes"]}
