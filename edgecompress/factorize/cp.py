"""``cp``: CP decomposition of a conv weight (Lebedev et al. 2014) -> 1x1, depthwise per axis, 1x1.

``W [O, I, kh, kw] ~ sum_r l_r a_r(O) o b_r(I) o c_r(kh) o d_r(kw)``. Chain: conv 1x1 (I -> R) ->
depthwise conv kh x 1 -> depthwise conv 1 x kw -> conv 1x1 (R -> O, bias), stride/padding/dilation
split per axis onto the depthwise convs (Conv1d: one depthwise conv k). The weights ``l_r`` are
spread evenly over the four factors, so their value ranges match (int8 later).

CP-ALS as tensorly's ``parafac`` does it (SVD init, factors normalised every update, restarts), but
memory-aware: tensorly forms the Khatri-Rao product of all modes but one, ~7 GB for a 512x512x3x3
kernel at rank 1144 (measured.md). Here the two channel modes' MTTKRPs are two GEMMs on the weight
(``O*I*k*R`` multiply-adds each, intermediates of ``max(O, I)*k*R``) and the small spatial modes reuse
the second GEMM's result. ALS can diverge or degenerate (huge cancelling components): that is read
from the reconstruction error and the weights, the run is retried from random starts, then at half
the rank, and the layer is left dense (with the reason) when nothing healthy comes out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
import torch.nn as nn

from edgecompress.capture.stats import LayerStats
from edgecompress.factorize.base import SCREENING, SkipLayer, one_thread
from edgecompress.factorize.convs import (check_factorizable, copy_bias, explicit_pad, grouped_weight,
                                          pointwise_step, set_weight, spatial_step)
from edgecompress.factorize.layers import CPConv
from edgecompress.factorize.ranks import RankSpec, energy_rank, round_down, round_up, single_rank
from edgecompress.factorize.registry import Decomposition, register
from edgecompress.factorize.svd import delegate_linear, delegate_pointwise
from edgecompress.factorize.tucker import whitened_weight

log = logging.getLogger(__name__)

MAX_ITERATIONS = 25
# weights x rank x iterations: a layer above it gets fewer iterations (at least MIN_ITERATIONS). CREPE full's
# 128x1024x64 conv at rank 1720 and 512x256x64 at 2512 spent 130 s of a 193 s export in 37 ALS iterations;
# the sequential refit on data takes up what the last iterations would have gained (see docs/factorize.md)
MAX_WORK = 2e11
MIN_ITERATIONS = 8
TOLERANCE = 5e-4  # stop when an iteration improves the relative error by less than this
ATTEMPTS = (("svd", 0), ("random", 1), ("random", 2))  # the first start, then the restarts
DEGENERATE = 100.0  # a component this many times the tensor's norm means cancelling components
BIG_ALS = 1e9  # weights x rank: above it the ALS GEMMs run on every torch thread (CREPE full's 1024x128x64 conv)
MAX_ELEMENTS = 1 << 27  # largest ALS intermediate (float32 elements, 512 MiB): caps the rank


@dataclasses.dataclass
class CPResult:
    weights: torch.Tensor  # [R]
    factors: list[torch.Tensor]  # [O, R], [I, R], then one [k, R] per spatial axis; unit columns
    errors: list[float]  # relative error after each iteration, from the Gram matrices (stopping rule)
    init: str
    error: float = math.inf  # the final relative error, from the rebuilt tensor

    def rebuild(self) -> torch.Tensor:
        """The tensor ``[O, I, *k]`` this CP stands for."""
        a, b, *spatial = self.factors
        o, i, ks = a.shape[0], b.shape[0], [f.shape[0] for f in spatial]
        both = (b[:, None, :] * _khatri_rao(spatial)[None]).reshape(-1, a.shape[1])  # [(i, k), R]
        return ((a * self.weights) @ both.T).reshape(o, i, *ks)


def _init_factors(t: torch.Tensor, rank: int, init: str, gen: torch.Generator) -> list[torch.Tensor]:
    """tensorly's 'svd' init (leading singular vectors of each unfolding, random columns beyond the
    mode's size) or a normal random init."""
    factors = []
    for mode, size in enumerate(t.shape):
        extra = rank
        vectors = t.new_zeros(size, 0)
        if init == "svd":
            unfolded = t.movedim(mode, 0).reshape(size, -1).double()
            vectors = torch.linalg.eigh(unfolded @ unfolded.T)[1].flip(-1)[:, :rank].float()
            extra = rank - vectors.shape[1]
        factors.append(torch.cat([vectors, torch.randn(size, extra, generator=gen) / math.sqrt(size)], 1))
    return factors


