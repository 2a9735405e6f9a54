"""What every factorized layer is and what the factorization of one layer records.

A ``FactorizedLayer`` is an ``nn.Module`` whose forward is a short chain of standard ops
(conv, matmul, reshape, transpose, add, gather), so that it exports to ONNX as small nodes.
Its ``method`` names it in ONNX node names (``module.path/method/k``) and in reports, and
``dense_weight()`` rebuilds the weight it stands for, in the original layer's layout, so that the
reconstruction error can be measured and tested.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
from typing import Any

import torch
import torch.nn as nn


class FactorizedLayer(nn.Module):
    """Base class of the factorized replacements; subclasses set ``method`` and implement both methods."""

    method: str = ""

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def ranks(self) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError


@contextlib.contextmanager
def one_thread():
    """Run a decomposition on one torch thread (restored after); also a decorator: ``@one_thread()``.
    Measured on the shared 2-core machine: two threads spent up to 8x the CPU time of one (OpenMP
    workers spinning while descheduled; an eigh of 576x576 took 4.1 s on 2 busy threads, 0.09 s on 1);
    unloaded, one thread costs less than 2x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# set while a plan scores one layer's candidates (``plan.allocate``): the decomposers may take a cheaper
# approximation of the same ranks (Tucker-2: truncated HOSVD, without HOOI sweeps; CP: fewer ALS sweeps).
# The chosen candidate is fitted in full afterwards.
SCREENING: contextvars.ContextVar[bool] = contextvars.ContextVar("screening", default=False)
# a dict the decomposers keep rank-independent work on one layer's weight in (an SVD's spectrum, keyed by
# ``fingerprint``): shared by every rank of a plan's ladder, its checks' chains and the chosen candidate's
# full fit, which computes the same spectrum from the same weight
MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("memo", default=None)


# set while chains are only run in torch, to fit or measure them, never traced for export (``in_torch_only``):
# a chain may then compute its outputs by an equivalent that is cheaper there. A TT chain costs 2-27x its
# dense layer's MACs and goes through a copy per core; its dense weight, rebuilt from the cores (a
# differentiable product), runs as one dense kernel instead.
IN_TORCH_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("in_torch_only", default=False)


@contextlib.contextmanager
def in_torch_only():
    """Chains run in this block are fitted or measured in torch, not exported (``IN_TORCH_ONLY``)."""
    token = IN_TORCH_ONLY.set(True)
    try:
        yield
    finally:
        IN_TORCH_ONLY.reset(token)


@contextlib.contextmanager
def sharing(memo: dict | None, screening: bool = False):
    """Fits in this block share ``memo`` (``MEMO``); ``screening``: they may also approximate (``SCREENING``)."""
    tokens = MEMO.set(memo), SCREENING.set(screening)
    try:
        yield
    finally:
        SCREENING.reset(tokens[1])
        MEMO.reset(tokens[0])


def fingerprint(t: torch.Tensor) -> tuple:
    """A key for ``MEMO`` (one layer's fits): shape, sum, sum of squares and a strided sample of
    ``t`` (a sha1 of every byte: 2 s of resnet18's latency plan, 1187 keys of up to 2.4M float64s)."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].double()
    return (tuple(t.shape), float(flat.double().sum()), float(flat.double().pow(2).sum()),
            hashlib.sha1(sample.numpy().tobytes()).hexdigest())


class SkipLayer(Exception):
    """Raised by a method's decomposer when a layer stays dense; the message is the reason."""


@dataclasses.dataclass
class LayerRecord:
    """One candidate layer: what it was, what was done, and what it cost before and after."""

    name: str
    type: str
    method: str  # the method used, or "dense" when left as it was
    ranks: list[int] = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    rel_error: float | None = None  # of the weight
    # on held-out calibration samples, relative: against the dense layer on the same (dense) inputs, and in
    # the compressed model (its own inputs) against the dense model; None without data
    output_error: float | None = None
    output_error_in_model: float | None = None
    # the in-model error after the activation the layer feeds (a ReLU, ReLU6, HardSwish..., ``capture.downstream``):
    # what the next layer sees, and what the data-aware refit fits; None when none follows or without data
    output_error_after_activation: float | None = None
    # the model's outputs on held-out samples with this layer fitted (and those before it), against dense
    model_output_error: float | None = None
    fit: str = "weights"  # "weights" (data-free), or what was fitted on data ("whitened + last step refit", ...)
    reason: str | None = None  # why it stayed dense
    notes: list[str] = dataclasses.field(default_factory=list)  # warnings: clamped ranks, padding, ...
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # mode shapes, variant, timings
    seconds: float = 0.0

    @property
    def compression(self) -> float:
        return self.params_before / self.params_after if self.params_after else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
