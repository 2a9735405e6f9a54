"""Turning what the user typed into a model and its sample inputs.

``MODEL`` is a zoo name, ``path/to/file.py:factory`` or ``package.module:factory``; weights come
from ``.safetensors`` or from ``.pt``/``.pth`` through ``torch.load(weights_only=True)``, so a
checkpoint that carries code is refused, never executed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pickle
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from edgecompress import models as zoo
from edgecompress.errors import ConfigError, LoadError

DTYPES = {"float32": torch.float32, "int64": torch.int64}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The shape and dtype of a model's single input; int64 inputs are token ids."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"input dtype {self.dtype!r} is not supported: use one of {', '.join(DTYPES)}")
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise ConfigError(f"input shape {self.shape} must have positive sizes, e.g. 1x3x224x224")

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)


@dataclasses.dataclass
class LoadedModel:
    name: str
    module: nn.Module
    input_spec: InputSpec


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    if not re.fullmatch(r"\s*\d+(\s*[x,]\s*\d+)*\s*", text or ""):
        raise ConfigError(f"bad input shape {text!r}: write sizes joined by 'x', e.g. 1x3x224x224")
    shape = tuple(int(p) for p in re.split(r"[x,]", text.replace(" ", "")))
    if any(d < 1 for d in shape):
        raise ConfigError(f"bad input shape {text!r}: every size must be at least 1")
    return shape


BUILD_SEED = 0


def load_model(
    model: str,
    weights: str | Path | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    input_dtype: str | None = None,
) -> LoadedModel:
    """Build ``model`` (zoo name or factory path), load ``weights``, and settle its input spec."""
    module, default_spec = _build(model)
    if weights is not None:
        load_weights_(module, weights)
    module.eval()
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    shape = tuple(input_shape) if input_shape else (default_spec.shape if default_spec else None)
    if shape is None:
        raise ConfigError(f"model {model!r} is not in the zoo, so its input is unknown: pass --input-shape, e.g. 1x3x224x224")
    dtype = input_dtype or (default_spec.dtype if default_spec else "float32")
    return LoadedModel(model, module, InputSpec(shape, dtype))


def _build(model: str) -> tuple[nn.Module, InputSpec | None]:
    # Built under a fixed seed (the global RNG left as it was): a zoo model without trained weights,
    # or a factory's random init, is the same model on every run, so its exports and figures repeat.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        return _build_unseeded(model)


def _build_unseeded(model: str) -> tuple[nn.Module, InputSpec | None]:
    if ":" not in model:
        spec = zoo.get_spec(model)  # UnknownNameError suggests close names
        return spec.factory(), InputSpec(spec.input_shape, spec.input_dtype)
    target, _, attr = model.rpartition(":")
    factory = getattr(_import_target(target, model), attr, None)
    if not callable(factory):
        raise LoadError(f"{model!r}: {target!r} has no callable {attr!r}; name a function that returns an nn.Module")
    try:
        module = factory()
    except Exception as exc:
        raise LoadError(f"{model!r}: calling {attr}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise LoadError(f"{model!r}: {attr}() returned {type(module).__name__}, expected a torch.nn.Module")
    spec = getattr(module, "input_spec", None)
    return module, spec if isinstance(spec, InputSpec) else None


def _import_target(target: str, model: str):
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target)
            if not path.is_file():
                raise LoadError(f"{model!r}: no such file {target!r}")
            name = f"_edgecompress_user_{abs(hash(path.resolve()))}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{model!r}: cannot import {target!r}: {type(exc).__name__}: {exc}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoadError(f"weights file {str(path)!r} is not a valid safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise LoadError(
                f"refusing {str(path)!r}: the checkpoint carries code, not only tensors ({_culprit(exc)}); "
                "save model.state_dict() or use .safetensors"
            ) from None
        raise LoadError(f"weights file {str(path)!r} is corrupt: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LoadError(f"weights file {str(path)!r} is corrupt or not a PyTorch checkpoint: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(f"weights file {str(path)!r} holds {type(obj).__name__}, expected a state dict of tensors")
    return obj


def _culprit(exc: Exception) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return f"it needs {match.group(1)}" if match else "it needs code to unpickle"


def load_weights_(module: nn.Module, path: str | Path) -> nn.Module:
    """Load the state dict at ``path`` into ``module`` strictly; say which keys do not match."""
    state = read_state_dict(path)
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise LoadError(f"weights {str(path)!r} do not match the model: {'; '.join(problems)}")
    return module


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def sample_inputs(module: nn.Module, spec: InputSpec, count: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs for ``module``: normal floats, or token ids below its first Embedding's size."""
    gen = torch.Generator().manual_seed(seed)
    if spec.dtype == "int64":
        # factorized embeddings keep a ``num_embeddings`` attribute, so this holds after factorizing too
        vocab = next((int(m.num_embeddings) for m in module.modules() if hasattr(m, "num_embeddings")), 100)
        return [torch.randint(0, vocab, spec.shape, generator=gen) for _ in range(count)]
    return [torch.randn(spec.shape, generator=gen) for _ in range(count)]
