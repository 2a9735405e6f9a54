"""``mobile(in_path, out_dir)``: the ORT-format model, its reduced-operator config, an NNAPI/CoreML
coverage summary and the ``onnxruntime_perf_test`` command lines to measure it on a device.

The conversion is onnxruntime's own (``onnxruntime.tools.convert_onnx_models_to_ort``, fixed
optimizations, ARM target: no x86-only NCHWc layout); the coverage comes from onnxruntime's mobile
usability checker (``onnxruntime.tools.mobile_helpers.usability_checker``), which estimates per
provider how many nodes its operator tables support and into how many partitions they fall (each
partition boundary is a copy between the accelerator and the CPU, onnxruntime#9054). Files are built
in a temporary folder and moved into ``out_dir`` only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import logging
import pathlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import io, runtime
from edgecompress.errors import ConfigError, EdgeCompressError, LoadError

log = logging.getLogger(__name__)

_EPS = {"nnapi": "nnapi_supported_ops.md", "coreml_neuralnetwork": "coreml_supported_neuralnetwork_ops.md",
        "coreml_mlprogram": "coreml_supported_mlprogram_ops.md"}


@dataclasses.dataclass(frozen=True)
class MobileConfig:
    target_platform: str = "arm"  # 'amd64' keeps x86-only layout optimizations
    check: bool = True
    perf_runs: int = 100

    def __post_init__(self):
        if self.target_platform not in ("arm", "amd64"):
            raise ConfigError(f"target platform {self.target_platform!r}: use 'arm' (phones) or 'amd64'")
        if self.perf_runs < 1:
            raise ConfigError(f"perf runs must be at least 1, got {self.perf_runs}")


def mobile(in_path: str | Path, out_dir: str | Path, config: MobileConfig = MobileConfig()) -> dict[str, Any]:
    """Write ``<stem>.ort``, ``<stem>.required_operators.config`` and ``<stem>.mobile.json`` into
    ``out_dir``; return the summary (also the JSON)."""
    in_path, out_dir = Path(in_path), Path(out_dir)
    proto = runtime.load_onnx(in_path)  # one-line error for a missing or corrupt file
    io.ensure_writable(out_dir / f"{in_path.stem}.ort")
    with tempfile.TemporaryDirectory(prefix="edgecompress-mobile-") as tmp:
        tmp = Path(tmp)
        source = tmp / "in" / f"{in_path.stem}.onnx"
        source.parent.mkdir()
        shutil.copyfile(in_path, source)
        ort_path, config_path = _convert(source, tmp / "out", config)
        check = _load_check(ort_path, in_path)
        coverage = usability(source) if config.check else {}
        summary = {"model": str(in_path), "ort_model": str(out_dir / ort_path.name),
                   "ort_bytes": ort_path.stat().st_size, "onnx_bytes": in_path.stat().st_size,
                   "required_operators_config": str(out_dir / config_path.name),
                   "required_operators": _read_ops(config_path), "nodes": len(proto.graph.node),
                   "ort_check": check, "coverage": coverage,
                   "perf_test": perf_test_commands(out_dir / ort_path.name, config.perf_runs),
                   "summary_json": str(out_dir / f"{in_path.stem}.mobile.json")}
        for produced in (ort_path, config_path):
            shutil.move(str(produced), out_dir / produced.name)
    io.write_json(summary["summary_json"], summary)
    return summary


def _convert(source: Path, out: Path, config: MobileConfig) -> tuple[Path, Path]:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    printed = _io.StringIO()  # the converter prints its progress; the library logs instead
    ort_log = logging.getLogger("ort_format_model.utils")
    level, ort_log.level = ort_log.level, logging.WARNING
    try:
        with contextlib.redirect_stdout(printed):
            convert_onnx_models_to_ort(source, output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=config.target_platform)
    except Exception as exc:
        raise EdgeCompressError(f"ORT-format conversion of {source.name!r} failed: {str(exc).splitlines()[0]}") from None
    finally:
        ort_log.setLevel(level)
    log.debug("converter: %s", printed.getvalue())
    ort_files = sorted(out.glob("*.ort"))
    configs = sorted(out.glob("*.config"))
    if not ort_files or not configs:
        raise EdgeCompressError(f"ORT-format conversion of {source.name!r} wrote no .ort/.config file")
    return ort_files[0], configs[0]


def _load_check(ort_path: Path, onnx_path: Path) -> dict[str, Any]:
    """Load the .ort file in an InferenceSession, run it once and compare with the ONNX model."""
    session = runtime.make_session(ort_path, "cpu", 1)
    reference = runtime.make_session(onnx_path, "cpu", 1)
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]
        if "float" in value.type:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float16 if "16" in value.type else np.float32)
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.int64 if "64" in value.type else np.int32)
    try:
        out, ref = session.run(None, feeds)[0], reference.run(None, feeds)[0]
    except Exception as exc:
        raise LoadError(f"the ORT-format model loads but does not run: {str(exc).splitlines()[0]}") from None
    return {"loads": True, "runs": True, "max_abs_diff_vs_onnx": float(np.max(np.abs(out.astype(np.float64) - ref)))}


def usability(path: Path) -> dict[str, Any]:
    """Per mobile provider: nodes supported, partitions, unsupported ops (onnxruntime's checker,
    run after basic optimizations as the ORT conversion does)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory(prefix="edgecompress-usability-") as tmp:
        optimized = pathlib.Path(tmp) / path.name
        optimize_model(path, optimized)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    helpers = Path(uc.__file__).parent
    dynamic_inputs, _ = uc.check_shapes(model.graph)
    summary: dict[str, Any] = {"dynamic_inputs": [i.name for i in dynamic_inputs]}
    for ep, table in _EPS.items():
        max_rank = 999 if ep == "nnapi" else 5  # CoreML handles tensors up to rank 5
        info = uc._check_ep_partitioning(model, helpers / table, True, max_rank)
        summary[ep] = _partition_dict(info)
    return summary


def _partition_dict(info) -> dict[str, Any]:
    return {"nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes,
            "coverage": round(info.num_supported_nodes / info.num_nodes, 4) if info.num_nodes else 0.0,
            "partitions": info.num_partitions,
            "partition_sizes": [len(group) for group in info.supported_groups],
            "unsupported_ops": sorted(info.unsupported_ops),
            "nodes_unsupported_due_to_op": info.nodes_unsupported_due_to_op,
            "nodes_unsupported_due_to_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
            "ops_with_unsupported_rank": sorted(info.ops_with_unsupported_rank),
            "caveats": info.supported_ops_checker.get_caveats(),
            "suitability": info.suitability().name}


def _read_ops(config_path: Path) -> list[str]:
    lines = [line.strip() for line in config_path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def perf_test_commands(ort_path: Path, runs: int = 100) -> dict[str, str]:
    """``onnxruntime_perf_test`` command lines that repeat bench's measurement on a device
    (-I: generated inputs, -m times -r N: N runs, -x 1: one intra-op thread; -x 2/4 for more)."""
    name = ort_path.name
    on_device = f"/data/local/tmp/{name}"
    base = f"onnxruntime_perf_test -I -m times -r {runs} -x 1"
    return {"push": f"adb push {ort_path} {on_device}",
            "cpu": f"adb shell /data/local/tmp/{base} -e cpu {on_device}",
            "nnapi": f"adb shell /data/local/tmp/{base} -e nnapi {on_device}",
            "xnnpack": f"adb shell /data/local/tmp/{base} -e xnnpack {on_device}",
            "coreml": f"{base} -e coreml {name}"}
