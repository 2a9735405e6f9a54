"""``factorize(model, config)``: replace every selected layer by its factorized chain.

Walks the model's layers, asks the registry for the chosen method's decomposer, swaps the layer for
the returned ``FactorizedLayer`` and records, per candidate layer, ranks, parameters, MACs and the
relative reconstruction error of the weight. Layers left dense are recorded with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from edgecompress.factorize.base import FactorizedLayer, LayerRecord, SkipLayer
from edgecompress.factorize.config import FactorizeConfig
from edgecompress.factorize.registry import candidate_types, decomposer_for
from edgecompress.stats import count_macs, count_params

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (layer name, index, total)


@dataclasses.dataclass
class FactorizeReport:
    config: FactorizeConfig
    layers: list[LayerRecord]
    seconds: float

    @property
    def factorized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.method != "dense"]

    def totals(self) -> dict[str, Any]:
        """Sums over candidate layers; ``*_factorized`` sums only the layers that were factorized."""
        f = self.factorized

        def total(records, key):
            values = [getattr(r, key) for r in records]
            return None if any(v is None for v in values) else sum(values)

        return {
            "params_before": total(self.layers, "params_before"),
            "params_after": total(self.layers, "params_after"),
            "macs_before": total(self.layers, "macs_before"),
            "macs_after": total(self.layers, "macs_after"),
            "factorized_layers": len(f),
            "dense_layers": len(self.layers) - len(f),
            "params_before_factorized": total(f, "params_before"),
            "params_after_factorized": total(f, "params_after"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "seconds": round(self.seconds, 3),
                "layers": [r.to_dict() for r in self.layers], "totals": self.totals()}


def factorize(model: nn.Module, config: FactorizeConfig, inputs: Sequence[torch.Tensor] | None = None,
              progress: Progress | None = None) -> tuple[nn.Module, FactorizeReport]:
    """A factorized copy of ``model`` and its per-layer report; ``model`` is left untouched.
    With example ``inputs`` the report also holds MACs before and after."""
    new = copy.deepcopy(model)
    return new, factorize_(new, config, inputs, progress)


@torch.no_grad()
def factorize_(model: nn.Module, config: FactorizeConfig, inputs: Sequence[torch.Tensor] | None = None,
               progress: Progress | None = None) -> FactorizeReport:
    """Factorize ``model`` in place and return the per-layer report."""
    start = time.perf_counter()
    model.eval()
    macs_before = count_macs(model, inputs)[1] if inputs is not None else {}
    types = candidate_types()
    candidates = [(name, m) for name, m in model.named_modules()
                  if name and isinstance(m, types) and not isinstance(m, FactorizedLayer)
                  and not _inside_factorized(model, name) and config.selects(name)]
    records = []
    for index, (name, layer) in enumerate(candidates):
        if progress:
            progress(name, index, len(candidates))
        record = _factorize_one(model, name, layer, config, _parent(model, name))
        record.macs_before = macs_before.get(name)
        records.append(record)
    if inputs is not None:
        macs_after = count_macs(model, inputs)[1]
        for record in records:
            record.macs_after = macs_after.get(record.name)
    return FactorizeReport(config, records, time.perf_counter() - start)


def _inside_factorized(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), FactorizedLayer) for i in range(1, len(parts)))


# torch modules whose forward reads their children's .weight: a replaced child would break them
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _factorize_one(model: nn.Module, name: str, layer: nn.Module, config: FactorizeConfig, parent: nn.Module) -> LayerRecord:
    method, spec = config.for_layer(name)
    params = count_params(layer)
    record = LayerRecord(name, type(layer).__name__, "dense", params_before=params, params_after=params)
    if method == "dense":
        record.reason = "kept dense by the config"
        return record
    if params < config.min_params:
        record.reason = f"below the size floor of {config.min_params} parameters (--min-params): too small to pay off"
        return record
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        record.reason = f"{type(parent).__name__} reads this layer's weight directly (fast path), so it cannot be replaced"
        return record
    decomposer = decomposer_for(method, layer)
    if decomposer is None:
        record.reason = f"method {method!r} does not apply to {type(layer).__name__}"
        return record
    start = time.perf_counter()
    try:
        result = decomposer(layer, spec)
    except SkipLayer as skip:
        record.reason = str(skip)
        return record
    record.seconds = time.perf_counter() - start
    new_params = count_params(result.module)
    if new_params >= params:
        record.reason = f"no rank saves parameters ({spec.describe()} gives {new_params} >= {params})"
        return record
    record.method = result.module.method
    record.ranks = list(result.module.ranks())
    record.params_after = new_params
    record.rel_error = relative_error(layer.weight, result.module.dense_weight())
    record.notes = list(result.notes)
    record.details = dict(result.details)
    model.set_submodule(name, result.module)
    log.info("%s: %s ranks %s, %d -> %d params, error %.3g", name, record.method, record.ranks, params, new_params, record.rel_error)
    return record


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference = reference.detach().double()
    return float(torch.linalg.vector_norm(reference - approx.detach().double().reshape(reference.shape))
                 / torch.linalg.vector_norm(reference).clamp_min(1e-30))
