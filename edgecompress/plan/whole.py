"""The whole model with some of its layers replaced, as an ONNX graph: what a plan's end-to-end checks time
(``--target latency=...``) and score (``--eval``).

One object for both inputs, so the checks are written once: ``torch_whole`` exports the PyTorch model with the
chains swapped in, ``onnx_whole`` splices them into the file's graph (``graph.splice``). ``build({})`` is the
dense model.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from edgecompress import exporters


@dataclasses.dataclass
class WholeModel:
    """``build(chains)``: the model as an ONNX graph with ``{layer name: chain}`` in place of those layers;
    ``feed``: one batch-1 input for timing it, by input name, or in the graph's input order."""

    build: Callable[[dict[str, nn.Module]], onnx.ModelProto]
    feed: dict[str, np.ndarray] | list[np.ndarray]
    _dense: dict[tuple[str, str], onnx.ModelProto] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def _as_run(self, chains: dict[str, nn.Module], timing) -> onnx.ModelProto:
        """The model with ``chains`` in place as it will run on ``timing``; the dense one built once (every
        check of a latency plan times it again beside the planned one)."""
        from edgecompress.plan.timing import for_precision

        if chains:
            return for_precision(self.build(chains), timing)
        key = (timing.provider, timing.precision)
        if key not in self._dense:
            self._dense[key] = for_precision(self.build({}), timing)
        return self._dense[key]

    def latency(self, chain_sets: list[dict[str, nn.Module]], timing) -> list[float]:
        """Median ms of the model with each set of chains in place, interleaved on ``timing``'s provider,
        threads and precision (int8: quantized as ``quantize`` would)."""
        from edgecompress.plan.timing import interleaved_ms

        protos = [self._as_run(chains, timing) for chains in chain_sets]
        feeds = [dict(zip((i.name for i in p.graph.input), self.feed)) if isinstance(self.feed, list) else
                 {i.name: self.feed[i.name] for i in p.graph.input} for p in protos]
        return interleaved_ms(protos, feeds, timing.provider, timing.threads)

    def score(self, chains: dict[str, nn.Module], metric: Callable[[str], float]) -> float:
        """``metric`` (the user's ``--eval`` function, on an ONNX path) of the model with ``chains`` in place."""
        with tempfile.TemporaryDirectory(prefix="edgecompress-plan-") as tmp:
            path = Path(tmp) / "planned.onnx"
            onnx.save(self.build(chains), str(path))
            return float(metric(str(path)))


def torch_whole(model: nn.Module, inputs: list[torch.Tensor]) -> WholeModel:
    """The PyTorch ``model`` exported (and simplified) with the chains swapped in, then put back."""
    sample = [x[:1] for x in inputs]

    def build(chains: dict[str, nn.Module]) -> onnx.ModelProto:
        originals = {name: model.get_submodule(name) for name in chains}
        try:
            for name, chain in chains.items():
                model.set_submodule(name, chain)
            return exporters.simplify(exporters.export_onnx(model.eval(), sample))[0]
        finally:
            for name, layer in originals.items():
                model.set_submodule(name, layer)

    return WholeModel(build, [x.numpy() for x in sample])


def onnx_whole(model: onnx.ModelProto, splice: Callable[[onnx.ModelProto, str, nn.Module], None],
               feed: dict[str, np.ndarray]) -> WholeModel:
    """The ONNX ``model`` with each chain spliced in place of its node (``splice(proto, name, chain)`` edits
    ``proto``), the weights nothing reads any more dropped."""

    def build(chains: dict[str, nn.Module]) -> onnx.ModelProto:
        new = onnx.ModelProto()
        new.CopyFrom(model)
        for name, chain in chains.items():
            splice(new, name, chain)
        exporters.drop_unused_initializers(new)
        return new

    return WholeModel(build, feed)
