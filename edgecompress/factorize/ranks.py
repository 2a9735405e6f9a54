"""How ranks are chosen: a fixed rank, a parameter-compression ratio, or an energy fraction.

``RankSpec`` is what the user asked for; the helpers here turn it into ranks for one layer.
Rounding: onnxruntime's CPU convolutions work on blocks of 8/16 channels (docs/methods.md), so a
rank is paid for up to the next block. An explicit ``rank`` or an ``energy`` rank is rounded *up* to
``multiple`` (free accuracy); a ``ratio`` rank is rounded *down* to ``multiple`` when that keeps at
least 80% of it, because the ratio is the contract the user asked for (and rounding down may gain
speed); a smaller rank stays as it is rather than overshoot the ratio.
Neither ever exceeds the layer's maximum rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from edgecompress.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Exactly one of ``rank`` (max rank), ``ratio`` (> 1) or ``energy`` (in (0, 1]); ``multiple`` >= 1."""

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    multiple: int = 8

    def __post_init__(self):
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of rank, ratio or energy, not {' and '.join(given)}")
        if self.rank is not None and (int(self.rank) != self.rank or self.rank < 1):
            raise ConfigError(f"rank must be an integer of at least 1, got {self.rank}")
        if self.ratio is not None and not self.ratio > 1:
            raise ConfigError(f"ratio must be above 1 (it is the parameter compression per layer), got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ConfigError(f"energy must be in (0, 1] (the fraction of singular-value energy kept), got {self.energy}")
        if int(self.multiple) != self.multiple or self.multiple < 1:
            raise ConfigError(f"rank multiple must be an integer of at least 1, got {self.multiple}")
        if not given:
            object.__setattr__(self, "ratio", 2.0)

    @property
    def kind(self) -> str:
        return "rank" if self.rank is not None else "energy" if self.energy is not None else "ratio"

    def describe(self) -> str:
        return f"{self.kind} {getattr(self, self.kind)}"


def round_up(rank: int, multiple: int, max_rank: int) -> int:
    return max(1, min(max_rank, math.ceil(rank / multiple) * multiple))


# rounding a ratio rank down to the block must not throw away more than this share of it
ROUND_DOWN_KEEP = 0.8


def round_down(rank: int, multiple: int, max_rank: int) -> int:
    """``rank`` rounded down to ``multiple``, unless that would drop more than a fifth of it (rank 14
    with multiple 8 stays 14: rank 8 would nearly double the compression asked for)."""
    rank = min(rank, max_rank)
    rounded = rank // multiple * multiple
    return rounded if rounded >= ROUND_DOWN_KEEP * rank else rank


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of the total squared energy."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    if total == 0:
        return 1
    return int(min(len(s2), np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1))


def largest_rank_within(params: Callable[[int], int], budget: float, max_rank: int) -> int:
    """The largest r in [1, max_rank] with params(r) <= budget (params grows with r); 0 if none."""
    lo, hi = 0, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if params(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def single_rank(spec: RankSpec, max_rank: int, params: Callable[[int], int], dense_params: int,
                singular_values: np.ndarray | None = None) -> tuple[int, list[str]]:
    """One rank for a layer whose cost is ``params(r)``; returns (rank, notes)."""
    notes: list[str] = []
    if spec.rank is not None:
        rank = spec.rank
        if rank > max_rank:
            notes.append(f"rank {rank} clamped to the layer's maximum {max_rank}")
        return round_up(min(rank, max_rank), spec.multiple, max_rank), notes
    if spec.energy is not None:
        if singular_values is None:
            raise ConfigError("energy needs singular values for this layer")
        return round_up(energy_rank(singular_values, spec.energy), spec.multiple, max_rank), notes
    rank = largest_rank_within(params, dense_params / spec.ratio, max_rank)
    return (round_down(rank, spec.multiple, max_rank) if rank else 0), notes
