"""``tucker``: Tucker-2 of a conv weight (Kim et al., ICLR 2016) -> conv 1x1, core conv k, conv 1x1.

``W [O, I, *k] ~ G x_0 U_out x_1 U_in`` with orthonormal ``U_out [O, R_out]``, ``U_in [I, R_in]`` and
core ``G [R_out, R_in, *k]``, computed by tensorly's ``partial_tucker`` on modes 0 and 1 (HOSVD init,
then a few HOOI sweeps) with its PyTorch backend, in float64. Chain: conv 1x1 (I -> R_in) -> conv k (R_in -> R_out,
the original stride/padding/dilation) -> conv 1x1 (R_out -> O, bias): three Conv nodes. Grouped convs
are factorized per group; a 1x1 conv gets channel SVD; on a Linear ``tucker`` is its SVD.

Ranks: ``--ratio`` scales both ranks in proportion to the channel counts (``R_out/O = R_in/I``, a
mode narrower than ``--rank-multiple`` kept whole when the budget allows);
``--energy`` keeps that energy of each mode's HOSVD spectrum; ``--rank`` is used for both modes.
"""

from __future__ import annotations

import math

import tensorly as tl
import torch
import torch.nn as nn
from tensorly.decomposition import partial_tucker

from edgecompress.capture.stats import LayerStats
from edgecompress.factorize.base import MEMO, SCREENING, SkipLayer, fingerprint, one_thread
from edgecompress.factorize.convs import (check_factorizable, copy_bias, explicit_pad, grouped_weight,
                                          pointwise_step, set_weight, spatial_step)
from edgecompress.factorize.layers import TuckerConv
from edgecompress.factorize.ranks import RankSpec, energy_rank, round_down, round_up
from edgecompress.factorize.registry import Decomposition, register
from edgecompress.factorize.svd import delegate_linear, delegate_pointwise

HOOI_SWEEPS = 3
HOOI_TOL = 1e-4  # stop when a sweep improves the relative error by less than this