def _solve(mttkrp: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``mttkrp @ gram^-1`` (gram symmetric PSD) by Cholesky, with a growing ridge if it is singular."""
    gram = gram.double()
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    for ridge in (1e-12, 1e-8, 1e-4):
        chol, info = torch.linalg.cholesky_ex(gram + ridge * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(mttkrp.double().T, chol).T.float()
    return (mttkrp.double() @ torch.linalg.pinv(gram)).float()


def _khatri_rao(spatial: list[torch.Tensor]) -> torch.Tensor:
    out = spatial[0]
    for f in spatial[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def _spatial_mttkrp(v: torch.Tensor, spatial: list[torch.Tensor], axis: int) -> torch.Tensor:
    """``v [R, *k]`` contracted with every spatial factor but ``axis``'s: ``[k_axis, R]``."""
    letters = "hwd"[: v.dim() - 1]
    others = [f"{letters[j]}r" for j in range(len(letters)) if j != axis]
    operands = [f for j, f in enumerate(spatial) if j != axis]
    return torch.einsum(f"r{letters}{''.join(',' + o for o in others)}->{letters[axis]}r", v, *operands)


def iteration_cap(t: torch.Tensor, rank: int) -> int:
    """ALS iterations for ``t`` at ``rank``: ``MAX_ITERATIONS``, fewer for layers whose work passes ``MAX_WORK``."""
    return int(min(MAX_ITERATIONS, max(MIN_ITERATIONS, MAX_WORK // (t.numel() * rank))))


def cp_als(t: torch.Tensor, rank: int, init: str = "svd", seed: int = 0, max_iterations: int | None = None,
           tolerance: float = TOLERANCE) -> CPResult:
    """CP-ALS of ``t [O, I, *k]`` (float32) at ``rank``; modes updated O, I, then the spatial ones, for at most
    ``max_iterations`` (default ``iteration_cap``)."""
    o, i, *ks = t.shape
    q = math.prod(ks)
    factors = _init_factors(t, rank, init, torch.Generator().manual_seed(seed))
    grams = [(f.T @ f).double() for f in factors]
    t_oqi, t_oi = t.reshape(o, i, q).transpose(1, 2).contiguous(), t.reshape(o, i * q)
    norm2 = float(t.double().pow(2).sum()) or 1.0
    errors: list[float] = []
    weights = torch.ones(rank)

    def update(mode: int, mttkrp: torch.Tensor) -> torch.Tensor:
        others = [g for n, g in enumerate(grams) if n != mode]
        f = _solve(mttkrp, math.prod(others[1:], start=others[0]))
        norms = f.norm(dim=0)
        factors[mode] = f / torch.where(norms > 0, norms, 1)
        grams[mode] = (factors[mode].T @ factors[mode]).double()
        return norms

    for _ in range(iteration_cap(t, rank) if max_iterations is None else max_iterations):
        k = _khatri_rao(factors[2:])  # [q, R]
        update(0, ((t_oqi @ factors[1]) * k).sum(1))
        z = (factors[0].T @ t_oi).reshape(rank, i, q)  # shared by the I mode and the spatial modes
        update(1, torch.bmm(z, k.T[:, :, None])[..., 0].T)  # batched products: no [R, I, q] temporary
        v = torch.bmm(factors[1].T[:, None, :], z)[:, 0].reshape(rank, *ks)
        for axis in range(len(ks)):
            mttkrp = _spatial_mttkrp(v, factors[2:], axis)
            weights = update(2 + axis, mttkrp)
        inner = float((weights.double() * (mttkrp.double() * factors[-1].double()).sum(0)).sum())
        model2 = float(weights.double() @ math.prod(grams[1:], start=grams[0]) @ weights.double())
        errors.append(max(norm2 - 2 * inner + model2, 0.0) ** 0.5 / norm2**0.5)
        if not math.isfinite(errors[-1]) or (len(errors) > 1 and errors[-2] - errors[-1] < tolerance):
            break
    result = CPResult(weights, factors, errors, init)
    result.error = float((result.rebuild() - t).norm()) / norm2**0.5
    return result


def diagnose(result: CPResult, norm: float) -> str | None:
    """Why ``result`` is not usable (diverged or degenerate), or None when it is healthy."""
    if not math.isfinite(result.error) or not all(torch.isfinite(f).all() for f in result.factors):
        return "non-finite values"
    if result.error > 1.0:
        return f"relative error {result.error:.3g} is worse than an all-zero kernel"
    if result.error > 1.05 * min(result.errors) + 1e-2:  # the per-iteration errors carry ~1e-3 of noise
        return f"the error rose from {min(result.errors):.3g} to {result.error:.3g}"
    if float(result.weights.max()) > DEGENERATE * norm:
        return f"degenerate components (weight {float(result.weights.max()):.3g} vs tensor norm {norm:.3g})"
    return None


# ALS iterations of a plan's screening (``SCREENING``): its candidates are ranked on a shorter fit, and the
# chosen one is fitted in full afterwards. resnet18's latency plan spent 37 s of its warm 85 s in the CP-ALS
# of layers 1-2's 48 candidates at 25 iterations
SCREEN_ITERATIONS = 8


def cp_decompose(t: torch.Tensor, rank: int) -> tuple[CPResult | None, list[str]]:
    """CP of ``t`` with restarts; (None, notes) when every start diverged."""
    notes: list[str] = []
    norm = float(t.norm())
    iterations = min(iteration_cap(t, rank), SCREEN_ITERATIONS) if SCREENING.get() else None
    for init, seed in ATTEMPTS:
        result = cp_als(t, rank, init, seed, max_iterations=iterations)
        problem = diagnose(result, norm)
        if problem is None:
            return result, notes
        notes.append(f"CP-ALS at rank {rank} from a {init} start (seed {seed}) failed: {problem}")
        log.warning(notes[-1])
    return None, notes


def cp_rank(spec: RankSpec, w: torch.Tensor) -> tuple[int, list[str]]:
    """One CP rank for every group of ``w [g, o, i, *k]``; 0 when none saves parameters."""
    g, o, i, *ks = w.shape
    numel = o * i * math.prod(ks)
    max_rank = min(numel // size for size in (o, i, *ks))  # any tensor has an exact CP this long
    per_rank = g * (o + i + sum(ks))
    if spec.energy is None:
        return single_rank(spec, max_rank, lambda r: r * per_rank, g * numel)
    rank = 0
    for mode in (1, 2):
        unfolded = w.movedim(mode, 1).reshape(g, w.shape[mode], -1)
        for values in torch.linalg.eigvalsh(unfolded @ unfolded.transpose(1, 2)).flip(-1).clamp_min(0).sqrt():
            rank = max(rank, energy_rank(values.numpy(), spec.energy))
    return round_up(rank, spec.multiple, max_rank), ["CP rank from --energy: the larger channel mode's energy rank"]


def _cap_rank(rank: int, o: int, i: int, q: int, multiple: int, notes: list[str]) -> int:
    cap = MAX_ELEMENTS // (max(o, i) * q)
    if rank > cap:
        notes.append(f"CP rank {rank} capped at {round_down(cap, multiple, cap)} to bound the ALS memory")
        return round_down(cap, multiple, cap)
    return rank


def _decompose_groups(w: torch.Tensor, rank: int, notes: list[str]) -> list[CPResult] | None:
    results = []
    for group in w.float():
        result, attempt_notes = cp_decompose(group, rank)
        notes.extend(attempt_notes)
        if result is None:
            return None
        results.append(result)
    return results


@register("cp", nn.Conv1d, nn.Conv2d)
def cp_conv(layer: nn.Module, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    """CP of a conv; on one torch thread unless its ALS GEMMs are big enough for two (``BIG_ALS``)."""
    w = grouped_weight(layer)
    rank = cp_rank(spec, w)[0] if not check_factorizable(layer).pointwise else 0
    with contextlib.nullcontext() if w.numel() * rank > BIG_ALS else one_thread():
        return _cp_conv(layer, spec, stats)


def _cp_conv(layer: nn.Module, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    """With data CP-ALS runs on the tensor whose input mode is whitened (as Tucker-2 does), and the input
    factor is mapped back, its column norms moved into the component weights."""
    geo = check_factorizable(layer)
    if geo.pointwise:
        return delegate_pointwise(layer, spec, "cp", stats)
    w, inverse = whitened_weight(layer, stats)
    g, o, i, *ks = w.shape
    rank, notes = cp_rank(spec, w)
    if rank < 1:
        raise SkipLayer(f"no CP rank saves parameters at {spec.describe()} ({o}x{i}x{'x'.join(map(str, ks))} per group)")
    rank = _cap_rank(rank, o, i, math.prod(ks), spec.multiple, notes)
    if rank * g * (o + i + sum(ks)) >= w.numel():  # say so before spending the ALS time
        raise SkipLayer(f"no rank saves parameters ({spec.describe()} gives CP rank {rank}: "
                        f"{rank * g * (o + i + sum(ks))} >= {w.numel()} weights)")
    iterations = iteration_cap(w[0], rank)
    if iterations < MAX_ITERATIONS:
        notes.append(f"CP-ALS held to {iterations} iterations at rank {rank} (a large layer)")
    results = _decompose_groups(w, rank, notes)
    if results is None and rank > 1:
        rank = round_down(rank // 2, spec.multiple, rank // 2)
        notes.append(f"falling back to rank {rank}")
        results = _decompose_groups(w, rank, notes)
    if results is None:
        raise SkipLayer(f"CP-ALS diverged at every start and at the fallback rank: {notes[-1]}")
    if inverse is not None:
        for result, inv in zip(results, inverse.float()):
            unwhitened = inv.T @ result.factors[1]
            norms = unwhitened.norm(dim=0).clamp_min(1e-30)
            result.factors[1], result.weights = unwhitened / norms, result.weights * norms
    # the weights spread evenly over the factors keep every step's value range alike
    scaled = [[f * r.weights.clamp_min(0) ** (1 / len(r.factors)) for f in r.factors] for r in results]
    stack = lambda n: torch.stack([s[n] for s in scaled])  # noqa: E731  [g, size, R]
    first = pointwise_step(geo, geo.in_channels, g * rank, g)
    set_weight(first, stack(1).transpose(1, 2))
    spatial = []
    for axis in range(geo.dims):
        step = spatial_step(geo, g * rank, g * rank, (axis,), g * rank)
        set_weight(step, stack(2 + axis).transpose(1, 2))
        spatial.append(step)
    last = pointwise_step(geo, g * rank, geo.out_channels, g, bias=layer.bias is not None)
    set_weight(last, stack(0))
    copy_bias(last, layer)
    if g > 1:
        notes.append(f"factorized per group ({g} groups)")
    details = {"cp_error": round(max(r.error for r in results), 6),
               "cp_iterations": max(len(r.errors) for r in results), "cp_init": results[0].init}
    return Decomposition(CPConv("cp", [first, *explicit_pad(geo), *spatial, last], g), notes, details)


@register("cp", nn.Linear)
def cp_linear(layer: nn.Linear, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    return delegate_linear(layer, spec, "cp", stats)
