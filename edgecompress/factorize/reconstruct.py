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
import dataclasses
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.capture.downstream import Activation
from edgecompress.capture.stats import LayerInputs
from edgecompress.factorize.base import FactorizedLayer, in_torch_only
from edgecompress.factorize.layers import ConvChain, LowRankLinear

log = logging.getLogger(__name__)

REFINE_BUDGET = 1 << 18  # target values the refine fits on (1 MB of float32)
REFINE_STEPS = 20  # digits TT-4x: 10 steps 97.8%, 20 steps 98.9%, 30 steps 98.9% (11, 15, 20 s)
# multiply-adds one refine may spend: REFINE_PASSES dense passes of the layer over its fitting samples, at least
# REFINE_MACS_FLOOR, at most REFINE_MACS. A chain dearer than that gets fewer samples (spread over all of them),
# then fewer steps (at least MIN_REFINE_STEPS). resnet18 at 224, TT 4x, 64 samples: the first 10 samples and
# 20 steps took 2-7 s a layer, 545 s a plan; held to 4 passes (3e10 MACs) 0.4-1.3 s a layer, 31 s a plan, at
# the same held-out errors (within 0.03). The price is CREPE full's, whose TT chains cost 3-12x their dense
# convs (conv2: 12.5 GMAC a sample, the dense conv 1.1): conv2 gets 1 sample and 5 steps, conv3-6 the floor
# (1-2 samples); tt 4x RPA 2.5% in a 57 s build (the flat 3e11 of before: 67.5%, 162 s; a floor of 3e11: 58.5%,
# 77 s; data-free 4.5%; at 0.08x dense speed TT is no variant to ship there). digits' small layers get the
# floor: 98.1-98.3% in 5 s (all 64 samples: 98.6%, 20 s)
REFINE_PASSES = 4
REFINE_MACS_FLOOR = 3e10
REFINE_MACS = 3e11
MIN_REFINE_STEPS = 3


def _last_and_prefix(chain: FactorizedLayer) -> tuple[nn.Module, nn.Module] | None:
    if isinstance(chain, LowRankLinear):
        return chain.second, chain.first
    if isinstance(chain, ConvChain):
        return chain.steps[-1], nn.Sequential(*list(chain.steps)[:-1])
    return None


# the most features (the last step's inputs per group: channels x kernel taps) a closed-form refit solves for:
# its ridge solves are cubic in them (CREPE tiny's input-side SVD conv2, 56 x 64 = 3584 features: 32 s of solves
# for one layer); a chain with more gets ``refine_`` instead
REFIT_FEATURES = 2048


def _feature_count(last: nn.Module) -> int:
    if isinstance(last, nn.Linear):
        return last.in_features
    return last.in_channels // last.groups * math.prod(last.kernel_size)


def can_refit(chain: FactorizedLayer) -> bool:
    pair = _last_and_prefix(chain)
    if pair is None or _feature_count(pair[0]) > REFIT_FEATURES:
        return False
    return not (isinstance(pair[0], (nn.Conv1d, nn.Conv2d)) and isinstance(pair[0].padding, str))


