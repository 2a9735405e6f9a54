"""``tt`` and ``tt-naive``: Tensor-Train decomposers for Linear, Conv1d/Conv2d and Embedding.

``tt`` on a Linear is the TT-matrix of Novikov et al. (2015); on a conv the TT-conv of Garipov et al.
(2016, seed 003 eq. (8)-(9)): spatial core as a Conv, channel cores as MatMuls; on an Embedding the
TT-embedding of Hrinchuk et al. (2020). ``tt-naive`` is the plain TT of the 4-D conv kernel
(seed 003 eq. (7)), kept for the comparison of seed 003 Table 1. Cores come from TT-SVD of the trained
weight (``tt_svd.py``); sizes are split into ``d`` balanced modes (``d`` from the sizes unless given).
Each record's details hold the modes, TT-ranks and an analytic MAC count; TT-matrix chains at moderate
compression need more MACs than the dense layer (docs/measured.md), and the record says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.factorize.api import relative_error
from edgecompress.factorize.base import SkipLayer
from edgecompress.factorize.ranks import RankSpec
from edgecompress.factorize.registry import Decomposition, register
from edgecompress.factorize.tt_layers import TTConv, TTEmbedding, TTLinear, TTNaiveConv, chain_macs, to_chain
from edgecompress.factorize.tt_svd import (choose_d, choose_max_rank, interleave, mode_shape, rank_caps,
                                           tt_params, tt_svd)


def paired_modes(in_size: int, out_size: int, d: int, what: str = "features") -> tuple[tuple, tuple, list[str]]:
    """Input and output modes in chain order (least significant first) and padding notes.

    Big input modes first shrink the state early; small output modes first keep it small."""
    in_modes, in_padded = mode_shape(in_size, d)
    out_modes, out_padded = mode_shape(out_size, d)
    notes = [f"{side} {what} padded {n} -> {p} with zeros to get balanced TT modes"
             for side, n, p in (("input", in_size, in_padded), ("output", out_size, out_padded)) if p != n]
    return tuple(sorted(in_modes, reverse=True)), tuple(sorted(out_modes)), notes


def _speed_note(macs: int, dense: int, per: str) -> list[str]:
    if macs <= dense:
        return []
    return [f"TT chain needs {macs / dense:.1f}x the dense MACs per {per} ({macs} vs {dense}): TT is for size, not speed"]


def _padded(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight [out, in, ...]`` with zero rows/columns up to ``[rows, cols, ...]``."""
    w = weight.detach().double()
    grow = [0, 0] * (w.dim() - 2) + [0, cols - w.shape[1], 0, rows - w.shape[0]]
    return F.pad(w, grow)


@register("tt", nn.Linear, whitened=False)
def tt_linear(layer: nn.Linear, spec: RankSpec, stats=None, d: int | None = None) -> Decomposition:
    """TT-matrix of a Linear weight: ``d`` MatMuls (see ``best_d`` for how ``d`` is chosen when not given)."""
    return best_d(layer, spec, d, lambda k: _tt_linear(layer, spec, k), "macs_per_row")


def _tt_linear(layer: nn.Linear, spec: RankSpec, d: int) -> Decomposition:
    out_f, in_f = layer.weight.shape
    in_modes, out_modes, notes = paired_modes(in_f, out_f, d)
    pairs = [a * b for a, b in zip(in_modes, out_modes)]
    max_rank, rank_notes = choose_max_rank(spec, pairs, in_f * out_f)
    weight = _padded(layer.weight, math.prod(out_modes), math.prod(in_modes))
    cores = tt_svd(interleave(weight, out_modes, in_modes), pairs, max_rank, spec.energy, spec.multiple)
    chain_ranks = [1] + [c.shape[-1] for c in cores]
    module = TTLinear([to_chain(c, a, b) for c, a, b in zip(cores, in_modes, out_modes)], in_modes, out_modes,
                      chain_ranks, in_f, out_f, layer.bias)
    macs = chain_macs(in_modes, out_modes, chain_ranks) + (math.prod(in_modes) - in_f)
    details = _details("tt-matrix", d, in_modes, out_modes, chain_ranks, max_rank)
    details.update(macs_per_row=macs, dense_macs_per_row=in_f * out_f)
    return Decomposition(module, [*notes, *rank_notes, *_speed_note(macs, in_f * out_f, "row")], details)


