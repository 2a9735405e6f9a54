"""Fitting a factorized layer to data: the closed-form refit of its last step, and its output errors.

``refit_last_`` (Zhang, Zou, He, Sun, TPAMI 2016; AIMET's layer-wise reconstruction) solves the chain's
last linear step and its bias by ridge least squares: the features are what the steps before it make of
the layer's inputs in the compressed model, the targets are the dense layer's outputs on the dense model's
inputs, so errors from the layers before are corrected, not piled up. It works for every conv chain
(svd, svd-spatial, tucker, cp: the last conv, grouped or not, 1x1 or 1 x kw) and for low-rank Linears.
Chains whose last step is not a plain linear map of features (TT) get ``refine_``: a few L-BFGS steps on
the same loss, over all their parameters, kept only if the held-out error falls.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.capture.stats import LayerInputs
from edgecompress.factorize.base import FactorizedLayer
from edgecompress.factorize.layers import ConvChain, LowRankLinear

REFINE_BUDGET = 1 << 21  # target values the refine fits on (8 MB of float32)
REFINE_STEPS = 20  # digits TT-4x: 10 steps 97.8%, 20 steps 98.9%, 30 steps 98.9% (11, 15, 20 s)


def _last_and_prefix(chain: FactorizedLayer) -> tuple[nn.Module, nn.Module] | None:
    if isinstance(chain, LowRankLinear):
        return chain.second, chain.first
    if isinstance(chain, ConvChain):
        return chain.steps[-1], nn.Sequential(*list(chain.steps)[:-1])
    return None


def can_refit(chain: FactorizedLayer) -> bool:
    pair = _last_and_prefix(chain)
    return pair is not None and not (isinstance(pair[0], (nn.Conv1d, nn.Conv2d)) and isinstance(pair[0].padding, str))


def _features(last: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What ``last`` multiplies its weight with, as rows ``[positions, in/groups * kernel]`` per group
    (``[groups, positions, F]``)."""
    if isinstance(last, nn.Linear):
        return h.reshape(1, -1, h.shape[-1])
    g = last.groups
    if all(k == 1 for k in last.kernel_size) and all(s == 1 for s in last.stride) and not any(last.padding):
        rows = h.movedim(1, -1).reshape(-1, h.shape[1])
    else:  # a 1 x kw step (spatial SVD): im2col with the step's geometry
        cols = F.unfold(h, last.kernel_size, last.dilation, last.padding, last.stride)  # [N, C*k, L]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return rows.reshape(len(rows), g, -1).transpose(0, 1)


def _targets(last: nn.Module, y: torch.Tensor) -> torch.Tensor:
    g = 1 if isinstance(last, nn.Linear) else last.groups
    rows = y.reshape(-1, y.shape[-1]) if isinstance(last, nn.Linear) else y.movedim(1, -1).reshape(-1, y.shape[1])
    return rows.reshape(len(rows), g, -1).transpose(0, 1)


# shrinkage towards the decomposition's own last step, as a fraction of each feature's energy, chosen by
# cross-validation over the fitting batches (inf: the decomposition as it was). Fitted alone (no shrinkage)
# the refit overfits few samples: CREPE full's classifier sees one row per calibration tone, and a steady
# tone makes every row of a frame alike.
SHRINKAGE = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)
DEFAULT_SHRINKAGE = 1e-1  # when there is a single batch to fit


