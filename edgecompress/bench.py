"""``bench(models, config)``: latency, memory, placement and agreement of ONNX models, side by side.

All models are timed in one process in interleaved rounds: each round runs every (model, threads)
session once, in an order shuffled per round (seeded), so that drift (thermal, other load) hits all
models alike. There is one session per (model, threads), spin-waiting is off (idle sessions must not
steal the cores of the one being timed, ../shared/docs/measured.md) and execution is sequential. Peak memory is
measured in a fresh process per (model, threads) and placement/per-layer time in a separate profiled
session (``edgecompress.profile``), so that neither disturbs the timed runs. See docs/bench.md.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecompress import io, runtime
from edgecompress import profile as prof
from edgecompress.errors import ConfigError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
             onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_}
TARGETS = ("mobile",)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    provider: str = "cpu"
    threads: tuple[int, ...] = (1,)
    batch: int | None = None  # None: the model's own batch (1 when dynamic)
    warmup: int = 5
    runs: int | None = None  # timed rounds; None with seconds=None means 50
    seconds: float | None = None  # or: rounds until this much time is spent timing
    baseline: int | str = 0  # index into models or one of their paths
    profile: bool = False
    profile_runs: int = 10
    memory: bool = True
    data: str | None = None  # .npz with inputs by name and optional 'labels'
    seed: int = 0
    sequential: bool = True
    spinning: bool = False
    input_shape: str | None = None  # fixes an ONNX file's dynamic dims: 1x3x224x224, or name=SHAPE,...

    def __post_init__(self):
        if not self.threads or any(int(t) < 1 for t in self.threads):
            raise ConfigError(f"threads must be positive integers such as 1,2,4, got {self.threads}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"batch must be at least 1, got {self.batch}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {self.warmup}")
        if self.runs is not None and self.seconds is not None:
            raise ConfigError("give --runs or --seconds, not both")
        if self.runs is not None and self.runs < 1:
            raise ConfigError(f"runs must be at least 1, got {self.runs}")
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"seconds must be positive, got {self.seconds}")
        if self.profile_runs < 1:
            raise ConfigError(f"profile runs must be at least 1, got {self.profile_runs}")

    @classmethod
    def for_target(cls, target: str | None, **fields) -> "BenchConfig":
        """A preset: 'mobile' is batch 1, threads 1, 2 and 4, sequential, no spin-waiting."""
        if target is None:
            return cls(**fields)
        if target != "mobile":
            raise ConfigError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
        return cls(**{**fields, "batch": 1, "threads": (1, 2, 4), "sequential": True, "spinning": False})


@dataclasses.dataclass
class _Model:
    path: str
    name: str
    proto: onnx.ModelProto
    size_bytes: int
    param_bytes: int
    batch: int
    feeds: dict[str, np.ndarray]


def bench(models: Sequence[str | Path], config: BenchConfig = BenchConfig(), progress: Progress | None = None) -> dict[str, Any]:
    """Time ``models`` side by side; returns {'config', 'environment', 'results': [one per model and threads]}."""
    if not models:
        raise ConfigError("give at least one ONNX model to bench")
    progress = progress or (lambda *_: None)
    runtime.resolve_provider(config.provider)  # an unavailable provider fails before any work
    loaded = [_load(path, config) for path in models]
    base = _baseline_index(models, config.baseline)
    keys = [(m, t) for t in config.threads for m in range(len(loaded))]
    results = {key: _result(loaded[key[0]], config, key[1]) for key in keys}
    sessions = _create_sessions(loaded, keys, results, config, progress)
    times = _time_rounds(sessions, keys, config, progress)
    for key in keys:
        results[key]["latency_ms"] = _stats(times[key])
        results[key]["runs"] = len(times[key])
        results[key]["throughput_per_s"] = round(1000.0 * loaded[key[0]].batch / results[key]["latency_ms"]["mean"], 3)
    del sessions
    _extras(loaded, keys, results, config, progress)
    for key in keys:
        results[key]["ratio"] = _ratio(results[key], results[(base, key[1])])
        if config.profile and key[0] != base:
            results[key]["layers_vs_baseline"] = prof.compare_layers(
                results[(base, key[1])]["profile"]["layers_ms"], results[key]["profile"]["layers_ms"])
    if config.data:
        _agreement(loaded, base, config, results)
    return {"config": {**dataclasses.asdict(config), "baseline": loaded[base].path},
            "environment": _environment(config), "results": [results[key] for key in keys]}


def _load(path: str | Path, config: BenchConfig) -> _Model:
    proto = runtime.load_onnx(path)
    if config.input_shape:  # every file is timed at this shape; the batch is the shape's first dim
        from edgecompress.graph.shapes import fixed, parse_input_shapes

        proto = fixed(proto, parse_input_shapes(config.input_shape, proto))
        batch = _graph_inputs(proto)[0].type.tensor_type.shape.dim[0].dim_value or 1  # other inputs may batch elsewhere
    else:
        batch = _set_batch(proto, config.batch, str(path))
    params = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    feeds = _random_feeds(proto, batch, config.seed)
    return _Model(str(path), Path(path).stem, proto, Path(path).stat().st_size, params, batch, feeds)


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def _set_batch(proto: onnx.ModelProto, batch: int | None, path: str) -> int:
    """Fix the batch to ``batch`` (1 by default) and return it: the first input's first dim, and the dims of
    the other inputs named like it (silero-vad's ``state`` is ``2 x batch x 128``; an unnamed dynamic first
    dim counts as the batch). A fixed first dim of the first input is the batch; a different ``batch`` is
    refused."""
    inputs = [v for v in _graph_inputs(proto) if v.type.tensor_type.shape.dim]
    if not inputs:
        return batch or 1
    lead = inputs[0].type.tensor_type.shape.dim[0]
    if lead.HasField("dim_value") and lead.dim_value > 0:
        if batch is not None and batch != lead.dim_value:
            raise ConfigError(f"{path!r} has a fixed batch of {lead.dim_value} (input {inputs[0].name!r}), so "
                              f"--batch {batch} cannot be run: re-export it with --dynamic-batch")
        return lead.dim_value
    name, batch = lead.dim_param, batch or 1
    for value in inputs:
        for k, dim in enumerate(value.type.tensor_type.shape.dim):
            named = bool(name) and dim.dim_param == name
            unnamed = not name and k == 0 and not dim.dim_param and not dim.dim_value
            if named or unnamed:
                dim.Clear()
                dim.dim_value = batch
    return batch


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in tensor.external_data if e.key == "length"), 0)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _random_feeds(proto: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in _graph_inputs(proto):
        ttype = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in ttype.shape.dim]
        dtype = _NP_TYPES.get(ttype.elem_type)
        if dtype is None:
            raise ConfigError(f"input {value.name!r} has an element type bench cannot make data for: pass --data")
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:  # token ids / indices: small values are valid for any vocabulary
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _baseline_index(models: Sequence[str | Path], baseline: int | str) -> int:
    if isinstance(baseline, int) or str(baseline).isdigit():
        index = int(baseline)
        if not 0 <= index < len(models):
            raise ConfigError(f"baseline index {index} is out of range: give 0 to {len(models) - 1} or a model path")
        return index
    for i, path in enumerate(models):
        if str(path) == str(baseline) or Path(path).resolve() == Path(baseline).resolve():
            return i
    raise ConfigError(f"baseline {baseline!r} is not one of the benched models: {', '.join(map(str, models))}")


def _result(model: _Model, config: BenchConfig, threads: int) -> dict[str, Any]:
    return {"model": model.path, "name": model.name, "provider": config.provider, "threads": threads,
            "batch": model.batch, "size_bytes": model.size_bytes, "param_bytes": model.param_bytes}


def _create_sessions(loaded, keys, results, config, progress) -> dict:
    sessions = {}
    for done, key in enumerate(keys):
        progress("sessions", done, len(keys))
        model = loaded[key[0]]
        start = time.perf_counter()
        session = runtime.make_session(model.proto, config.provider, key[1], sequential=config.sequential,
                                       spinning=config.spinning)
        created = time.perf_counter()
        try:
            runtime.run(session, model.feeds)
        except ConfigError as exc:
            raise ConfigError(f"{model.path!r}: {exc}") from None
        results[key]["session_create_ms"] = round(1000 * (created - start), 3)
        results[key]["first_run_ms"] = round(1000 * (time.perf_counter() - created), 3)
        sessions[key] = session
    for _ in range(config.warmup):
        for key in keys:
            sessions[key].run(None, loaded[key[0]].feeds)
    progress("sessions", len(keys), len(keys))
    return {key: (sessions[key], loaded[key[0]].feeds) for key in keys}


def _time_rounds(sessions, keys, config: BenchConfig, progress) -> dict:
    """Interleaved rounds: each round runs every session once, in a seeded shuffled order."""
    rng = random.Random(config.seed)
    times = {key: [] for key in keys}
    order = list(keys)
    rounds = config.runs if config.runs is not None else (None if config.seconds is not None else 50)
    start = time.perf_counter()
    done = 0
    while True:
        if rounds is not None and done >= rounds:
            break
        elapsed = time.perf_counter() - start
        if rounds is None and elapsed >= config.seconds and done >= 3:
            break
        rng.shuffle(order)
        for key in order:
            session, feeds = sessions[key]
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[key].append(1000.0 * (time.perf_counter() - t0))
        done += 1
        total = rounds if rounds is not None else max(done, int(done * config.seconds / max(elapsed, 1e-9)))
        progress("timing", done, total)
    return times


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    pct = np.percentile(a, [50, 90, 95, 99])
    values = {"min": a.min(), "mean": a.mean(), "p50": pct[0], "p90": pct[1], "p95": pct[2], "p99": pct[3],
              "std": a.std()}
    return {k: round(float(v), 4) for k, v in values.items()}


def _extras(loaded, keys, results, config: BenchConfig, progress) -> None:
    """Peak memory (fresh process), placement and per-layer time (profiled session), after timing."""
    placement_needed = config.profile or runtime.resolve_provider(config.provider) != "CPUExecutionProvider"
    for done, key in enumerate(keys):
        progress("memory/profile", done, len(keys))
        model, result = loaded[key[0]], results[key]
        if config.memory:
            memory = prof.peak_memory(model.proto, config.provider, key[1], model.feeds)
            result.update(memory or {"peak_rss_bytes": None, "rss_delta_bytes": None})
        if placement_needed:
            runs = config.profile_runs if config.profile else 1
            profiled = prof.profile(model.proto, config.provider, key[1], model.feeds, runs).to_dict()
            result["placement"] = {k: profiled[k] for k in ("nodes_total", "nodes_on_provider", "placement_fraction",
                                                            "cpu_fallback_ops")}
            if profiled["placement_fraction"] < 1.0:
                log.warning("%s: %s ran %d of %d nodes; the rest fell back to the CPU", model.name, config.provider,
                            profiled["nodes_on_provider"], profiled["nodes_total"])
            if config.profile:
                result["profile"] = {k: profiled[k] for k in ("node_ms", "attributed_fraction", "layers_ms",
                                                              "unattributed_ms")}
        else:
            result["placement"] = {"nodes_total": None, "nodes_on_provider": None, "placement_fraction": 1.0,
                                   "cpu_fallback_ops": {}, "note": "CPU provider only: every node runs on it"}
    progress("memory/profile", len(keys), len(keys))


def _ratio(result: dict, base: dict) -> dict[str, float | None]:
    def div(a, b):
        return round(a / b, 4) if a and b else None

    return {"speedup": div(base["latency_ms"]["p50"], result["latency_ms"]["p50"]),
            "size": div(base["size_bytes"], result["size_bytes"]),
            "params": div(base["param_bytes"], result["param_bytes"]),
            "memory": div(base.get("rss_delta_bytes"), result.get("rss_delta_bytes"))}


def _agreement(loaded: list[_Model], base: int, config: BenchConfig, results: dict) -> None:
    data, labels = load_data(config.data, _graph_inputs(loaded[base].proto))
    outputs = [_run_data(m, data, config) for m in loaded]
    for (index, _threads), result in results.items():
        result["agreement"] = agreement(outputs[index], outputs[base], labels)


def load_data(path: str | Path, inputs: list[onnx.ValueInfoProto]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs by name (cast to the model's dtypes) and optional 'labels' from an .npz file."""
    arrays = io.read_npz(path)
    labels = arrays.pop("labels", None)
    names = [i.name for i in inputs]
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ConfigError(f"data file {str(path)!r} lacks inputs {missing}: it has {sorted(arrays)}; "
                          "store each model input under its name (and optional 'labels')")
    data = {i.name: arrays[i.name].astype(_NP_TYPES.get(i.type.tensor_type.elem_type, np.float32)) for i in inputs}
    counts = {len(v) for v in data.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(f"data file {str(path)!r}: inputs and labels must have the same, non-zero number of rows")
    return data, labels


def agreement(output: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Max |diff|, SQNR in dB (None when identical), top-1 agreement and, with labels, accuracy."""
    out, ref = output.astype(np.float64), reference.astype(np.float64)
    noise = float(np.sum((ref - out) ** 2))
    result = {"samples": int(len(ref)), "max_abs_diff": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
              "sqnr_db": round(10 * np.log10(float(np.sum(ref ** 2)) / noise), 3) if noise > 0 else None}
    if ref.ndim >= 2:
        top, top_ref = out.argmax(-1), ref.argmax(-1)
        result["top1_agreement"] = float(np.mean(top == top_ref))
        if labels is not None:
            result["accuracy"] = float(np.mean(top.reshape(labels.shape) == labels))
    return result


def _run_data(model: _Model, data: dict[str, np.ndarray], config: BenchConfig) -> np.ndarray:
    """First output of ``model`` on all of ``data``, fed in chunks of the model's batch."""
    session = runtime.make_session(model.proto, config.provider, config.threads[0])
    count = len(next(iter(data.values())))
    chunks = []
    for start in range(0, count, model.batch):
        feed = {k: v[start:start + model.batch] for k, v in data.items()}
        short = model.batch - len(next(iter(feed.values())))
        if short:  # pad the last chunk for a fixed batch, then drop the padding
            feed = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in feed.items()}
        chunks.append(session.run(None, feed)[0][: model.batch - short])
    return np.concatenate(chunks)


def _environment(config: BenchConfig) -> dict[str, Any]:
    import os
    import platform

    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "available_providers": runtime.available_providers(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table (ratios against the baseline at the same thread count)."""
    cfg = report["config"]
    lines = [f"Provider `{cfg['provider']}`, baseline `{cfg['baseline']}`, onnxruntime "
             f"{report['environment']['onnxruntime']}; latency in ms over interleaved rounds.", "",
             "| model | threads | batch | p50 | p90 | p99 | mean | min | speedup | size | size ratio | peak RSS +MB | nodes on provider |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lat, ratio = r["latency_ms"], r["ratio"]
        delta = r.get("rss_delta_bytes")
        placed = r.get("placement", {}).get("placement_fraction")
        lines.append(
            f"| {r['name']} | {r['threads']} | {r['batch']} | {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | "
            f"{lat['mean']:.3f} | {lat['min']:.3f} | {_x(ratio['speedup'])} | {r['size_bytes'] / 1e6:.2f} MB | "
            f"{_x(ratio['size'])} | {'-' if delta is None else f'{delta / 1e6:.1f}'} | "
            f"{'-' if placed is None else f'{100 * placed:.0f}%'} |")
    for r in report["results"]:
        if "layers_vs_baseline" in r:
            lines += ["", f"Per layer, {r['name']} vs the baseline at {r['threads']} thread(s) (profiled, ms per run):", "",
                      "| layer | baseline ms | ms | speedup |", "|---|---:|---:|---:|"]
            lines += [f"| {row['layer']} | {_opt(row['baseline_ms'])} | {_opt(row['ms'])} | {_x(row['speedup'])} |"
                      for row in r["layers_vs_baseline"]]
    return "\n".join(lines) + "\n"


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