def best_d(layer: nn.Module, spec: RankSpec, d: int | None, build: Callable[[int], Decomposition],
           macs_key: str) -> Decomposition:
    """``build(d)`` for the given ``d``; else, for a ratio, the ``d`` in 2..``choose_d`` whose TT-SVD error at
    that ratio is lowest (within 1%, the one needing fewer MACs: fewer cores are usually cheaper); for a
    rank or energy, ``choose_d`` (modes of about 8)."""
    sizes = (layer.weight.shape[0], layer.weight.shape[1])
    top = choose_d(*sizes)
    candidates = [d] if d else (list(range(2, top + 1)) if spec.ratio is not None else [top])
    results, reasons = [], []
    for k in candidates:
        if len(candidates) > 1 and _largest_unfolding(layer, k) > _MAX_SVD_SIDE:
            reasons.append(f"d={k} needs an SVD wider than {_MAX_SVD_SIDE} both ways")
            continue
        try:
            result = build(k)
        except SkipLayer as skip:
            reasons.append(str(skip))
            continue
        error = relative_error(layer.weight, result.module.dense_weight())
        results.append((error, result.details[macs_key], k, result))
    if not results:
        raise SkipLayer(reasons[-1])
    lowest = min(r[0] for r in results)
    error, _, k, result = min((r for r in results if r[0] <= lowest * 1.01 + 1e-12), key=lambda r: r[1])
    if len(results) > 1:
        result.details["d_errors"] = {str(r[2]): round(r[0], 6) for r in results}
    return result


_MAX_SVD_SIDE = 1024  # a candidate d whose TT-SVD needs a larger (both ways) unfolding is not tried


def _largest_unfolding(layer: nn.Module, d: int) -> int:
    """The largest min(rows, cols) over the TT-SVD unfoldings of ``layer`` split into ``d`` mode pairs."""
    rows, cols = layer.weight.shape[:2]
    in_modes, out_modes, _ = paired_modes(cols, rows, d)
    pairs = [a * b for a, b in zip(in_modes, out_modes)]
    if layer.weight.dim() > 2:
        pairs.insert(0, math.prod(layer.weight.shape[2:]))
    return max(min(math.prod(pairs[:k]), math.prod(pairs[k:])) for k in range(1, len(pairs)))


def _details(variant: str, d: int, in_modes, out_modes, tt_ranks, max_rank) -> dict[str, Any]:
    return {"variant": variant, "d": d, "in_modes": list(in_modes), "out_modes": list(out_modes),
            "tt_ranks": list(tt_ranks), "max_rank": max_rank,
            "mode_order": "least significant digit first (chain order)"}


def _check_conv(layer: nn.Module) -> None:
    if layer.groups != 1:
        raise SkipLayer(f"grouped convolution (groups={layer.groups}): TT leaves it dense")
    if layer.padding_mode != "zeros":
        raise SkipLayer(f"padding_mode {layer.padding_mode!r}: TT chains support zero padding only")


def _conv(layer: nn.Module, c_in: int, c_out: int, weight: torch.Tensor, **overrides) -> nn.Module:
    """A bias-free Conv like ``layer`` (same dims, stride, padding, dilation unless overridden)."""
    cls = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Conv1d
    kw = {"kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
          "dilation": layer.dilation, **overrides}
    conv = cls(c_in, c_out, bias=False, **kw)
    conv.weight.data.copy_(weight.reshape(conv.weight.shape))
    return conv


@register("tt", nn.Conv1d, nn.Conv2d, whitened=False)
def tt_conv(layer: nn.Module, spec: RankSpec, stats=None, d: int | None = None,
            spatial_first: bool | None = None) -> Decomposition:
    """TT-conv: kernel as ``[k, (c_1 s_1), ..., (c_d s_d)]`` (spatial core first) or with the spatial core
    last, whichever needs fewer MACs per output position at the chosen ranks (``d`` as in ``best_d``)."""
    _check_conv(layer)
    return best_d(layer, spec, d, lambda k: _tt_conv(layer, spec, k, spatial_first), "macs_per_position")


