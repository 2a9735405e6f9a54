"""--keep-faster measured: Tucker-4x with and without the per-layer choice, fp32 and int8, in one run per model.

One command (about 4 minutes on 2 cores):

    python benchmarks/keep_faster.py             # writes docs/benchmarks_keep_faster.md
    python benchmarks/keep_faster.py --quick     # cifar_conv only, few rounds, into out/bench_quick/

Per zoo model, six variants are exported with ``edgecompress.export`` (``latency_config`` is what
``--keep-faster`` sets) and quantized with ``edgecompress.quantize`` at the CPU default (calibrated on
the zoo model's seeded sample inputs). Then all of them are timed together by ``edgecompress.bench``
in interleaved rounds at 1 thread:
- dense, dense int8;
- tucker 4x, tucker 4x int8 (every layer the config selects is factorized);
- tucker 4x keep-faster (chosen on fp32 timings);
- tucker 4x keep-faster int8 (chosen on int8 timings, then quantized).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from edgecompress import io
from edgecompress.bench import BenchConfig, bench
from edgecompress.export import export
from edgecompress.factorize import FactorizeConfig
from edgecompress.latency import LatencyConfig
from edgecompress.quantize import QuantizeConfig, quantize

MODELS = ("mobilenet_v2", "resnet18", "cifar_conv")
ROOT = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(model: str, work: Path) -> tuple[list[tuple[str, Path]], dict[str, list[str]]]:
    """The six variants of ``model`` (name, path) and the layers each keep-faster variant kept dense."""
    tucker = FactorizeConfig(method="tucker", ratio=4)
    paths = {name: work / f"{model}.{name}.onnx" for name in
             ("dense", "tucker", "keep-faster", "keep-faster-int8-choice")}
    reverted = {}
    export(model, paths["dense"])
    export(model, paths["tucker"], factorize_config=tucker)
    for name, precision in (("keep-faster", "fp32"), ("keep-faster-int8-choice", "int8")):
        report = export(model, paths[name], factorize_config=tucker, latency_config=LatencyConfig(precision=precision))
        reverted[name] = report["latency"]["reverted"]
    variants = [("dense", paths["dense"]), ("tucker", paths["tucker"]), ("keep-faster", paths["keep-faster"])]
    for name in ("dense", "tucker", "keep-faster-int8-choice"):
        out = work / f"{model}.{name}.int8.onnx"
        quantize(paths[name], out, QuantizeConfig(zoo_model=model, compare_balance=False))
        variants.append((f"{'keep-faster' if name.startswith('keep') else name}-int8", out))
    return variants, reverted


def run_model(model: str, args, work: Path) -> tuple[list[dict], dict[str, list[str]]]:
    t0 = time.perf_counter()
    variants, reverted = build(model, work)
    say(f"{model}: 6 variants built in {time.perf_counter() - t0:.0f}s; timing for {args.seconds:g}s")
    report = bench([str(p) for _, p in variants], BenchConfig(threads=(1,), seconds=args.seconds, memory=False))
    names = {str(p): n for n, p in variants}
    rows = [{"model": model, "variant": names[r["model"]], "p50": r["latency_ms"]["p50"],
             "speedup": r["ratio"]["speedup"], "size_ratio": r["ratio"]["size"], "size": r["size_bytes"],
             "rounds": r["runs"]} for r in report["results"]]
    return rows, reverted


def write_markdown(rows: list[dict], reverted: dict, command: str, seconds: float, md: Path) -> None:
    lines = ["# --keep-faster: Tucker-4x with and without the per-layer choice (onnxruntime CPU, 1 thread)", "",
             f"Command: `{command}` (took {seconds / 60:.1f} min). Random weights, batch 1; p50 over interleaved "
             "rounds of all six variants of a model; speedup and size ratio against the dense fp32 model. "
             "`keep-faster` chose chain or dense layer on fp32 timings, `keep-faster-int8` on int8 timings "
             "(`--precision int8`) and was then quantized. int8: `edgecompress quantize` at its CPU default.", "",
             "| model | variant | p50 ms | speedup | size MB | size ratio | rounds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['p50']:.3f} | {r['speedup']:.2f}x | {r['size'] / 1e6:.2f} | "
                     f"{r['size_ratio']:.2f}x | {r['rounds']} |")
    lines += ["", "Layers kept dense:", ""]
    for model, by_variant in reverted.items():
        for variant, layers in by_variant.items():
            choice = "int8 timings" if "int8" in variant else "fp32 timings"
            lines.append(f"- {model}, {choice}: {len(layers)} ({', '.join(layers) or 'none'})")
    io.write_text(md, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="cifar_conv only, 3 s of timing, into out/bench_quick/.")
    p.add_argument("--models", default=None, help=f"Comma-separated zoo models (default {','.join(MODELS)}).")
    p.add_argument("--seconds", type=float, default=30.0, help="Timing per model (default 30).")
    p.add_argument("--md", default=None, help="Markdown output (default docs/benchmarks_keep_faster.md).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.quick:
        args.models, args.seconds = args.models or "cifar_conv", 3.0
    md = Path(args.md or (ROOT / "out" / "bench_quick" if args.quick else ROOT / "docs") / "benchmarks_keep_faster.md")
    start, rows, reverted = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory(prefix="edgecompress-bench-kf-") as tmp:
        for model in (args.models.split(",") if args.models else MODELS):
            model_rows, reverted[model] = run_model(model, args, Path(tmp))
            rows += model_rows
    seconds = time.perf_counter() - start
    write_markdown(rows, reverted, "python benchmarks/keep_faster.py" + (" --quick" if args.quick else ""), seconds, md)
    say(f"done in {seconds / 60:.1f} min: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
