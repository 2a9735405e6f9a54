"""The method registry: which decomposer turns which layer type into a factorized layer.

A method module registers its decomposers with ``@register("tucker", nn.Conv2d)``. A decomposer is
``fn(layer, spec: RankSpec) -> Decomposition`` and raises ``SkipLayer(reason)`` to leave a layer dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from edgecompress.errors import UnknownNameError
from edgecompress.factorize.base import FactorizedLayer
from edgecompress.factorize.ranks import RankSpec


@dataclasses.dataclass
class Decomposition:
    module: FactorizedLayer
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


Decomposer = Callable[[nn.Module, RankSpec], Decomposition]
_METHODS: dict[str, dict[type, Decomposer]] = {}


def register(method: str, *layer_types: type, whitened: bool = True):
    """``whitened=False``: the decomposer ignores the activation statistics (TT-SVD fits the weight, and its
    chain is refined on data after), so none are gathered for it."""
    def decorate(fn: Decomposer) -> Decomposer:
        table = _METHODS.setdefault(method, {})
        for layer_type in layer_types:
            table[layer_type] = fn
        fn.whitened = whitened
        return fn

    return decorate


def whitens(decompose: Decomposer) -> bool:
    """Whether ``decompose`` fits its factors to the activation statistics it is given."""
    return getattr(decompose, "whitened", True)


def methods() -> list[str]:
    return sorted(_METHODS)


def check_method(method: str) -> str:
    if method not in _METHODS:
        raise UnknownNameError("method", method, _METHODS)
    return method


def candidate_types() -> tuple[type, ...]:
    """Every layer type some method can factorize."""
    return tuple({t for table in _METHODS.values() for t in table})


def decomposer_for(method: str, layer: nn.Module) -> Decomposer | None:
    table = _METHODS[check_method(method)]
    for cls in type(layer).__mro__:
        if cls in table:
            return table[cls]
    return None
