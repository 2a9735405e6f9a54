"""``plan(model, config)``: what factorizing a model would do, layer by layer, without exporting.

It runs the same steps as ``export`` up to the factorization (load, fold BatchNorm, factorize with
sample inputs for the MAC counts) and returns the ``FactorizeReport``: ranks, parameters and MACs
before and after, the relative error of each weight, and why a layer stays dense.
"""

from __future__ import annotations

import copy
from pathlib import Path

from edgecompress import exporters
from edgecompress.factorize.api import FactorizeReport, Progress, factorize_
from edgecompress.factorize.config import FactorizeConfig
from edgecompress.loading import LoadedModel, load_model, sample_inputs


def plan(model: str | LoadedModel, config: FactorizeConfig, weights: str | Path | None = None,
         input_shape: str | tuple[int, ...] | None = None, input_dtype: str | None = None,
         progress: Progress | None = None, latency_config=None, calib=None, sequential: bool = False,
         judge=None) -> FactorizeReport:
    """The per-layer report of factorizing ``model`` (a name is loaded; a LoadedModel is left as it was).
    With a ``LatencyConfig`` each chain is also timed against its dense layer and kept only if faster.
    ``calib`` (a ``capture.CalibrationSet``) fits the factors to data: each layer on the dense model's
    inputs (one calibration pass), or, ``sequential``, in the compressed model layer by layer as ``export``
    does (one partial forward per layer: slower, and what export will give). ``judge`` (``plan.ScoreBound``, the
    user's metric) bounds a ``config.targets`` plan."""
    if latency_config is not None:
        from edgecompress.runtime import resolve_provider

        resolve_provider(latency_config.provider)  # an unavailable provider fails before any work
    if isinstance(model, LoadedModel):
        model = LoadedModel(model.name, copy.deepcopy(model.module), model.input_spec)
    else:
        model = load_model(model, weights, input_shape, input_dtype)
    module = model.module.eval()
    exporters.fold_batchnorm_(module)  # as export does, so the ranks and errors are the exported ones
    inputs = sample_inputs(module, model.input_spec)
    dense = copy.deepcopy(module) if latency_config is not None else None
    report = factorize_(module, config, inputs, progress, calib, sequential=sequential, judge=judge)
    if latency_config is not None:
        from edgecompress.latency import keep_faster_

        keep_faster_(module, dense, report, inputs, latency_config)
    return report
