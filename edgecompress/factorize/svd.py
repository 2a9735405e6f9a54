"""``svd`` and ``svd-spatial``: truncated SVD of a Linear weight or of a conv weight's matricization.

- Linear: ``W [out, in] ~ A B`` -> Linear(in -> r) then Linear(r -> out, bias): two MatMul nodes.
- Conv (channel SVD, ``svd``): ``W`` as ``[O, I*k]`` -> conv k (I -> r, stride/padding/dilation) then
  conv 1x1 (r -> O, bias). A 1x1 conv is a Linear over channels: two 1x1 convs.
- Conv2d (spatial SVD, ``svd-spatial``, Jaderberg et al.): ``W`` as ``[I*kh, O*kw]`` -> conv kh x 1
  (I -> r) then conv 1 x kw (r -> O, bias), stride/padding/dilation split per axis.
Grouped convs are factorized per group (grouped convs in the chain), depthwise ones stay dense.

The truncated SVD comes from the eigen-decomposition of the smaller Gram matrix, and the factors
are a projection (``W ~ U_r U_r^T W``): one GEMM plus a small ``eigh`` instead of a full SVD (an
8192 x 1536 layer: about 1 s instead of 5 s), and still exact at full rank. The singular values are
split evenly (sqrt(s) into each factor), which keeps the two factors' value ranges alike: that
matters when the chain is quantized to int8 later.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from edgecompress.capture.stats import LayerStats
from edgecompress.factorize.base import MEMO, SkipLayer, fingerprint, one_thread
from edgecompress.factorize.convs import (check_factorizable, copy_bias, explicit_pad, grouped_weight,
                                          pointwise_step, set_weight, spatial_step)
from edgecompress.factorize.layers import ChannelSVDConv, InputSVDConv, LowRankLinear, SpatialSVDConv
from edgecompress.factorize.ranks import RankSpec, single_rank
from edgecompress.factorize.registry import Decomposition, register

# above this many multiply-adds the Gram matrix is formed in float32 (eigh stays float64)
_FLOAT64_GRAM_LIMIT = 2e9


def _work_dtype(mats: torch.Tensor) -> torch.dtype:
    g, m, n = mats.shape
    return torch.float32 if g * m * n * min(m, n) > _FLOAT64_GRAM_LIMIT else torch.float64


def gram_spectrum(mats: torch.Tensor, output_gram: torch.Tensor | None = None,
                  output_root: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Batched ``mats [g, m, n]``: (singular values [g, k] descending, basis [g, ?, k], left?) where the
    basis holds left (m <= n) or right singular vectors, from the Gram matrix of the smaller side.
    With ``output_gram [g, m, m]`` (``W C W^T``, the output covariance on data) the basis is its top
    eigenvectors and the values are output energies: ``W ~ U_r U_r^T W`` is then the best rank-r
    approximation in the data norm ``||(W - W_r) L||`` with ``L L^T = C`` (no inverse of ``C`` needed).
    ``output_root [g, n, n]`` gives that covariance as ``(W R)(W R)^T`` for a wide output (``m > n``): the same
    basis, from the left singular vectors of ``W R``, by an ``[n, n]`` eigh instead of an ``[m, m]`` one."""
    memo = MEMO.get()
    if memo is not None:  # a plan's ladder, its checks and the final fit: every rank of this layer shares it
        key = ("spectrum", fingerprint(mats), *(None if t is None else fingerprint(t) for t in (output_gram, output_root)))
        if key not in memo:
            memo[key] = _spectrum(mats, output_gram, output_root)
        return memo[key]
    return _spectrum(mats, output_gram, output_root)


