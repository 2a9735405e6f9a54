"""onnxruntime sessions: provider short names, clear errors when one is missing, and session options.

Every stage that runs an ONNX model (parity, quantization checks, bench) makes its session here,
so provider handling and thread settings live in one place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgecompress.errors import ConfigError, LoadError, ProviderUnavailableError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
}
_INSTALL_HINT = {
    "cuda": "install edgecompress[gpu] (onnxruntime-gpu, in place of onnxruntime) and a CUDA 12 runtime with cuDNN 9",
    "tensorrt": "install edgecompress[gpu] and TensorRT",
    "xnnpack": "use an onnxruntime build with XNNPACK (the Android/iOS packages have it)",
    "nnapi": "NNAPI runs on Android devices: use `edgecompress mobile` to check coverage here",
    "coreml": "CoreML runs on Apple devices: use `edgecompress mobile` to check coverage here",
}


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI or AVX-VNNI) integer dot products; True off x86.
    Without VNNI onnxruntime's U8S8 kernels multiply with VPMADDUBSW, whose 16-bit sums saturate
    (onnxruntime's quantization docs): measured here on an AVX2-only AMD EPYC, the trained digits CNN
    fell from 99.4% to 75% in int8, and back to 99.4% with 7-bit weights (reduce_range)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False  # unknown: assume the saturating kernels, whose fix only costs one bit of weight range
    return "avx512_vnni" in flags or "avx_vnni" in flags


def ort_module():
    """The onnxruntime module, or a clear error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ProviderUnavailableError(
            "onnxruntime is not installed: pip install 'edgecompress[cpu]' (or [gpu] for CUDA)"
        ) from None
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build has (e.g. ['cpu'])."""
    long_to_short = {v: k for k, v in PROVIDERS.items()}
    return [long_to_short.get(p, p) for p in ort_module().get_available_providers() if p != "AzureExecutionProvider"]


def resolve_provider(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider', or a clear error naming what is installed and what to install."""
    key = name.lower()
    long_name = PROVIDERS.get(key, name)
    if long_name not in PROVIDERS.values() and not name.endswith("ExecutionProvider"):
        raise ConfigError(f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}")
    if long_name not in ort_module().get_available_providers():
        hint = _INSTALL_HINT.get(key, "install an onnxruntime build that has it")
        raise ProviderUnavailableError(
            f"provider {name!r} is not available in this onnxruntime; available: "
            f"{', '.join(available_providers())}; to get it: {hint}"
        )
    return long_name


def session_options(threads: int | None = None, sequential: bool = True, spinning: bool = False, profile_prefix: str | None = None):
    """Session options for timing: fixed intra-op threads, spin-waiting off by default so that
    sessions interleaved in one process do not steal each other's cores (../shared/docs/measured.md)."""
    ort = ort_module()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def make_session(model: onnx.ModelProto | str | os.PathLike, provider: str = "cpu", threads: int | None = None, **options):
    """An InferenceSession on ``provider``; ``model`` is a path or an in-memory ModelProto."""
    providers = [resolve_provider(provider)]
    if providers[0] != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    return make_session_with(model, session_options(threads, **options), providers)


def optimized_graph(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The graph onnxruntime's CPU EP runs for ``model`` after its graph rewrites up to the extended level
    (QDQ pairs fused into QLinearConv, QGemm, ...; not the machine-specific NCHWc layout of level 'all')."""
    ort = ort_module()
    with tempfile.TemporaryDirectory(prefix="edgecompress-opt-") as tmp:
        options = session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        make_session_with(model, options, ["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath, load_external_data=False)


def make_session_with(model: onnx.ModelProto | str | os.PathLike, options, providers: list[str]):
    """An InferenceSession with these exact options and providers; a one-line LoadError if it fails."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort_module().InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LoadError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def run(session, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on inputs given by name or in order; a one-line ConfigError where the model cannot run
    on them (a dynamic dim that random samples filled with 1, as silero-vad's reflect Pad refuses)."""
    if not isinstance(inputs, Mapping):
        inputs = {i.name: np.asarray(x) for i, x in zip(session.get_inputs(), inputs)}
    quiet = ort_module().RunOptions()
    quiet.log_severity_level = 4  # the failure comes back as the one-line error below, not also as a log line
    try:
        return session.run(None, dict(inputs), quiet)
    except Exception as exc:  # onnxruntime raises its own exception types
        shapes = ", ".join(f"{k}={'x'.join(map(str, np.shape(v))) or 'scalar'}" for k, v in inputs.items())
        raise ConfigError(f"the model does not run on inputs of shape {shapes}: {str(exc).splitlines()[0]}; "
                          "give the shape it takes with --input-shape") from None


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file, with a one-line error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"ONNX file {str(path)!r} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise LoadError(f"{str(path)!r} is not a valid ONNX file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    external = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    missing = [f for f in external if not (path.parent / f).is_file()]
    if missing:
        raise LoadError(f"{str(path)!r} keeps its weights in external data, and {', '.join(missing)} is missing: "
                        f"put it beside the .onnx file")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise LoadError(f"{str(path)!r}: its external data cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not model.graph.node:
        raise LoadError(f"{str(path)!r} is not a valid ONNX model: its graph has no nodes")
    return model
