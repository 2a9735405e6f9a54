"""Dense vs every registered factorization method at 2x and 4x vs int8, on the reference zoo models.

One command (the full run takes well under 20 minutes on 2 cores):

    python benchmarks/models.py                 # writes docs/benchmarks_models.md and docs/img/models_latency_size.png
    python benchmarks/models.py --quick         # smoke test: cifar_conv, 2x only, a few rounds, into out/bench_quick/

Per zoo model, every variant is exported (with edgecompress.export: BatchNorm folded, onnxsim, parity
checked), then all variants of that model are timed together by ``edgecompress.bench.bench`` in
interleaved rounds (1 and 2 threads, spin-waiting off), so that drift hits all alike. Timing is
bounded by seconds per model group (slow variants, e.g. TT, simply get fewer rounds). A variant that
fails to export or quantize is listed with its reason, never dropped silently.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgecompress import io  # noqa: E402
from edgecompress.bench import BenchConfig, bench  # noqa: E402
from edgecompress.errors import EdgeCompressError  # noqa: E402
from edgecompress.export import export  # noqa: E402
from edgecompress.factorize import FactorizeConfig, methods  # noqa: E402
from edgecompress.quantize import QuantizeConfig, quantize  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "cifar_conv", "text_classifier")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Smoke test: cifar_conv, ratio 2, 1 thread, a few rounds.")
    p.add_argument("--models", default=None, help=f"Comma-separated zoo models (default {','.join(MODELS)}).")
    p.add_argument("--methods", default=None, help="Comma-separated methods (default: every registered one).")
    p.add_argument("--ratios", default="2,4", help="Parameter compression ratios (default 2,4).")
    p.add_argument("--threads", default="1,2", help="Thread counts (default 1,2).")
    p.add_argument("--seconds", type=float, default=30.0, help="Timing budget per model group (default 30).")
    p.add_argument("--budget-minutes", type=float, default=16.0,
                   help="Stop exporting new variants after this long (listed as skipped); default 16.")
    p.add_argument("--no-int8", action="store_true", help="Skip the int8 variants.")
    p.add_argument("--md", default=None, help="Markdown output (default docs/benchmarks_models.md).")
    p.add_argument("--plot", default=None, help="Plot output (default docs/img/models_latency_size.png).")
    p.add_argument("--work", default=None, help="Folder for the exported variants (default: a temporary one).")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or "cifar_conv"
        args.ratios, args.threads, args.seconds = "2", "1", 2.0
        out = ROOT / "out" / "bench_quick"
        args.md, args.plot = args.md or str(out / "benchmarks_models.md"), args.plot or str(out / "models_latency_size.png")
    args.md = args.md or str(ROOT / "docs" / "benchmarks_models.md")
    args.plot = args.plot or str(ROOT / "docs" / "img" / "models_latency_size.png")
    return args


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quantize_int8(src, dst, zoo_name):
    """quantize's CPU default, calibrated on the zoo model's seeded sample inputs: static QDQ (uint8
    activations, int8 per-channel weights) for conv nets, dynamic for Linear-only models."""
    config = QuantizeConfig(zoo_model=zoo_name, compare_balance=False)
    return quantize(str(src), str(dst), config)


def build_variants(model: str, args, work: Path) -> tuple[list[dict], list[dict]]:
    """Export dense, each method at each ratio, and int8 of each; return (ok, failed) variant dicts."""
    ok, failed = [], []
    over = lambda: time.perf_counter() > args.deadline  # noqa: E731
    dense = work / f"{model}.dense.onnx"
    export(model, dense)
    ok.append({"variant": "dense", "method": "dense", "ratio": 1.0, "int8": False, "path": dense})
    method_list = args.methods.split(",") if args.methods else methods()
    for method in method_list:
        for ratio in (float(r) for r in args.ratios.split(",")):
            name = f"{method}-{ratio:g}x"
            path = work / f"{model}.{name}.onnx"
            if over():
                failed.append({"variant": name, "reason": f"skipped: past --budget-minutes {args.budget_minutes:g}"})
                continue
            t0 = time.perf_counter()
            try:
                report = export(model, path, factorize_config=FactorizeConfig(method=method, ratio=ratio))
            except EdgeCompressError as exc:
                failed.append({"variant": name, "reason": str(exc)})
                continue
            if not report["totals"].get("factorized_layers"):
                failed.append({"variant": name, "reason": f"{method} factorized no layer of {model}"})
                continue
            say(f"{model}: exported {name} in {time.perf_counter() - t0:.1f}s")
            ok.append({"variant": name, "method": method, "ratio": ratio, "int8": False, "path": path})
    for fp32 in list(ok):
        name = f"{fp32['variant']}-int8"
        if args.no_int8 or over():
            failed.append({"variant": name, "reason": "--no-int8" if args.no_int8 else f"skipped: past --budget-minutes {args.budget_minutes:g}"})
            continue
        path = work / f"{model}.{name}.onnx"
        try:
            quantize_int8(fp32["path"], path, model)
        except Exception as exc:  # a failure of one variant is reported with its reason, the others go on
            failed.append({"variant": name, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            continue
        ok.append({**fp32, "variant": name, "int8": True, "path": path})
    return ok, failed


def run_model(model: str, args, work: Path) -> tuple[list[dict], list[dict]]:
    ok, failed = build_variants(model, args, work)
    threads = tuple(int(t) for t in args.threads.split(","))
    say(f"{model}: timing {len(ok)} variants x {len(threads)} thread settings for {args.seconds:g}s")
    config = BenchConfig(threads=threads, warmup=1 if args.quick else 3, seconds=args.seconds, memory=False)
    report = bench([v["path"] for v in ok], config)
    by_path = {str(v["path"]): v for v in ok}
    rows = []
    for r in report["results"]:
        v = by_path[r["model"]]
        rows.append({"model": model, "variant": v["variant"], "method": v["method"], "ratio": v["ratio"],
                     "int8": v["int8"], "threads": r["threads"], "p50": r["latency_ms"]["p50"],
                     "p90": r["latency_ms"]["p90"], "runs": r["runs"], "size_bytes": r["size_bytes"],
                     "speedup": r["ratio"]["speedup"], "size_ratio": r["ratio"]["size"]})
    return rows, [{"model": model, **f} for f in failed]


def write_markdown(rows: list[dict], failed: list[dict], args, seconds: float, plot: Path, md: Path) -> None:
    command = "python benchmarks/models.py" + (" --quick" if args.quick else "")
    lines = ["# Zoo models: dense vs factorized vs int8 (onnxruntime CPU)", "",
             f"Command: `{command}` (took {seconds / 60:.1f} min). Random weights, batch 1, latency p50/p90 in ms "
             "over interleaved rounds (edgecompress.bench, spin-waiting off); speedup and size ratio against the "
             "dense model at the same thread count. See docs/bench.md for how bench measures.", "",
             f"![latency vs size]({Path('img') / plot.name if plot.parent.name == 'img' else plot.name})", "",
             "| model | variant | threads | p50 ms | p90 ms | rounds | size MB | speedup | size ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['threads']} | {r['p50']:.3f} | {r['p90']:.3f} | {r['runs']} | "
                     f"{r['size_bytes'] / 1e6:.2f} | {r['speedup']:.2f}x | {r['size_ratio']:.2f}x |")
    if failed:
        lines += ["", "Variants not measured:", ""] + [f"- {f['model']} {f['variant']}: {f['reason']}" for f in failed]
    io.write_text(md, "\n".join(lines) + "\n")


def write_plot(rows: list[dict], plot: Path) -> None:
    models = sorted({r["model"] for r in rows}, key=lambda m: MODELS.index(m) if m in MODELS else 99)
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for t, marker in zip(threads, "os^D"):
            for r in (r for r in rows if r["model"] == model and r["threads"] == t):
                color = _color(r)  # int8 variants hollow
                ax.scatter(r["size_bytes"] / 1e6, r["p50"], marker=marker, s=40, edgecolors=color,
                           facecolors="none" if r["int8"] else color)
                ax.annotate(r["variant"], (r["size_bytes"] / 1e6, r["p50"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        ax.set(title=f"{model} (marker: {', '.join(f'{m}={t}T' for t, m in zip(threads, 'os^D'))})",
               xlabel="ONNX size (MB)", ylabel="p50 latency (ms)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    io.ensure_writable(plot)
    with io.atomic_path(plot) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _color(row: dict) -> str:
    palette = {"dense": "black", "svd": "tab:blue", "tucker": "tab:orange", "cp": "tab:green", "tt": "tab:red"}
    return palette.get(row["method"], "tab:purple")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    start = time.perf_counter()
    args.deadline = start + 60 * args.budget_minutes
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="edgecompress-bench-models-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in (args.models.split(",") if args.models else MODELS):
            model_rows, model_failed = run_model(model, args, work)
            rows += model_rows
            failed += model_failed
    seconds = time.perf_counter() - start
    md, plot = Path(args.md), Path(args.plot)
    write_plot(rows, plot)
    write_markdown(rows, failed, args, seconds, plot, md)
    say(f"done in {seconds / 60:.1f} min: {md}, {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