def _spectrum(mats: torch.Tensor, output_gram: torch.Tensor | None,
              output_root: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    g, m, n = mats.shape
    if output_root is not None:  # left singular vectors of W R, from its smaller Gram matrix
        x = mats.double() @ output_root.double()
        values, vectors = torch.linalg.eigh(x.transpose(1, 2) @ x)
        values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
        root = values.sqrt()
        left = x @ vectors / torch.where(root > 0, root, 1)[:, None, :]
        return root, left, True
    left = m <= n or output_gram is not None
    x = mats.to(_work_dtype(mats))
    gram = output_gram if output_gram is not None else x @ x.transpose(1, 2) if left else x.transpose(1, 2) @ x
    values, vectors = torch.linalg.eigh(gram.double())
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    return values.sqrt(), vectors, left


def low_rank_factors(mats: torch.Tensor, basis: torch.Tensor, left: bool, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mats [g, m, n] ~ A [g, m, r] @ B [g, r, n]`` with sqrt(s) in each factor."""
    x = mats.to(_work_dtype(mats))
    vectors = basis[..., :rank].to(x.dtype)
    if left:
        projected = vectors.transpose(1, 2) @ x  # [g, r, n], row norms = singular values
        root = projected.norm(dim=2).sqrt()
        return vectors * root[:, None, :], projected / torch.where(root > 0, root, 1)[:, :, None]
    projected = x @ vectors  # [g, m, r]
    root = projected.norm(dim=1).sqrt()
    return projected / torch.where(root > 0, root, 1)[:, None, :], (vectors * root[:, None, :]).transpose(1, 2)


def group_rank(spec: RankSpec, singular_values: torch.Tensor, max_rank: int, params, dense: int) -> tuple[int, list[str]]:
    """One rank for every group: the largest any group's spectrum asks for (ratio/rank: the same for all)."""
    results = [single_rank(spec, max_rank, params, dense, s.numpy()) for s in singular_values]
    return max(r for r, _ in results), results[0][1]


def factor_matrices(mats: torch.Tensor, spec: RankSpec, what: str, output_gram: torch.Tensor | None = None,
                    output_root: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Truncated SVD of each ``[m, n]`` matrix of ``mats [g, m, n]`` at one rank from ``spec`` (in the data
    norm with ``output_gram`` or ``output_root``, see ``gram_spectrum``)."""
    g, m, n = mats.shape
    s, basis, left = gram_spectrum(mats, output_gram, output_root)
    rank, notes = group_rank(spec, s, min(m, n), lambda r: g * r * (m + n), g * m * n)
    if rank < 1:
        raise SkipLayer(f"no rank saves parameters at {spec.describe()} ({what})")
    a, b = low_rank_factors(mats, basis, left, rank)
    return a, b, notes


def truncated_svd(matrix: torch.Tensor, spec: RankSpec,
                  data: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``matrix [m, n] ~ A [m, r] @ B [r, n]`` with the rank from ``spec``; returns (A, B, notes). ``data`` is
    ``data_norm``'s."""
    m, n = matrix.shape
    a, b, notes = factor_matrices(matrix.detach()[None], spec, f"{m}x{n} matrix", **(data or {}))
    return a[0].float(), b[0].float(), notes


def data_norm(stats: LayerStats | None, mats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The damped output covariance per group for ``mats [g, o, n]`` as ``factor_matrices`` takes it
    (``output_gram``, or ``output_root`` for a widening layer); empty without data (weight-only)."""
    if stats is not None and stats.dense_channel is not None:
        return {"output_root": stats.output_root()}
    if stats is None or stats.output is None:
        return {}
    return {"output_gram": stats.output_damped(mats, mats.shape[0])}


@register("svd", nn.Linear)
@one_thread()
def svd_linear(layer: nn.Linear, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    a, b, notes = truncated_svd(layer.weight, spec, data_norm(stats, layer.weight.detach()[None]))
    rank = a.shape[1]
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    first.weight.data.copy_(b)
    second.weight.data.copy_(a)
    if layer.bias is not None:
        second.bias.data.copy_(layer.bias)
    return Decomposition(LowRankLinear(first, second, "svd"), notes)


def delegate_linear(layer: nn.Linear, spec: RankSpec, method: str, stats: LayerStats | None = None) -> Decomposition:
    """``method`` on a Linear is its truncated SVD (a matrix's Tucker-2 and CP are its SVD); say so."""
    result = svd_linear(layer, spec, stats)
    result.notes.append(f"{method} on a Linear is its truncated SVD (exported as svd)")
    return result


@register("svd", nn.Conv1d, nn.Conv2d)
@one_thread()
def svd_conv(layer: nn.Module, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    """Channel SVD, on the side that keeps more of the layer: conv k (I -> r per group) then conv 1x1
    (r -> O, bias), or conv 1x1 (I -> r) then conv k (r -> O, bias) where, for a ratio, that has the lower
    weight error at the same parameters (``_input_side``). The side is chosen on the weights, so that a layer
    gets the same chain with data or without (CREPE full svd 4x, 64 tones: RPA 96.75%; chosen on the
    data-weighted error 95.25%; the output side everywhere 87.0%). A rank or an energy keeps the first form."""
    geo = check_factorizable(layer)
    w = grouped_weight(layer)
    if geo.pointwise or spec.ratio is None:
        return _output_side(layer, geo, w, spec, stats)
    sides = []
    for side in (_output_side, _input_side):
        try:
            sides.append(side(layer, geo, w, spec, stats))
        except SkipLayer as skip:
            reason = skip
    if not sides:
        raise reason
    from edgecompress.factorize.api import relative_error

    errors = [relative_error(w, d.module.dense_weight().reshape(w.shape)) for d in sides]
    if len(sides) == 2:
        chosen = min((1, 0), key=lambda k: (errors[k], k))  # a tie keeps the output side
        sides[chosen].notes.append(
            f"{'input' if chosen else 'output'}-side channel SVD (rank {sides[chosen].module.ranks()[0]}): weight "
            f"error {errors[chosen]:.3g} against {errors[1 - chosen]:.3g} for the {'output' if chosen else 'input'} "
            f"side at the same ratio")
        return sides[chosen]
    return sides[0]


def _output_side(layer: nn.Module, geo, w: torch.Tensor, spec: RankSpec, stats: LayerStats | None) -> Decomposition:
    """Conv k (I -> r per group) then conv 1x1 (r -> O, bias): ``W [O, I*k]`` in the output data norm."""
    g, o = w.shape[:2]
    mats = w.reshape(g, o, -1)
    a, b, notes = factor_matrices(mats, spec, f"{o}x{w[0, 0].numel()} per group", **data_norm(stats, mats))
    rank = a.shape[2]
    first = spatial_step(geo, geo.in_channels, g * rank, tuple(range(geo.dims)), g)
    second = pointwise_step(geo, g * rank, geo.out_channels, g, bias=layer.bias is not None)
    set_weight(first, b)
    set_weight(second, a)
    copy_bias(second, layer)
    if g > 1:
        notes.append(f"factorized per group ({g} groups)")
    return Decomposition(ChannelSVDConv("svd", [*explicit_pad(geo), first, second], g), notes)


def _whitens(stats: LayerStats | None) -> bool:
    return stats is not None and stats.channel is not None


def _input_side(layer: nn.Module, geo, w: torch.Tensor, spec: RankSpec, stats: LayerStats | None) -> Decomposition:
    """Conv 1x1 (I -> r per group) then conv k (r -> O, bias): ``W`` as ``[I, O*k]``, whose rows are whitened
    by the input channels' covariance (the taps taken as uncorrelated, as for svd-spatial)."""
    g, o, i = w.shape[:3]
    mats = w.reshape(g, o, i, -1).transpose(1, 2).reshape(g, i, -1)  # [g, i, o*k]
    if _whitens(stats):
        root, inverse = (m.double() for m in stats.whitener(g))
        mats = root @ mats  # root is symmetric
    p, q, notes = factor_matrices(mats, spec, f"{i}x{mats.shape[2]} per group")
    if _whitens(stats):
        p = inverse @ p.double()  # back from the whitened rows
    rank = p.shape[2]
    first = pointwise_step(geo, geo.in_channels, g * rank, g)
    second = spatial_step(geo, g * rank, geo.out_channels, tuple(range(geo.dims)), g, bias=layer.bias is not None)
    set_weight(first, p.transpose(1, 2))
    set_weight(second, q.reshape(g, rank, o, -1).transpose(1, 2))
    copy_bias(second, layer)
    if g > 1:
        notes.append(f"factorized per group ({g} groups)")
    return Decomposition(InputSVDConv("svd", [*explicit_pad(geo), first, second], g), notes)


def delegate_pointwise(layer: nn.Module, spec: RankSpec, method: str, stats: LayerStats | None = None) -> Decomposition:
    """A 1x1 conv is a Linear over channels: channel SVD (two 1x1 convs) whatever the method."""
    result = svd_conv(layer, spec, stats)
    result.notes.append(f"1x1 conv is a Linear over channels: SVD instead of {method}")
    return result


@register("svd-spatial", nn.Conv2d)
@one_thread()
def svd_spatial_conv(layer: nn.Conv2d, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    """Spatial SVD: conv kh x 1 (I -> r per group) then conv 1 x kw (r -> O, bias). With data the rows
    (input channel, vertical tap) are whitened by ``channel (x) I_kh``: taps taken as uncorrelated."""
    geo = check_factorizable(layer)
    if geo.pointwise:
        return delegate_pointwise(layer, spec, "svd-spatial", stats)
    w = grouped_weight(layer)  # [g, o, i, kh, kw]
    g, o, i, kh, kw = w.shape
    mats = w.permute(0, 2, 3, 1, 4).reshape(g, i * kh, o * kw)
    whiten = stats is not None and stats.channel is not None
    if whiten:
        root, inverse = (m.double() for m in stats.whitener(g))
        mats = torch.einsum("gihn,gij->gjhn", mats.reshape(g, i, kh, -1), root).reshape(g, i * kh, o * kw)
    p, q, notes = factor_matrices(mats, spec, f"{i * kh}x{o * kw} per group")
    if whiten:  # back from the whitened rows: p <- (L^-T (x) I) p
        p = torch.einsum("gjhr,gji->gihr", p.double().reshape(g, i, kh, -1), inverse).reshape(g, i * kh, -1)
    rank = p.shape[2]
    first = spatial_step(geo, geo.in_channels, g * rank, (0,), g)
    second = spatial_step(geo, g * rank, geo.out_channels, (1,), g, bias=layer.bias is not None)
    set_weight(first, p.reshape(g, i, kh, rank).permute(0, 3, 1, 2))
    set_weight(second, q.reshape(g, rank, o, kw).permute(0, 2, 1, 3))
    copy_bias(second, layer)
    if g > 1:
        notes.append(f"factorized per group ({g} groups)")
    return Decomposition(SpatialSVDConv("svd-spatial", [*explicit_pad(geo), first, second], g), notes)


@register("svd-spatial", nn.Conv1d)
def svd_spatial_conv1d(layer: nn.Conv1d, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    result = svd_conv(layer, spec, stats)
    result.notes.append("svd-spatial needs two spatial axes: channel SVD for Conv1d")
    return result


@register("svd-spatial", nn.Linear)
def svd_spatial_linear(layer: nn.Linear, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    return delegate_linear(layer, spec, "svd-spatial", stats)
