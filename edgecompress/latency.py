"""Keep a layer dense where its factorized chain is not faster on the target provider, as measured.

Fewer MACs do not always mean less time. A 3-channel stem, a 10-class head or MobileNetV2's thin 1x1
convs can run slower as a chain of small kernels than as one dense kernel (docs/bench.md). ``keep_faster_``
measures this rather than guessing:
1. export the dense and the factorized model to ONNX, and with ``precision="int8"`` quantize both as
   ``edgecompress quantize`` would for that provider (int8 kernels favour other shapes than fp32 ones:
   on MobileNetV2, thin 1x1 chains at 0.9-1.1x of their dense layer in fp32 ran 1.7-3.8x slower in int8);
2. profile both on the provider (``edgecompress.profile``: time per layer, in context, with the layout
   changes the provider inserts charged to their layer);
3. put the dense layer back wherever the chain's speedup is below ``min_speedup``, except for embeddings
   (SIZE_ONLY), which are factorized for size and stay factorized, with the measured figures noted.
Each factorized layer's record gets ``details["latency"]`` (dense_ms, chain_ms, speedup, provider,
threads). A reverted record becomes dense with the measured reason. Ranks stay as the factorize config
chose them; choosing ranks from latency is a later step, and this record is what it needs.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgecompress import exporters, profile, runtime
from edgecompress.errors import ConfigError
from edgecompress.factorize.api import FactorizeReport

PRECISIONS = ("fp32", "int8")
# layers factorized to save bytes, not time: a lookup table's chain (Gather + MatMul) is always slower than
# the lookup, so judging it by time would undo every embedding factorization
SIZE_ONLY = ("Embedding",)


@dataclasses.dataclass(frozen=True)
class LatencyConfig:
    """``min_speedup``: the speedup a chain must show over its dense layer to be kept (1.0: any gain)."""

    provider: str = "cpu"
    threads: int = 1
    runs: int = 50
    min_speedup: float = 1.0
    precision: str = "fp32"  # or "int8": time both models as quantize's default int8 for this provider

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if int(self.threads) != self.threads or self.threads < 1:
            raise ConfigError(f"latency threads must be a whole number >= 1, got {self.threads}")
        if self.runs < 1:
            raise ConfigError(f"latency runs must be at least 1, got {self.runs}")
        if not self.min_speedup > 0:
            raise ConfigError(f"min speedup must be positive (1.0: keep any chain that is faster), got {self.min_speedup}")


def keep_faster_(factorized: nn.Module, dense: nn.Module, report: FactorizeReport, inputs: Sequence[torch.Tensor],
                 config: LatencyConfig = LatencyConfig()) -> dict[str, Any]:
    """Profile ``dense`` and ``factorized`` on ``config.provider`` and put dense layers back into
    ``factorized`` (in place) where the chain is not ``min_speedup`` faster; updates ``report``'s records.
    Returns a summary: kept and reverted layer names, whole-graph node time before and after."""
    runtime.resolve_provider(config.provider)  # an unavailable provider fails before any export
    if not report.factorized:
        return {"kept": [], "reverted": [], "config": dataclasses.asdict(config)}
    chains = [r.name for r in report.factorized]
    base, fact = (_layer_ms(m, inputs, config) for m in (dense, factorized))
    reverted = keep_faster_records(report, base["layers_ms"], fact["layers_ms"], config)
    for name in reverted:
        factorized.set_submodule(name, copy.deepcopy(dense.get_submodule(name)))
    return {"kept": [n for n in chains if n not in reverted], "reverted": reverted, "dense_node_ms": base["node_ms"],
            "factorized_node_ms": fact["node_ms"], "config": dataclasses.asdict(config)}


def keep_faster_records(report: FactorizeReport, dense_ms: dict[str, float], factorized_ms: dict[str, float],
                        config: LatencyConfig) -> list[str]:
    """The decision on per-layer profile times (layer -> ms, as ``edgecompress.profile`` gives them): every
    factorized record gets ``details["latency"]``; a record whose chain is slower than ``min_speedup``
    becomes dense with the measured reason. Returns the names made dense; the caller swaps the layers."""
    rows = {row["layer"]: row for row in profile.compare_layers(dense_ms, factorized_ms)}
    reverted = []
    for record in report.factorized:
        row = rows.get(record.name, {})
        speedup = row.get("speedup")
        record.details["latency"] = {"dense_ms": row.get("baseline_ms"), "chain_ms": row.get("ms"), "speedup": speedup,
                                     "provider": config.provider, "threads": config.threads,
                                     "precision": config.precision}
        if speedup is None:
            record.notes.append("latency not measured: the profiler attributed no time to this layer; kept as chosen")
            continue
        if speedup >= config.min_speedup:
            continue
        if record.type in SIZE_ONLY:
            record.notes.append(f"{record.type} is factorized for size (a lookup has no compute to save): kept "
                                f"although its chain ran {speedup:.2f}x the dense lookup's speed")
            continue
        record.method, record.ranks = "dense", []
        record.params_after, record.macs_after, record.rel_error = record.params_before, record.macs_before, None
        record.reason = (f"its {row['ms']:.4f} ms chain ran {speedup:.2f}x the dense layer's speed "
                         f"({row['baseline_ms']:.4f} ms) on {config.provider}, {config.threads} thread(s), "
                         f"{config.precision}: kept dense")
        reverted.append(record.name)
    return reverted


def _layer_ms(module: nn.Module, inputs: Sequence[torch.Tensor], config: LatencyConfig) -> dict[str, Any]:
    proto, _ = exporters.simplify(exporters.export_onnx(module, list(inputs)))
    feeds = {i.name: x.numpy() for i, x in zip(proto.graph.input, inputs)}
    if config.precision == "int8":
        proto = int8_model(proto, config.provider)
    result = profile.profile(proto, config.provider, config.threads, feeds, config.runs)
    return {"layers_ms": result.layers, "node_ms": result.node_ms}


def int8_model(proto, provider: str):
    """``proto`` quantized with quantize's defaults for the provider's target. The calibration data is
    random: the scales it gives change no kernel, and kernels are what is timed."""
    import onnx

    from edgecompress.quantize import QuantizeConfig, quantize, target_for

    target = target_for(provider)
    config = QuantizeConfig(target=target, random_calib=True, calib_samples=2, eval_samples=1, compare_balance=False,
                            check_speed=False)
    with tempfile.TemporaryDirectory(prefix="edgecompress-latency-") as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize(proto, out, config)
        return onnx.load(str(out))
