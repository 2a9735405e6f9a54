"""Tensor-Train arithmetic for the ``tt`` methods: mode shapes, TT-SVD with per-step truncation, TT-rank choice.

Plain functions on tensors, no layers. ``mode_shape`` splits a size into ``d`` balanced modes (padding it
with zeros when it has no balanced factorization, e.g. a prime); ``tt_svd`` is Oseledets' TT-SVD on a
tensor given its mode sizes, truncating each step by a rank cap or by an energy fraction;
``choose_max_rank`` turns a ``RankSpec`` into the largest TT-rank ``R`` (every internal rank is
``min(R, what the mode sizes allow)``). Rounding follows ``ranks.py``: a ``ratio`` rank is rounded down
to the multiple, a ``rank`` or ``energy`` rank up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from edgecompress.factorize.base import SkipLayer, one_thread
from edgecompress.factorize.ranks import RankSpec, energy_rank, largest_rank_within, round_down, round_up

_PAD_SLACK = 1.25  # a size is padded by at most 25% to find balanced modes


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """The ``d`` factors of ``n`` (1s allowed) whose largest factor is smallest, ascending."""
    best: list[int] | None = None

    def search(rest: int, k: int, start: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            # smallest largest factor, then largest smallest factor: (2, 2, 4) over (1, 4, 4)
            if rest >= start and (best is None or (rest, -acc[0] if acc else -rest) < (max(best), -best[0])):
                best = [*acc, rest]
            return
        f = start
        while f**k <= rest:
            if rest % f == 0:
                search(rest // f, k - 1, f, [*acc, f])
            f += 1

    search(n, d, 1, [])
    return tuple(best) if best else (*([1] * (d - 1)), n)


def mode_shape(n: int, d: int) -> tuple[tuple[int, ...], int]:
    """``d`` balanced modes for size ``n`` and the padded size they multiply to (``n`` unless padded).

    A factorization is balanced when its largest mode is at most twice ``n ** (1/d)``; sizes without
    one (primes, 2 * prime, ...) are padded to the next size that has one, within 25%."""
    best = None
    for size in range(n, max(n + 1, math.ceil(n * _PAD_SLACK)) + 1):
        factors = balanced_factors(size, d)
        if max(factors) <= max(2 * size ** (1 / d), 2):
            return factors, size
        if best is None or max(factors) < max(best[0]):
            best = (factors, size)
    return best


def choose_d(*sizes: int) -> int:
    """Number of modes: enough that modes are about 8 or less, between 2 and 6."""
    return max(2, min(6, math.ceil(math.log(max(sizes)) / math.log(8) - 1e-9)))


def rank_caps(modes: Sequence[int], max_rank: int) -> list[int]:
    """Internal TT-ranks ``r_1..r_{d-1}`` for the largest rank ``max_rank``: ``min(R, left, right)``."""
    caps = []
    for k in range(1, len(modes)):
        left, right = math.prod(modes[:k]), math.prod(modes[k:])
        caps.append(min(max_rank, left, right))
    return caps


def tt_params(modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of TT cores ``[r_{k-1}, n_k, r_k]`` with internal ``ranks`` (boundary ranks 1)."""
    full = [1, *ranks, 1]
    return sum(full[k] * n * full[k + 1] for k, n in enumerate(modes))


def full_rank(modes: Sequence[int]) -> int:
    return max(rank_caps(modes, 1 << 62), default=1)


def choose_max_rank(spec: RankSpec, modes: Sequence[int], dense_params: int,
                    params: Callable[[int], int] | None = None) -> tuple[int | None, list[str]]:
    """The largest TT-rank ``R`` for ``spec`` (None for energy: per-step) and notes.

    ``params(R)`` is the layer's parameter count at ``R`` (default: the cores of ``modes``); a ratio
    no rank meets raises SkipLayer."""
    params = params or (lambda r: tt_params(modes, rank_caps(modes, r)))
    top = full_rank(modes)
    if spec.energy is not None:
        return None, []
    if spec.rank is not None:
        notes = [f"rank {spec.rank} clamped to the layer's largest TT-rank {top}"] if spec.rank > top else []
        return round_up(min(spec.rank, top), spec.multiple, top), notes
    budget = dense_params / spec.ratio
    rank = largest_rank_within(params, budget, top)
    if rank < 1:
        raise SkipLayer(f"no TT-rank meets ratio {spec.ratio:g} (modes {list(modes)}, {dense_params} dense params)")
    return round_down(rank, spec.multiple, top), []