def _tt_conv(layer: nn.Module, spec: RankSpec, d: int, spatial_first: bool | None) -> Decomposition:
    s_out, c_in, kernel = layer.out_channels, layer.in_channels, tuple(layer.kernel_size)
    k, stride_area = math.prod(kernel), math.prod(layer.stride)
    in_modes, out_modes, notes = paired_modes(c_in, s_out, d, "channels")
    pairs = [a * b for a, b in zip(in_modes, out_modes)]
    dense = s_out * c_in * k
    options = []
    for first in ((True, False) if spatial_first is None else (spatial_first,)):
        modes = [k, *pairs] if first else [*pairs, k]
        max_rank, rank_notes = choose_max_rank(spec, modes, dense)
        caps = rank_caps(modes, max_rank or 1 << 62)
        chain_ranks = caps + [1] if first else [1] + caps
        steps = chain_macs(in_modes, out_modes, chain_ranks) + (math.prod(in_modes) - c_in) * chain_ranks[0]
        macs = c_in * caps[0] * k + steps if first else stride_area * steps + s_out * caps[-1] * k
        options.append((macs, first, modes, max_rank, rank_notes))
    _, first, modes, max_rank, rank_notes = min(options, key=lambda o: o[0])
    weight = _padded(layer.weight, math.prod(out_modes), math.prod(in_modes)).reshape(*map(math.prod, (out_modes, in_modes)), k)
    tensor = interleave(weight.permute(2, 0, 1), out_modes, in_modes)  # [k, pairs...]
    cores = tt_svd(tensor if first else tensor.movedim(0, -1), modes, max_rank, spec.energy, spec.multiple)
    if first:
        spatial_core, chain_cores = cores[0][0].t(), cores[1:]  # [r_0, k]
        chain_ranks = [spatial_core.shape[0]] + [c.shape[-1] for c in chain_cores]
        spatial = _conv(layer, 1, spatial_core.shape[0], spatial_core)
    else:
        spatial_core, chain_cores = cores[-1][:, :, 0], cores[:-1]  # [r_d, k]
        chain_ranks = [1] + [c.shape[-1] for c in chain_cores]
        spatial = _conv(layer, spatial_core.shape[0], 1, spatial_core)
    module = TTConv(spatial, [to_chain(c, a, b) for c, a, b in zip(chain_cores, in_modes, out_modes)], in_modes,
                    out_modes, chain_ranks, c_in, s_out, layer.bias, spatial_first=first)
    steps = chain_macs(in_modes, out_modes, chain_ranks) + (math.prod(in_modes) - c_in) * chain_ranks[0]
    macs = c_in * chain_ranks[0] * k + steps if first else stride_area * steps + s_out * chain_ranks[-1] * k
    details = _details("tt-conv", d, in_modes, out_modes, module.ranks(), max_rank)
    details.update(spatial_first=first, kernel=list(kernel), macs_per_position=macs, dense_macs_per_position=dense)
    return Decomposition(module, [*notes, *rank_notes, *_speed_note(macs, dense, "output position")], details)


