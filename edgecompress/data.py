"""Evaluation and fine-tuning data for ``run``: an ``.npz`` file, or the bundled digits set.

A ``--data`` file holds the model's inputs under the input's name (or as its only array),
``labels`` (optional: without them only agreement with the dense model and SQNR are reported),
and optionally ``train_inputs`` / ``train_labels`` for fine-tuning and int8 calibration; without a
train part those use the evaluation inputs themselves, and the report says so. Inputs are stacked
along the model's batch dimension: ``[N, *input_shape[1:]]``. The same file works with
``edgecompress bench --data`` (which reads the inputs and ``labels``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgecompress import io
from edgecompress.errors import ConfigError
from edgecompress.loading import DTYPES, InputSpec

_TRAIN_KEYS = ("train_inputs", "train_labels")


@dataclasses.dataclass
class RunData:
    """Evaluation inputs and labels, and an optional separate train part (fine-tuning, calibration)."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    source: str = ""

    @property
    def train_is_eval(self) -> bool:
        return self.x_train is None

    def train(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.x, self.y) if self.x_train is None else (self.x_train, self.y_train)

    def eval(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.x[:limit], (self.y[:limit] if self.y is not None else None)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.x), "labels": self.y is not None,
                "train_samples": None if self.x_train is None else len(self.x_train)}


def default_data(model_name: str) -> RunData | None:
    """The bundled held-out set (and train split) for the bundled digits model; None for others."""
    if model_name != "digits_cnn":
        return None
    from edgecompress.models import digits

    x, y = digits.load_digits("test")
    x_train, y_train = digits.load_digits("train")
    return RunData(x, y, x_train, y_train, "bundled UCI digits: held-out split (train split for fine-tuning)")


def load_data(path: str | Path, spec: InputSpec) -> RunData:
    """Read a ``--data`` file and check it against the model's input ``spec``."""
    arrays = io.read_npz(path)
    labels = arrays.pop("labels", None)
    train = {k: arrays.pop(k) for k in _TRAIN_KEYS if k in arrays}
    if len(arrays) != 1:
        raise ConfigError(f"data file {str(path)!r} must hold one input array (plus optional labels, train_inputs, "
                          f"train_labels); it has {sorted(arrays) or 'none'}")
    x = _inputs(next(iter(arrays.values())), spec, path)
    y = _labels(labels, len(x), path, "labels")
    x_train = _inputs(train["train_inputs"], spec, path) if "train_inputs" in train else None
    y_train = _labels(train.get("train_labels"), len(x_train) if x_train is not None else 0, path, "train_labels")
    if y_train is not None and x_train is None:
        raise ConfigError(f"data file {str(path)!r} has train_labels but no train_inputs")
    return RunData(x, y, x_train, y_train, str(path))


def _inputs(array: np.ndarray, spec: InputSpec, path) -> torch.Tensor:
    if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]) or len(array) == 0:
        raise ConfigError(f"data file {str(path)!r}: inputs have shape {list(array.shape)}, the model takes "
                          f"[N, {', '.join(map(str, spec.shape[1:]))}] (N >= 1 samples)")
    return torch.as_tensor(np.ascontiguousarray(array)).to(DTYPES[spec.dtype])


def _labels(labels: np.ndarray | None, count: int, path, key: str) -> torch.Tensor | None:
    if labels is None:
        return None
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"data file {str(path)!r}: {key} must be {count} integer class ids, got "
                          f"{labels.dtype} of shape {list(labels.shape)}")
    return torch.as_tensor(labels.astype(np.int64))


def run_onnx(path: str | Path, x: np.ndarray, provider: str = "cpu", threads: int | None = None) -> np.ndarray:
    """The first output of the ONNX model at ``path`` on ``x`` ([N, ...]), in chunks of its batch size."""
    from edgecompress import runtime

    session = runtime.make_session(path, provider, threads)
    first = session.get_inputs()[0]
    batch = first.shape[0] if isinstance(first.shape[0], int) and first.shape[0] > 0 else len(x)
    outputs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        short = batch - len(chunk)
        if short:  # a fixed batch: pad the last chunk and drop the padding's outputs
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
        outputs.append(session.run(None, {first.name: chunk})[0][: batch - short])
    return np.concatenate(outputs)