def tt_svd(tensor: torch.Tensor, modes: Sequence[int], max_rank: int | None = None,
           energy: float | None = None, multiple: int = 1) -> list[torch.Tensor]:
    """TT-SVD of ``tensor`` seen with ``modes`` (big-endian): cores ``[r_{k-1}, n_k, r_k]`` in float64.

    Each step keeps ``min(max_rank, full)`` singular vectors, or (``energy``) the fewest that keep that
    fraction of the step's squared singular values, rounded up to ``multiple``. The cores are
    left-orthonormal, the norm stays in the last one."""
    rest = tensor.detach().double().reshape(-1)
    cores, r = [], 1
    for n in modes[:-1]:
        mat = rest.reshape(r * n, -1)
        u, s = left_singular(mat)
        if energy is not None:
            rank = round_up(energy_rank(s.numpy(), energy), multiple, s.numel())
        else:
            rank = min(max_rank if max_rank is not None else s.numel(), s.numel())
        cores.append(u[:, :rank].reshape(r, n, rank))
        rest = u[:, :rank].t() @ mat  # = s V^T truncated, and exact at full rank
        r = rank
    cores.append(rest.reshape(r, modes[-1], 1))
    return cores


def left_singular(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of ``mat [m, n]``, largest first.

    TT-SVD unfoldings are very wide or very tall; LAPACK's SVD took 10-90 s on such float64 matrices
    here, while the eigenvectors of the small Gram matrix (wide) or a QR then a small SVD (tall) take
    well under a second. The Gram route squares the condition number, which only blurs singular
    values below ~1e-8 of the largest: those are truncated, and the projection ``u^T mat`` keeps the
    full-rank result exact."""
    m, n = mat.shape
    if m <= n:
        gram = mat @ mat.t()
        with one_thread():
            values, vectors = torch.linalg.eigh(gram)
        return vectors.flip(1), values.flip(0).clamp_min(0).sqrt()
    with one_thread():
        q, r = torch.linalg.qr(mat)
        u, s, _ = torch.linalg.svd(r)
    return q @ u, s


def tt_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores ``[r_{k-1}, *mode_dims, r_k]`` into ``[r_0, *all mode dims, r_d]``."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    return full


def interleave(matrix: torch.Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> torch.Tensor:
    """``matrix [..., out, in]`` -> tensor ``[..., (a_1 b_1), ..., (a_d b_d)]`` where modes are little-endian
    (``a_1``/``b_1`` the least significant input/output digit), the layout the TT chains consume."""
    d, lead = len(in_modes), matrix.dim() - 2
    t = matrix.reshape(*matrix.shape[:lead], *reversed(out_modes), *reversed(in_modes))  # [.., b_d..b_1, a_d..a_1]
    perm = [*range(lead)] + [lead + p for k in range(1, d + 1) for p in (2 * d - k, d - k)]
    return t.permute(perm).reshape(*matrix.shape[:lead], *[a * b for a, b in zip(in_modes, out_modes)])


def deinterleave(full: torch.Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> torch.Tensor:
    """Inverse of ``interleave`` with one trailing dim: ``[a_1, b_1, ..., a_d, b_d, extra]`` -> ``[out, in, extra]``."""
    d = len(in_modes)
    t = full.reshape(*[m for pair in zip(in_modes, out_modes) for m in pair], -1)
    perm = [2 * k + 1 for k in reversed(range(d))] + [2 * k for k in reversed(range(d))] + [2 * d]
    return t.permute(perm).reshape(math.prod(out_modes), math.prod(in_modes), -1)