@register("tt-naive", nn.Conv1d, nn.Conv2d, whitened=False)
def tt_naive_conv(layer: nn.Module, spec: RankSpec, stats=None) -> Decomposition:
    """The naive TT of the 4-D kernel, modes ``(kh, kw, C, S)`` (seed 003 eq. (7))."""
    _check_conv(layer)
    s_out, c_in, kernel = layer.out_channels, layer.in_channels, tuple(layer.kernel_size)
    modes = [*kernel, c_in, s_out]
    max_rank, notes = choose_max_rank(spec, modes, layer.weight.numel())
    tensor = layer.weight.detach().permute(*range(2, 2 + len(kernel)), 1, 0)
    cores = tt_svd(tensor, modes, max_rank, spec.energy, spec.multiple)
    *spatial_cores, g_in, g_out = cores
    if len(kernel) == 2:
        (kh, kw), (sh, sw), (dh, dw) = kernel, layer.stride, layer.dilation
        pad = layer.padding if isinstance(layer.padding, str) else None
        r1, r2 = spatial_cores[0].shape[-1], spatial_cores[1].shape[-1]
        spatial = nn.Sequential(
            _conv(layer, 1, r1, spatial_cores[0][0].t(), kernel_size=(kh, 1), stride=(sh, 1), dilation=(dh, 1),
                  padding=pad or (layer.padding[0], 0)),
            _conv(layer, r1, r2, spatial_cores[1].permute(2, 0, 1), kernel_size=(1, kw), stride=(1, sw),
                  dilation=(1, dw), padding=pad or (0, layer.padding[1])))
    else:
        spatial = _conv(layer, 1, spatial_cores[0].shape[-1], spatial_cores[0][0].t())
    chain_ranks = [g_in.shape[0], g_out.shape[0], 1]
    module = TTNaiveConv(spatial, [to_chain(g_in, c_in, 1), to_chain(g_out, 1, s_out)], (c_in, 1), (1, s_out),
                         chain_ranks, c_in, s_out, layer.bias, spatial_first=True)
    details = {"variant": "tt-naive", "modes": modes, "tt_ranks": [1, *module.ranks(), 1], "max_rank": max_rank}
    return Decomposition(module, notes, details)


@register("tt", nn.Embedding, whitened=False)
def tt_embedding(layer: nn.Embedding, spec: RankSpec, stats=None, d: int | None = None) -> Decomposition:
    """TT-embedding: vocabulary and dimension split into ``d`` modes each (vocabulary padding is free:
    padded rows are never looked up)."""
    if layer.max_norm is not None:
        raise SkipLayer("Embedding with max_norm renormalises rows at lookup: TT leaves it dense")
    return best_d(layer, spec, d, lambda k: _tt_embedding(layer, spec, k), "macs_per_token")


def _tt_embedding(layer: nn.Embedding, spec: RankSpec, d: int) -> Decomposition:
    vocab, dim = layer.weight.shape
    vocab_modes, vocab_padded = mode_shape(vocab, d)
    dim_modes, dim_padded = mode_shape(dim, d)
    vocab_modes, dim_modes = tuple(sorted(vocab_modes, reverse=True)), tuple(sorted(dim_modes))
    pairs = [v * m for v, m in zip(vocab_modes, dim_modes)]
    max_rank, notes = choose_max_rank(spec, pairs, vocab * dim)
    table = _padded(layer.weight, vocab_padded, dim_padded).reshape(*vocab_modes, *dim_modes)
    tensor = table.permute([p for k in range(d) for p in (k, d + k)]).reshape(pairs)
    cores = tt_svd(tensor, pairs, max_rank, spec.energy, spec.multiple)
    cores = [c.reshape(c.shape[0], v, m, c.shape[-1]) for c, v, m in zip(cores, vocab_modes, dim_modes)]
    module = TTEmbedding(cores, vocab_modes, dim_modes, vocab, dim, layer.padding_idx)
    if dim_padded != dim:
        notes.append(f"embedding dim padded {dim} -> {dim_padded} with zeros to get balanced TT modes")
    if layer.padding_idx is not None:
        notes.append(f"padding_idx {layer.padding_idx}: its row is approximated like the others (not exactly zero)")
    ranks = module.tt_ranks
    macs = sum(math.prod(dim_modes[:k]) * ranks[k] * dim_modes[k] * ranks[k + 1] for k in range(1, d))
    details = {"variant": "tt-embedding", "d": d, "vocab_modes": list(vocab_modes), "dim_modes": list(dim_modes),
               "vocab_padded": vocab_padded, "tt_ranks": list(ranks), "max_rank": max_rank, "macs_per_token": macs,
               "mode_order": "most significant digit first"}
    return Decomposition(module, notes, details)


def tt_linear_params(in_features: int, out_features: int, max_rank: int, d: int | None = None) -> int:
    """Parameters of a TT-matrix of the given shape at largest TT-rank ``max_rank`` (no bias)."""
    d = d or choose_d(in_features, out_features)
    in_modes, out_modes, _ = paired_modes(in_features, out_features, d)
    pairs = [a * b for a, b in zip(in_modes, out_modes)]
    return tt_params(pairs, rank_caps(pairs, max_rank))