def _features(last: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What ``last`` multiplies its weight with, as rows ``[positions, in/groups * kernel]`` per group
    (``[groups, positions, F]``)."""
    if isinstance(last, nn.Linear):
        return h.reshape(1, -1, h.shape[-1])
    g = last.groups
    if all(k == 1 for k in last.kernel_size) and all(s == 1 for s in last.stride) and not any(last.padding):
        rows = h.movedim(1, -1).reshape(-1, h.shape[1])
    else:  # a step with a kernel (spatial SVD's 1 x kw, input-side SVD's k): im2col with the step's geometry
        geometry = (last.kernel_size, last.dilation, last.padding, last.stride)
        if h.dim() == 3:  # Conv1d: as a Conv2d of height 1
            h, geometry = h.unsqueeze(2), tuple((1, *v) for v in geometry)
        cols = F.unfold(h, *geometry)  # [N, C*k, L]
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


@dataclasses.dataclass
class Refit:
    """What ``refit_last_`` did: the ridge shrinkage it chose (inf: the decomposition's step kept), and whether
    the step was then fitted through the layer's activation, with the held-out errors after it, before and
    after."""

    shrinkage: float
    rectified: bool = False
    rectified_error: tuple[float, float] | None = None

    @property
    def changed(self) -> bool:
        return self.rectified or not math.isinf(self.shrinkage)


@torch.no_grad()
def refit_last_(chain: FactorizedLayer, layer: nn.Module, inputs: LayerInputs) -> Refit:
    """Solve ``chain``'s last step (and bias) so that it maps its features on ``inputs.current`` to
    ``layer``'s outputs on ``inputs.dense``, in place: ridge least squares shrunk towards the step the
    decomposition gave, by the shrinkage that predicts left-out batches best. Where the layer feeds an
    activation (``inputs.downstream``) the step is then fitted to the activated outputs (``_Rectified``), and
    kept so if its held-out error after the activation is lower."""
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
    result = Refit(alpha)
    if fits_through(inputs.downstream):
        held_targets = inputs.held_targets if inputs.held_targets is not None else [layer(x) for x in inputs.held_dense]
        rectified = _Rectified(last, prefix, inputs, g, bias, targets, held_targets)
        # a step the linear refit left alone may still move: the rectified fit gets at least this much room
        candidate = rectified.fit(solution, lambda c: solve(min(alpha, RECTIFIED_SHRINKAGE), gram, c))
        before, after = rectified.held_error(solution), rectified.held_error(candidate)
        result.rectified_error = (round(before, 6), round(after, 6))
        if after < before:
            solution, result.rectified = candidate, True
    weight = solution[:, :f].transpose(1, 2).reshape(last.weight.shape[0], -1)
    last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight.dtype))
    if bias:
        last.bias.copy_(solution[:, f].reshape(-1).to(last.bias.dtype))
    return result


def fits_through(downstream) -> bool:
    """Whether the last step is fitted through the activation ``downstream`` names: a piecewise one. A smooth
    one (GELU, SiLU) is measured through, not fitted through: a Newton z-step made the fit 3-9x slower for
    nothing measured (Magika svd 2x/4x 99.71%/84.12% -> 99.71%/84.41%, 1 to 3 of its 3 layers kept it;
    ddddocr's YOLO detector, 0 to 3 of 74 SiLU layers, the same whole-model error, 120 s -> 172-286 s)."""
    return downstream is not None and downstream.rectifier is not None and bool(downstream.rectifier.activation.pieces)


# the rectified fit (Zhang et al. 2016, section 3.2): min ||act(t) - act(z)||^2 + lam ||z - H theta||^2 by
# turns, z in closed form per value (``z_step``: any piecewise ``Activation``), theta by the ridge solve; lam
# grows round by round so that z ends on H theta. CREPE full, conv3 alone at svd 4x: RPA 97.75% linear, 99.75%
# rectified (18 rounds; 5 measured alike).
RECTIFIED_ROUNDS = (0.03, 0.1, 0.3, 1.0, 3.0)
RECTIFIED_SHRINKAGE = 1e-2
FEATURE_CACHE = 256 << 20  # bytes of features kept between rounds; beyond that they are recomputed
# output values the rounds work on: a layer with more (a stem at 224: 64 samples x 112 x 112 x 64 = 51M) fits on
# a seeded sample of its output pixels; resnet18's conv1 took 50 s of a 90 s cp plan, all of them. CREPE's
# layers have at most 1M and fit on all
RECTIFIED_VALUES = 1 << 22


class _Rectified:
    """The batches of a rectified fit: features of the last step, the per-channel affine before the activation,
    and the activation."""

    def __init__(self, last: nn.Module, prefix: nn.Module, inputs: LayerInputs, groups: int, bias: bool,
                 targets: list[torch.Tensor], held_targets: list[torch.Tensor]):
        self.last, self.prefix, self.bias = last, prefix, bias
        outputs = last.weight.shape[0]
        rect = inputs.downstream.rectifier
        scale = torch.ones(outputs, dtype=torch.float64) if rect.scale is None else rect.scale.double()
        shift = torch.zeros(outputs, dtype=torch.float64) if rect.shift is None else rect.shift.double()
        # a channel the affine nearly zeroes carries nothing after it: fitted linearly (scale 1, no activation)
        self.linear = (scale.abs() <= 1e-6 * float(scale.abs().max().clamp_min(1e-30))).reshape(groups, 1, -1)
        self.scale = scale.reshape(groups, 1, -1).masked_fill(self.linear, 1.0)
        self.shift = shift.reshape(groups, 1, -1).masked_fill(self.linear, 0.0)
        self.activation = rect.activation
        # HardSwish's z-step (cubic roots) in float32: 2-3x faster than in float64 (ocr_cls, 660k values a batch:
        # 4.4 s of a 10 s build), each value within 2e-6 of its least cost; the linear pieces' is cheap in float64
        self.z_dtype = torch.float32 if any(p.quadratic for p in rect.activation.pieces) else torch.float64
        self.fit_batches = list(zip(inputs.current, targets))
        values = sum(y.numel() for y in targets)
        self.share = min(1.0, RECTIFIED_VALUES / max(values, 1))  # of each fitting batch's pixels
        held = bool(inputs.held_current)
        self.held_batches = list(zip(inputs.held_current, held_targets)) if held else self.fit_batches
        size = sum(x.numel() for x in inputs.current) * 4  # a rough bound of the features' bytes
        self._cache = {} if size <= FEATURE_CACHE else None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        h = _features(self.last, self.prefix(x)).double()
        return torch.cat([h, h.new_ones(*h.shape[:2], 1)], dim=2) if self.bias else h

    def _pre(self, y: torch.Tensor) -> torch.Tensor:
        return _targets(self.last, y).double() * self.scale + self.shift

    def _batch(self, key, x: torch.Tensor, y: torch.Tensor, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and pre-activations of a batch (kept between rounds within ``FEATURE_CACHE``), on a
        seeded ``share`` of its pixels."""
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        h, pre = self._features(x), self._pre(y)
        if share < 1.0:
            rows = h.shape[1]
            keep = torch.randperm(rows, generator=torch.Generator().manual_seed(key[1]))
            keep = keep[:max(1, math.ceil(rows * share))].sort().values
            h, pre = h[:, keep], pre[:, keep]
        if self._cache is not None:
            self._cache[key] = h, pre
        return h, pre

    def fit(self, start: torch.Tensor, solve) -> torch.Tensor:
        theta = start
        for lam in RECTIFIED_ROUNDS:
            cross = 0.0
            for k, (x, y) in enumerate(self.fit_batches):
                h, pre = self._batch(("fit", k), x, y, self.share)
                u = (h @ theta) * self.scale + self.shift
                z = z_step(self.activation, self.activation(pre).to(self.z_dtype), u.to(self.z_dtype), lam).double()
                z = torch.where(self.linear, pre, z)
                # over a share of the pixels: scaled to estimate the whole cross-moment that the gram goes with
                cross = cross + h.transpose(1, 2) @ ((z - self.shift) / self.scale) / self.share
            theta = solve(cross)
        if self._cache is not None:
            self._cache = {k: v for k, v in self._cache.items() if k[0] == "held"}
        return theta

    def held_error(self, theta: torch.Tensor) -> float:
        """Relative error of the rectified outputs on the held-out batches (the fitted ones when none)."""
        error = energy = 0.0
        for k, (x, y) in enumerate(self.held_batches):
            h, pre = self._batch(("held", k), x, y)
            target = self.activation(pre)
            u = self.activation((h @ theta) * self.scale + self.shift)
            error += float((u - target).pow(2).sum())
            energy += float(target.pow(2).sum())
        return math.sqrt(error / (energy or 1e-30))


@dataclasses.dataclass(frozen=True)
class HeldErrors:
    """Relative output errors of a chain on the held-out inputs (the fitted ones when none are held out):
    on the same dense inputs as the dense layer (``local``), in the compressed model against the dense model
    (``in_model``), and the same after the activation the layer feeds (``after_activation``; None where none
    follows)."""

    local: float
    in_model: float
    after_activation: float | None = None

    @property
    def seen(self) -> float:
        """What the next layer sees: the error after the activation where there is one, else in the model."""
        return self.in_model if self.after_activation is None else self.after_activation


@torch.no_grad()
@in_torch_only()
def held_errors(chain: nn.Module, layer: nn.Module, inputs: LayerInputs) -> HeldErrors:
    """``chain``'s ``HeldErrors``, from one pass on each held-out batch (two where the compressed model's
    inputs differ from the dense model's)."""
    rectifier = inputs.downstream.rectifier if inputs.downstream is not None else None
    held = bool(inputs.held_dense)
    dense, current = (inputs.held_dense, inputs.held_current) if held else (inputs.dense, inputs.current)
    targets = inputs.held_targets if held else inputs.targets
    targets = targets if targets is not None else [layer(x) for x in dense]
    local = in_model = activated = energy = activated_energy = 0.0
    for x_dense, x_current, y in zip(dense, current, targets):
        y_local = chain(x_dense)
        y_model = y_local if x_current is x_dense else chain(x_current)
        apart = _energy(y_local - y)
        local += apart
        in_model += apart if y_model is y_local else _energy(y_model - y)
        energy += _energy(y)
        if rectifier is not None:
            t = rectified(rectifier, layer, y)
            activated += _energy(rectified(rectifier, layer, y_model) - t)
            activated_energy += _energy(t)
    energy = energy or 1e-30
    return HeldErrors(math.sqrt(local / energy), math.sqrt(in_model / energy),
                      None if rectifier is None else math.sqrt(activated / (activated_energy or 1e-30)))


def _energy(t: torch.Tensor) -> float:
    """The sum of squares of ``t``, accumulated in float64."""
    return float(t.pow(2).sum(dtype=torch.float64))


def _refine_set(chain: nn.Module, layer: nn.Module, currents: list[torch.Tensor], targets: list[torch.Tensor],
                steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The samples the refine fits on, evenly spaced over all of them, and its L-BFGS steps: at most
    ``REFINE_BUDGET`` target values and ``_refine_macs`` multiply-adds (then fewer steps, at least
    ``MIN_REFINE_STEPS``). Fixed by the data, so a plan and its ``--config`` fit alike."""
    xs = [x[i : i + 1] for x in currents for i in range(len(x))]
    ys = [y[i : i + 1] for y in targets for i in range(len(y))]
    with torch.no_grad():
        budget = _refine_macs(layer, xs[0], len(xs))
    count, steps = _fitting(chain, xs[0], ys[0].numel(), len(ys), budget, steps)
    chosen = sorted({round(i) for i in np.linspace(0, len(ys) - 1, count)})
    if count < len(ys) or steps < REFINE_STEPS:
        log.info("refine held to %d of %d samples and %d L-BFGS steps (%.3g MACs)", len(chosen), len(ys), steps,
                 budget)
    return torch.cat([xs[i] for i in chosen]), torch.cat([ys[i] for i in chosen]), steps


def _refine_macs(layer: nn.Module, x: torch.Tensor, samples: int) -> float:
    """Multiply-adds one refine may spend: ``REFINE_PASSES`` dense passes of the layer over its fitting
    samples, within ``[REFINE_MACS_FLOOR, REFINE_MACS]``."""
    from edgecompress.stats import count_macs

    dense = count_macs(layer, [x])[0] * samples
    return min(REFINE_MACS, max(REFINE_MACS_FLOOR, REFINE_PASSES * dense))


def _fitting(chain: nn.Module, probe: torch.Tensor, values: int, samples: int, budget: float,
             steps: int) -> tuple[int, int]:
    """``(samples, steps)`` of a refine on samples like ``probe`` (``values`` targets each, at most
    ``samples`` of them) within ``REFINE_BUDGET`` values and ``budget`` multiply-adds."""
    from edgecompress.stats import count_macs

    with torch.no_grad():  # L-BFGS's line search makes about 1.25 evaluations a step, each about 3 forwards
        per_step = 3 * 1.25 * count_macs(chain, [probe])[0]
    count = max(1, min(samples, REFINE_BUDGET // values, int(budget // (per_step * steps))))
    if per_step * count * steps > budget:
        steps = max(MIN_REFINE_STEPS, min(steps, int(budget // (per_step * count))))
    return count, steps


def rectified(rectifier, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``activation(scale * y + shift)`` per output channel of ``layer`` (``y`` as it returns it); ``y`` itself
    when ``rectifier`` is None."""
    if rectifier is None:
        return y
    shape = [1] * y.dim()
    shape[-1 if isinstance(layer, nn.Linear) else 1] = -1
    if rectifier.scale is not None:
        y = y * rectifier.scale.reshape(shape).to(y.dtype)
    if rectifier.shift is not None:
        y = y + rectifier.shift.reshape(shape).to(y.dtype)
    return rectifier.activation(y)


def z_step(activation: Activation, target: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """Per value, ``argmin_z (target - activation(z))^2 + lam (z - u)^2``: the best of each piece's own minimum.
    A linear piece's is its clamped least-squares point; HardSwish's quadratic piece's is a real root of the
    cubic its derivative makes, clamped (its ends are its neighbours' too: the activation is continuous)."""
    best = cost = None
    for piece in activation.pieces:
        if piece.quadratic:
            candidates = _cubic_roots(target, u, lam)
        else:
            p, q = piece.slope, piece.offset
            candidates = [(p * (target - q) + lam * u) / (p * p + lam)]
        for z in candidates:
            z = z.clamp(piece.low, piece.high)
            c = (target - piece(z)).pow(2) + lam * (z - u).pow(2)
            if best is None:
                best, cost = z, c
            else:  # a tie goes to the later piece (a ReLU's: the positive side)
                better = c <= cost
                best, cost = torch.where(better, z, best), torch.where(better, c, cost)
    return best


def _cubic_roots(target: torch.Tensor, u: torch.Tensor, lam: float) -> list[torch.Tensor]:
    """The real roots (one, or three) of ``d/dz [(t - z (z + 3) / 6)^2 + lam (z - u)^2] = 0``, a cubic
    ``z^3 + 4.5 z^2 + (4.5 - 6 t + 18 lam) z - 9 t - 18 lam u``; with ``z = y - 1.5`` it is ``y^3 + p y + q``,
    ``p = 18 lam - 2.25 - 6 t``, ``q = -9 lam (3 + 2 u)`` (Cardano where one root is real, else the
    trigonometric form)."""
    p, q = 18 * lam - 2.25 - 6 * target, -9 * lam * (3 + 2 * u)
    disc = (q / 2).pow(2) + (p / 3).pow(3)
    root = disc.clamp_min(0).sqrt()
    one = _cbrt(-q / 2 + root) + _cbrt(-q / 2 - root) - 1.5
    three = disc < 0
    if not bool(three.any()):
        return [one]
    negative = p.clamp_max(-1e-12)
    m = 2 * (-negative / 3).sqrt()
    angle = torch.acos((3 * q / (negative * m)).clamp(-1, 1)) / 3
    return [torch.where(three, m * torch.cos(angle - 2 * math.pi * k / 3) - 1.5, one) for k in range(3)]


def _cbrt(x: torch.Tensor) -> torch.Tensor:
    return x.sign() * x.abs().pow(1 / 3)


@in_torch_only()
def refine_(chain: FactorizedLayer, layer: nn.Module, inputs: LayerInputs,
            steps: int = REFINE_STEPS) -> tuple[bool, HeldErrors]:
    """L-BFGS on ``||chain(current) - layer(dense)||^2`` over all of ``chain``'s parameters (both through the
    layer's activation where it feeds one: ``inputs.downstream``), on ``_refine_set``'s samples; the chain is changed
    only if its held-out in-model error falls. Returns whether it was, and the chain's held-out errors."""
    rectifier = inputs.downstream.rectifier if inputs.downstream is not None else None
    with torch.no_grad():
        targets = inputs.targets if inputs.targets is not None else [layer(x) for x in inputs.dense]
    x, target, steps = _refine_set(chain, layer, inputs.current, targets, steps)
    target = rectified(rectifier, layer, target)
    before = held_errors(chain, layer, inputs)
    trial = copy.deepcopy(chain).train()
    params = [p for p in trial.parameters()]
    for p in params:
        p.requires_grad_(True)
    norm = float(target.pow(2).sum()) or 1.0
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (rectified(rectifier, layer, trial(x)) - target).pow(2).sum() / norm
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    for p in params:
        p.requires_grad_(False)
    trial.eval()
    after = held_errors(trial, layer, inputs)
    if after.seen < before.seen:
        chain.load_state_dict(trial.state_dict())
        return True, after
    return False, before
