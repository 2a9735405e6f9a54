"""Calibration samples for data-aware factorization: read, checked, split into a fitting and a held-out part.

Samples are feeds ``{input name: array [N, ...]}`` cut into batches along the batch dimension, the same
for PyTorch and ONNX models. A PyTorch model has one input (``loading.InputSpec``); an ONNX model names
its own. The last eighth of the samples (at least one, when there are 8 or more) is held out: the
per-layer output errors and ``error_vs_dense`` are measured on it, never on the samples fitted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import ConfigError

Feed = dict[str, np.ndarray]
BATCH = 16  # samples per captured batch: bounds the memory a capture holds at once


@dataclasses.dataclass
class CalibrationSet:
    fit: list[Feed]
    held: list[Feed]
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fit_count(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.fit)

    @property
    def held_count(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.held)

    def evaluation(self) -> list[Feed]:
        """The held-out batches, or the fitted ones when nothing is held out (the notes say so)."""
        return self.held or self.fit

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "fit_samples": self.fit_count, "held_out_samples": self.held_count,
                "notes": list(self.notes)}


def calibration_set(arrays: Feed, source: str, limit: int | None = None, batch: int = BATCH) -> CalibrationSet:
    """Split ``{name: [N, ...]}`` into batches: the first ``N - N // 8`` samples (at most ``limit``) to fit,
    the last ``N // 8`` held out. Refuses empty data and NaN or Inf."""
    if not arrays:
        raise ConfigError(f"calibration data {source!r} is empty: it holds no arrays")
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"calibration data {source!r}: inputs hold different sample counts {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise ConfigError(f"calibration data {source!r} is empty: it holds 0 samples")
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise ConfigError(f"calibration data {source!r}: input {name!r} holds {bad} NaN or Inf values; "
                              "clean the data (every value must be finite)")
    held = n // 8 if n >= 8 else 0
    fit = n - held
    notes = []
    if limit is not None and fit > limit:
        fit = limit
    if not held:
        notes.append(f"only {n} calibration samples: none held out, so the output errors are measured on the "
                     "samples fitted (give 8 or more)")
    cut = lambda lo, hi: [{k: a[s:min(s + batch, hi)] for k, a in arrays.items()} for s in range(lo, hi, batch)]  # noqa: E731
    return CalibrationSet(cut(0, fit), cut(n - held, n), source, notes)


def read_calibration(path: str | Path, infos) -> Feed:
    """The samples of a ``--calib`` file or folder as ``{input name: [N, ...]}``, checked against the
    model's inputs (``calibration.InputInfo``): names, dtypes and fixed dimensions."""
    from edgecompress.calibration import load_samples_for

    samples = load_samples_for(path, infos)
    return {info.name: np.concatenate([s[info.name] for s in samples]) for info in infos}


CALIB_SAMPLES = 64


def torch_calibration(loaded, path: str | Path | None = None, count: int = CALIB_SAMPLES,
                      seed: int = 0) -> CalibrationSet | None:
    """Calibration samples for a PyTorch model (``loading.LoadedModel``): from ``path``, else the zoo entry's
    own training data where it ships some (``count`` samples, plus an eighth more held out), else None."""
    from edgecompress.calibration import InputInfo

    spec = loaded.input_spec
    if path is not None:
        info = InputInfo("input", (None, *spec.shape[1:]), np.dtype(spec.dtype))  # "float32" or "int64"
        return calibration_set(read_calibration(path, [info]), str(path), limit=count)
    from edgecompress.models import get_spec, list_models

    if loaded.name not in list_models() or get_spec(loaded.name).samples is None:
        return None
    samples = get_spec(loaded.name).samples(count + count // 7, seed, False)
    return calibration_set({"input": samples.numpy()}, f"zoo model {loaded.name!r} training data")


def onnx_calibration(model, path: str | Path, count: int = CALIB_SAMPLES) -> CalibrationSet:
    """Calibration samples for an ONNX model from ``path``, checked against its graph inputs."""
    from edgecompress.calibration import model_inputs

    return calibration_set(read_calibration(path, model_inputs(model)), str(path), limit=count)