def _moments(last: nn.Module, prefix: nn.Module, x_current: torch.Tensor, y_dense: torch.Tensor,
             bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``H^T H`` and ``H^T Y`` of one batch (features with a ones column for the bias), float64."""
    h = _features(last, prefix(x_current))
    if bias:
        h = torch.cat([h, h.new_ones(*h.shape[:2], 1)], dim=2)
    y = _targets(last, y_dense)
    # float32 products of one batch (16 samples), summed in float64
    return (h.transpose(1, 2) @ h).double(), (h.transpose(1, 2) @ y).double()


@torch.no_grad()
def refit_last_(chain: FactorizedLayer, layer: nn.Module, inputs: LayerInputs) -> float:
    """Solve ``chain``'s last step (and bias) so that it maps its features on ``inputs.current`` to
    ``layer``'s outputs on ``inputs.dense``, in place: ridge least squares shrunk towards the step the
    decomposition gave, by the shrinkage that predicts left-out batches best. Returns that shrinkage."""
    last, prefix = _last_and_prefix(chain)
    bias = last.bias is not None
    targets = inputs.targets if inputs.targets is not None else [layer(x) for x in inputs.dense]
    parts = [_moments(last, prefix, c, y, bias) for c, y in zip(inputs.current, targets)]
    gram, cross = sum(p[0] for p in parts), sum(p[1] for p in parts)
    g, f = gram.shape[0], gram.shape[1] - bias
    prior = last.weight.detach().double().reshape(g, last.weight.shape[0] // g, f).transpose(1, 2)  # [g, F, O/g]
    if bias:
        prior = torch.cat([prior, last.bias.detach().double().reshape(g, 1, -1)], dim=1)

    def solve(alpha: float, gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        if math.isinf(alpha):
            return prior
        scale = alpha * gram.diagonal(dim1=1, dim2=2).clamp_min(1e-30)  # [g, F]
        shrunk = gram.clone()
        shrunk.diagonal(dim1=1, dim2=2).add_(scale)
        return torch.linalg.solve(shrunk, cross + scale[:, :, None] * prior)

    def left_out_error(alpha: float) -> float:
        total = 0.0
        for part_gram, part_cross in parts:
            theta = solve(alpha, gram - part_gram, cross - part_cross)
            total += float((theta * (part_gram @ theta)).sum() - 2 * (theta * part_cross).sum())
        return total

    alpha = min(SHRINKAGE, key=left_out_error) if len(parts) > 1 else DEFAULT_SHRINKAGE
    solution = solve(alpha, gram, cross)
    weight = solution[:, :f].transpose(1, 2).reshape(last.weight.shape[0], -1)
    last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight.dtype))
    if bias:
        last.bias.copy_(solution[:, f].reshape(-1).to(last.bias.dtype))
    return alpha


@torch.no_grad()
def output_errors(chain: nn.Module, layer: nn.Module, inputs: LayerInputs) -> tuple[float, float]:
    """Relative output errors of ``chain`` against ``layer`` on the held-out inputs (the fitted ones when
    none are held out): (on the same dense inputs, in the compressed model against the dense model)."""
    held = bool(inputs.held_dense)
    dense, current = (inputs.held_dense, inputs.held_current) if held else (inputs.dense, inputs.current)
    targets = inputs.held_targets if held else inputs.targets
    targets = targets if targets is not None else [layer(x) for x in dense]
    local = in_model = energy = 0.0
    for x_dense, x_current, y in zip(dense, current, targets):
        y = y.double()
        energy += float(y.pow(2).sum())
        local_part = float((chain(x_dense).double() - y).pow(2).sum())
        local += local_part
        in_model += local_part if x_current is x_dense else float((chain(x_current).double() - y).pow(2).sum())
    energy = energy or 1e-30
    return math.sqrt(local / energy), math.sqrt(in_model / energy)


def _within_budget(currents: list[torch.Tensor], targets: list[torch.Tensor]):
    """The first samples whose targets hold at most ``REFINE_BUDGET`` values (at least one sample): each
    L-BFGS step runs the chain forward and backward on them (resnet18 at 224, all 64 samples: minutes a layer)."""
    kept_x, kept_y, used = [], [], 0
    for x, y in zip(currents, targets):
        per_sample = y[0].numel()
        room = max(1 if not kept_y else 0, (REFINE_BUDGET - used) // per_sample)
        if room == 0:
            break
        kept_x.append(x[:room])
        kept_y.append(y[:room])
        used += per_sample * len(kept_y[-1])
    return kept_x, kept_y


def refine_(chain: FactorizedLayer, layer: nn.Module, inputs: LayerInputs, steps: int = REFINE_STEPS) -> bool:
    """L-BFGS on ``||chain(current) - layer(dense)||^2`` over all of ``chain``'s parameters; the chain is
    changed only if its held-out in-model error falls. Returns whether it was."""
    with torch.no_grad():
        targets = inputs.targets if inputs.targets is not None else [layer(x) for x in inputs.dense]
    currents, targets = _within_budget(inputs.current, targets)
    before = output_errors(chain, layer, inputs)[1]
    trial = copy.deepcopy(chain).train()
    params = [p for p in trial.parameters()]
    for p in params:
        p.requires_grad_(True)
    norm = sum(float(t.pow(2).sum()) for t in targets) or 1.0
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum((trial(x) - t).pow(2).sum() for x, t in zip(currents, targets)) / norm
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    for p in params:
        p.requires_grad_(False)
    trial.eval()
    if output_errors(trial, layer, inputs)[1] < before:
        chain.load_state_dict(trial.state_dict())
        return True
    return False
