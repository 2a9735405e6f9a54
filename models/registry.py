"""The model registry: ``@register_model`` on a factory, ``create_model(name)``, ``list_models()``.

Each entry knows the input it expects (shape and dtype), so that every later stage can make sample
inputs without asking the user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from edgecompress.errors import UnknownNameError

# (count, seed, held_out) -> a batch of ``count`` real inputs, from the held-out split when asked
SampleFn = Callable[[int, int, bool], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: its factory, the input it expects, and (for models trained on shipped data) real
    sample inputs, which int8 calibration prefers over random ones."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    description: str = ""
    samples: SampleFn | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(input_shape: tuple[int, ...], input_dtype: str = "float32", samples: SampleFn | None = None):
    """Register ``factory`` under its function name, with the input it expects (and real samples)."""

    def decorate(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[factory.__name__] = ModelSpec(
            factory.__name__, factory, tuple(input_shape), input_dtype, doc[0] if doc else "", samples
        )
        return factory

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("model", name, _REGISTRY) from None


def create_model(name: str) -> nn.Module:
    """A fresh, randomly initialised instance of the zoo model ``name`` (in eval mode)."""
    return get_spec(name).factory().eval()