def _top_vectors(unfolded: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values, leading left singular vectors) of each ``[m, n]`` in ``unfolded [g, m, n]``; a plan's
    ladder of ranks shares them (``MEMO``: resnet18's latency plan ran 316 of these eigh, 12 s, for 40)."""
    memo = MEMO.get()
    key = ("top-vectors", fingerprint(unfolded)) if memo is not None else None
    if key is not None and key in memo:
        values, vectors = memo[key]
    else:
        values, vectors = torch.linalg.eigh(unfolded @ unfolded.transpose(1, 2))
        values, vectors = values.flip(-1).clamp_min(0).sqrt(), vectors.flip(-1)
        if key is not None:
            memo[key] = values, vectors
    return values, vectors if rank is None else vectors[..., :rank]


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding (mode 0: out channels, 1: in channels) of each group of ``w [g, o, i, *k]``."""
    return w.movedim(mode + 1, 1).reshape(w.shape[0], w.shape[mode + 1], -1)


def tucker2(w: torch.Tensor, rank_out: int, rank_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Tucker-2 of ``w [g, o, i, *k]`` (float64) by tensorly's ``partial_tucker`` on modes 0 and 1 (HOSVD
    init, a few HOOI sweeps), group by group: (core [g, R_out, R_in, *k], U_out [g, o, R_out],
    U_in [g, i, R_in], relative error)."""
    if SCREENING.get():  # truncated HOSVD: partial_tucker's own init, without its sweeps (resnet18's
        # 512x512x3x3 ladder of 8 ranks: 41 s with them)
        u_out, u_in = _top_vectors(_unfold(w, 0), rank_out)[1], _top_vectors(_unfold(w, 1), rank_in)[1]
        core = torch.einsum("goi...,gor,gis->grs...", w, u_out, u_in)
        error = max(0.0, 1 - float((core * core).sum()) / (float((w * w).sum()) or 1.0)) ** 0.5
        return core, u_out, u_in, error
    cores, outs, ins = [], [], []
    # a mode kept whole (its rank is its width) is not decomposed: its factor is the identity, and a single
    # truncated mode needs no HOOI sweeps (CREPE full's conv2 at [128, 224]: 71 s with both modes)
    modes = [(mode, rank) for mode, rank in ((0, rank_out), (1, rank_in)) if rank < w.shape[mode + 1]]
    with tl.backend_context("pytorch"):
        for group in w:
            if modes:
                (core, factors), _ = partial_tucker(group, rank=[r for _, r in modes], modes=[m for m, _ in modes],
                                                    init="svd", n_iter_max=HOOI_SWEEPS if len(modes) > 1 else 0,
                                                    tol=HOOI_TOL, svd="truncated_svd")
            else:
                core, factors = group, []
            found = dict(zip((m for m, _ in modes), factors))
            u_out = found.get(0, torch.eye(group.shape[0], dtype=group.dtype))
            u_in = found.get(1, torch.eye(group.shape[1], dtype=group.dtype))
            if 0 not in found or 1 not in found:
                core = torch.einsum("oi...,or,is->rs...", group, u_out, u_in)
            cores.append(core)
            outs.append(u_out)
            ins.append(u_in)
    core = torch.stack(cores)
    # the factors are orthonormal, so the error is ||W||^2 - ||core||^2: no reconstruction needed
    error = max(0.0, 1 - float((core * core).sum()) / (float((w * w).sum()) or 1.0)) ** 0.5
    return core, torch.stack(outs), torch.stack(ins), error


def whitened_weight(layer: nn.Module, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grouped weight ``[g, o, i, *k]`` with its input mode whitened (``W x_1 L^T``) and ``L^-1`` per group,
    or the plain weight and None without data."""
    w = grouped_weight(layer)
    if stats is None or stats.channel is None:
        return w, None
    root, inverse = stats.whitener(w.shape[0])
    return torch.einsum("goi...,gij->goj...", w, root.double()), inverse.double()


def tucker_ranks(spec: RankSpec, w: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[int, int, list[str]]:
    """(R_out, R_in, notes) for ``w [g, o, i, *k]``; (0, 0) when no ranks save parameters. A ratio's split
    between the modes is chosen on ``weight`` (the layer's own weight, default ``w``), so that the same
    layer gets the same ranks with data or without."""
    g, o, i = w.shape[:3]
    kk = math.prod(w.shape[3:])
    notes: list[str] = []
    if spec.rank is not None:
        for size, mode in ((o, "output"), (i, "input")):
            if spec.rank > size:
                notes.append(f"rank {spec.rank} clamped to the {mode} channels ({size}) for that mode")
        return round_up(min(spec.rank, o), spec.multiple, o), round_up(min(spec.rank, i), spec.multiple, i), notes
    if spec.energy is not None:
        ranks = []
        for mode, size in ((0, o), (1, i)):
            values = _top_vectors(_unfold(w, mode))[0]
            ranks.append(round_up(max(energy_rank(v.numpy(), spec.energy) for v in values), spec.multiple, size))
        return ranks[0], ranks[1], notes
    budget = g * o * i * kk / spec.ratio

    def params(ro: int, ri: int) -> int:
        return g * (i * ri + ri * ro * kk + ro * o)

    # a mode narrower than the rank block (the 3 input channels of a stem) keeps its full width
    # when the budget allows: it costs little and cutting it loses most of the layer
    floor_o, floor_i = min(o, spec.multiple), min(i, spec.multiple)
    if params(floor_o, floor_i) > budget:
        floor_o = floor_i = 1
    if params(floor_o, floor_i) > budget:
        return 0, 0, notes

    def ranks_at(alpha: float) -> tuple[int, int]:
        return max(floor_o, int(alpha * o)), max(floor_i, int(alpha * i))

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(*ranks_at(mid)) <= budget else (lo, mid)
    ro, ri = ranks_at(lo)
    proportional = round_down(ro, spec.multiple, o), round_down(ri, spec.multiple, i)
    split = _best_split(w if weight is None else weight, proportional, params, budget, (floor_o, floor_i),
                        spec.multiple, notes)
    return (*split, notes)


def _kept_energy(w: torch.Tensor) -> torch.Tensor:
    """``kept[a-1, b-1]``: the energy the truncated HOSVD of ``w [g, o, i, *k]`` keeps at ranks ``(a, b)``, from
    one rotation into both modes' singular bases. A plan's ladder of ratios shares it (``MEMO``)."""
    memo = MEMO.get()
    key = ("hosvd-energy", fingerprint(w)) if memo is not None else None
    if key is not None and key in memo:
        return memo[key]
    g, o, i = w.shape[:3]
    u_out, u_in = _top_vectors(_unfold(w, 0))[1], _top_vectors(_unfold(w, 1))[1]
    rotated = torch.einsum("gai...,gib->gab...", torch.einsum("goi...,goa->gai...", w, u_out), u_in)
    kept = rotated.pow(2).reshape(g, o, i, -1).sum((0, 3)).cumsum(0).cumsum(1)
    if key is not None:
        memo[key] = kept
    return kept


def _best_split(w: torch.Tensor, proportional: tuple[int, int], params, budget: float, floors: tuple[int, int],
                multiple: int, notes: list[str]) -> tuple[int, int]:
    """The ``(R_out, R_in)`` within ``budget`` whose truncated HOSVD of ``w`` has the least error, among
    ``proportional`` and every ``R_out`` on the rank block with the largest ``R_in`` it leaves room for.
    Channel counts unlike the layer's information ask for unlike ranks: CREPE full's conv2 (1024 -> 128, 64
    taps) keeps far more with all 128 outputs and 224 inputs than with the proportional 56 and 448.

    The error of every split comes from one rotation of ``w`` into both modes' singular bases: the energy
    kept at ``(a, b)`` is the sum of the rotated core's leading ``a x b`` block. (The sum of the energies each
    mode drops alone, a bound, favours keeping a mode whole: CREPE tiny's 16 -> 16 convs at 4x got [16, 3]
    from it, and RPA fell from 96.75% to 89.75% after fine-tuning.)"""
    g, o, i = w.shape[:3]
    kept = _kept_energy(w)
    total = float(kept[-1, -1]) or 1.0

    def error(ranks: tuple[int, int]) -> float:
        return max(0.0, 1 - float(kept[ranks[0] - 1, ranks[1] - 1]) / total) ** 0.5

    best = proportional
    for ro in sorted({*range(multiple, o + 1, multiple), o}):
        if ro < floors[0]:
            continue
        ri = 0
        for r in range(i, floors[1] - 1, -1):  # the largest R_in that fits, kept on the block
            if params(ro, r) <= budget:
                ri = round_down(r, multiple, i)
                break
        if ri >= floors[1] and error((ro, ri)) < error(best) - 1e-6:  # the first of equal ones: fewer parameters
            best = (ro, ri)
    if best != proportional:
        notes.append(f"ranks [{best[0]}, {best[1]}] instead of the proportional [{proportional[0]}, "
                     f"{proportional[1]}]: HOSVD error {error(best):.3g} against {error(proportional):.3g} at the "
                     f"same parameters")
    return best


@register("tucker", nn.Conv1d, nn.Conv2d)
@one_thread()
def tucker_conv(layer: nn.Module, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    """With data the input mode is whitened by the channel covariance (``W x_1 L^T``, ``L L^T = C``), Tucker-2
    runs on that tensor, and the input factor is mapped back (``U_in = L^-T U~_in``): the input factor
    then comes from the covariance-weighted problem."""
    geo = check_factorizable(layer)
    if geo.pointwise:
        return delegate_pointwise(layer, spec, "tucker", stats)
    w, inverse = whitened_weight(layer, stats)
    g, o, i = w.shape[:3]
    rank_out, rank_in, notes = tucker_ranks(spec, w, grouped_weight(layer))
    if rank_out < 1:
        raise SkipLayer(f"no Tucker-2 ranks save parameters at {spec.describe()} ({o}x{i}x{'x'.join(map(str, geo.kernel))} per group)")
    core, u_out, u_in, error = tucker2(w, rank_out, rank_in)
    if inverse is not None:
        u_in = torch.einsum("gji,gjb->gib", inverse, u_in)
    first = pointwise_step(geo, geo.in_channels, g * rank_in, g)
    middle = spatial_step(geo, g * rank_in, g * rank_out, tuple(range(geo.dims)), g)
    last = pointwise_step(geo, g * rank_out, geo.out_channels, g, bias=layer.bias is not None)
    set_weight(first, u_in.transpose(1, 2))
    set_weight(middle, core)
    set_weight(last, u_out)
    copy_bias(last, layer)
    if g > 1:
        notes.append(f"factorized per group ({g} groups)")
    module = TuckerConv("tucker", [first, *explicit_pad(geo), middle, last], g)
    return Decomposition(module, notes, {"tucker_error": round(error, 6)})


@register("tucker", nn.Linear)
def tucker_linear(layer: nn.Linear, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    return delegate_linear(layer, spec, "tucker", stats)
