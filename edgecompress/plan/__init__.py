"""Planning: each layer's method and rank chosen for a whole-model target (``allocate``, ``targets``)."""

from edgecompress.plan.allocate import Candidate, ScoreBound, allocate, choose
from edgecompress.plan.targets import parse_target

__all__ = ["Candidate", "ScoreBound", "allocate", "choose", "parse_target"]
