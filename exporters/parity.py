"""Numerical parity: the ONNX model on onnxruntime's CPU provider against PyTorch on the same inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn

from edgecompress import runtime


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """Worst absolute difference and relative L2 error (||actual - expected|| / ||expected||) over all samples."""

    max_abs_diff: float
    rel_error: float
    samples: int

    def within(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def compare(pairs: Iterable[tuple[np.ndarray, np.ndarray]], samples: int = 1) -> ParityResult:
    """Aggregate (actual, expected) output pairs in float64 into one ParityResult."""
    worst, sq_diff, sq_ref = 0.0, 0.0, 0.0
    for actual, expected in pairs:
        a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        worst = max(worst, float(np.abs(a - e).max(initial=0.0)))
        sq_diff += float(((a - e) ** 2).sum())
        sq_ref += float((e**2).sum())
    return ParityResult(worst, (sq_diff / sq_ref) ** 0.5 if sq_ref else sq_diff**0.5, samples)


def torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model.eval()(*inputs)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().cpu().numpy() for o in outs]


def check_parity(proto: onnx.ModelProto, model: nn.Module, samples: Sequence[Sequence[torch.Tensor]]) -> ParityResult:
    """Run ``proto`` on ORT CPU and ``model`` in torch on each sample (a tuple of inputs)."""
    session = runtime.make_session(proto, "cpu")
    pairs = (pair for inputs in samples
             for pair in zip(runtime.run(session, [x.numpy() for x in inputs]), torch_outputs(model, inputs)))
    return compare(pairs, len(samples))


def compare_models(model: nn.Module, reference: nn.Module, samples: Sequence[Sequence[torch.Tensor]]) -> ParityResult:
    """Two torch models on the same samples (e.g. factorized against dense)."""
    pairs = (pair for inputs in samples for pair in zip(torch_outputs(model, inputs), torch_outputs(reference, inputs)))
    return compare(pairs, len(samples))
