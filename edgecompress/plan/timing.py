"""Measured latency for a plan: each candidate layer timed alone on the provider, with a timing cache.

``time_layers`` exports every candidate of a layer (and the dense layer) as its own small ONNX model at batch 1,
quantizes it as ``quantize`` would when the precision is int8, and times all of them in interleaved rounds
(medians), so that drift of the machine hits every candidate alike. Timings are cached in a JSON file keyed by
the module's structure (its tree, hyperparameters and weight shapes, not values: ``_key``), the input shape,
the provider, threads, precision and the onnxruntime version: a later plan of the same shapes exports and
times nothing again.

Whole models are timed the same way (``interleaved_ms``, by ``plan.whole``), for the dense model's figure and
the end-to-end check.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from edgecompress import exporters, runtime

ROUNDS, WARMUP = 15, 3


def cache_path() -> Path:
    from edgecompress.models.wheels import cache_dir  # the one cache folder ($EDGECOMPRESS_CACHE)

    return cache_dir() / "timing.json"


def _load_cache() -> dict[str, float]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict[str, float]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        tmp.replace(path)
    except OSError:  # a cache that cannot be written only costs time
        pass


# bump when what a module becomes in ONNX changes (exporters.export_onnx, simplify, the chain modules' forward)
KEY_VERSION = 2


def _structure(module: nn.Module) -> str:
    """What decides the graph a module exports to, without exporting it: its tree (``repr``: each submodule's
    type and hyperparameters), its tensors' names, shapes and dtypes, and each submodule's plain attributes
    (ranks, modes). Not the weights' values: they change no node."""
    parts = [repr(module)]
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in (*module.named_parameters(), *module.named_buffers())]
    for name, sub in module.named_modules():
        plain = sorted((k, v) for k, v in vars(sub).items() if not k.startswith("_") and k != "training"
                       and isinstance(v, (bool, int, float, str, tuple, list)))
        parts.append(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}:{plain}")
    return "\n".join(parts)


def _key(module: nn.Module, shape: tuple[int, ...], config) -> str:
    """The cache key of ``module`` timed on an input of ``shape``: read from the module, so that a warm plan
    exports nothing (resnet18's latency plan: 530 candidate exports, 18 s)."""
    digest = hashlib.sha1(_structure(module).encode()).hexdigest()
    version = runtime.ort_module().__version__
    return f"{config.provider}/{config.threads}/{config.precision}/{version}/{shape}/m{KEY_VERSION}/{digest}"


def for_precision(proto: onnx.ModelProto, config) -> onnx.ModelProto:
    """``proto`` as it will run: quantized as ``quantize`` would when ``config.precision`` is int8."""
    if config.precision == "int8":
        from edgecompress.latency import int8_model

        return int8_model(proto, config.provider)
    return proto


def _onnx(module: nn.Module, samples: list[torch.Tensor], config) -> onnx.ModelProto:
    return for_precision(exporters.simplify(exporters.export_onnx(module.eval(), samples))[0], config)


def interleaved_ms(protos: list[onnx.ModelProto], feeds: list[dict[str, np.ndarray]], provider: str,
                   threads: int) -> list[float]:
    """Median ms of each model over ``ROUNDS`` rounds that run every model once, in turn."""
    sessions = [runtime.make_session(p, provider, threads) for p in protos]
    times: list[list[float]] = [[] for _ in sessions]
    for round_ in range(WARMUP + ROUNDS):
        for k, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            if round_ >= WARMUP:
                times[k].append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


def time_layers(modules: list[nn.Module], sample: torch.Tensor, config) -> list[float]:
    """Milliseconds of each of ``modules`` (one layer's dense layer and chains) on one input ``sample``."""
    cache = _load_cache()
    keys = [_key(m, tuple(sample.shape), config) for m in modules]
    todo = [k for k, key in enumerate(keys) if key not in cache]
    if todo:
        protos = [_onnx(modules[k], [sample], config) for k in todo]
        feeds = [{p.graph.input[0].name: sample.numpy()} for p in protos]
        for k, ms in zip(todo, interleaved_ms(protos, feeds, config.provider, config.threads)):
            cache[keys[k]] = ms
        _save_cache(cache)
    return [cache[key] for key in keys]
