"""Shared tools of the benchmark scripts: export for timing, interleaved timing, node profiles, headers.

Timing follows docs/measured.md: every model of one comparison is loaded in the same process and run
in interleaved rounds (shuffled order each round) so that machine noise hits all of them alike; the
result is the median per-call time. Sessions come from ``edgecompress.runtime.make_session``, whose
options turn intra-op spin-waiting off: an idle session's spinning pool would otherwise steal the
other core from the session being timed. Inputs and outputs are bound once (IOBinding) so that the
per-call overhead is onnxruntime's own, not numpy conversions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from edgecompress import exporters, runtime


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call seconds over the rounds: median and quartiles; ``reps`` calls were averaged per sample."""

    median: float
    q1: float
    q3: float
    rounds: int
    reps: int
    samples: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # per round, in round order

    def to_dict(self) -> dict:
        return {"median_ms": self.median * 1e3, "q1_ms": self.q1 * 1e3, "q3_ms": self.q3 * 1e3,
                "min_ms": min(self.samples, default=self.median) * 1e3, "rounds": self.rounds, "reps": self.reps}


def command_line() -> str:
    """The command that is running, as a user would type it (for the top of a results file)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def machine_info() -> dict[str, str]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def export_for_timing(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[onnx.ModelProto, bool]:
    """Export with edgecompress's exporter (readable node names) and simplify; (proto, simplified)."""
    proto = exporters.export_onnx(module, inputs)
    return exporters.simplify(proto)


def _binding(session, feeds: Mapping[str, np.ndarray]):
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for out in session.get_outputs():
        binding.bind_output(out.name)
    return binding


def _per_call(session, binding, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - start) / reps


def time_interleaved(models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray], threads: int,
                     budget_s: float, min_rounds: int = 3, max_rounds: int = 200, sample_s: float = 2e-3,
                     warmup: int = 3, seed: int = 0) -> dict[str, Timing]:
    """Median per-call time of every model, timed in interleaved, shuffled rounds.

    Each sample averages enough calls to last about ``sample_s`` (microsecond-scale layers would
    otherwise measure the timer); the number of rounds is what fits in ``budget_s``, clamped to
    [min_rounds, max_rounds], so a very slow variant costs few rounds rather than the whole budget.
    """
    sessions = {k: runtime.make_session(p, "cpu", threads) for k, p in models.items()}
    bindings = {k: _binding(s, feeds) for k, s in sessions.items()}
    estimate = {}
    for key, session in sessions.items():
        _per_call(session, bindings[key], warmup)
        estimate[key] = _per_call(session, bindings[key], 2)
    reps = {k: max(1, round(sample_s / max(e, 1e-7))) for k, e in estimate.items()}
    per_round = sum(reps[k] * estimate[k] for k in sessions)
    rounds = int(min(max_rounds, max(min_rounds, budget_s // max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    order, rng = list(sessions), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            samples[key].append(_per_call(sessions[key], bindings[key], reps[key]))
    result = {}
    for key, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[key] = Timing(statistics.median(values), q[0], q[2], rounds, reps[key], tuple(values))
    return result


def profile_nodes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int = 1,
                  runs: int = 50) -> list[dict]:
    """Mean time per node of the graph onnxruntime actually runs (after its own rewrites: NCHWc
    layout changes show up as ReorderInput/ReorderOutput nodes), from its profiler, in run order."""
    with tempfile.TemporaryDirectory() as folder:
        session = runtime.make_session(model, "cpu", threads, profile_prefix=os.path.join(folder, "prof"))
        binding = _binding(session, feeds)
        warmup = 5
        _per_call(session, binding, warmup)
        _per_call(session, binding, runs)
        events = json.loads(Path(session.end_profiling()).read_text())
    total: dict[str, list] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        entry = total.setdefault(name, [event.get("args", {}).get("op_name", "?"), []])
        entry[1].append(event["dur"])
    # events come in time order: drop each node's warm-up calls (first-call allocations)
    return [{"node": name, "op": op, "mean_us": round(statistics.fmean(durs[warmup:] or durs), 2)}
            for name, (op, durs) in total.items()]
