"""int8 size and accuracy on the zoo models, dense and factorized: the table in docs/quantize.md.

One command (about 3 minutes on 2 cores):

    python benchmarks/quantize.py               # writes docs/benchmarks_quantize.md
    python benchmarks/quantize.py --quick       # cifar_conv only, into out/bench_quick/

Every case is exported with ``edgecompress.export`` and quantized with ``edgecompress.quantize`` at the
CPU defaults, calibrated on the zoo entry's own inputs (digits_cnn: its training split; evaluation on the
held-out split; the other entries: seeded sample inputs, evaluation on another seed). Static cases also
quantize once without balancing, so both SQNR figures are in the table. Latency is benchmarks/models.py's job.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path


from edgecompress import io
from edgecompress.export import export
from edgecompress.factorize import FactorizeConfig, read_config_file
from edgecompress.quantize import QuantizeConfig, quantize

ROOT = Path(__file__).resolve().parents[1]
# (zoo model, method or None for dense, mode or None for the CPU default, factorize config file)
CASES = (
    ("cifar_conv", None, None, None),
    ("cifar_conv", "tucker", None, None),
    ("cifar_conv", "svd", None, None),
    ("cifar_conv", "cp", None, None),
    ("resnet18_cifar", None, None, None),
    ("resnet18_cifar", "tucker", None, None),
    ("resnet18_cifar", "svd", None, None),
    ("digits_cnn", "cp", "static", None),
    ("text_classifier", None, None, None),
    ("text_classifier", "svd", None, None),
    ("cifar_conv_fc", "svd", "dynamic", None),
    ("cifar_conv_fc", "tt", "dynamic", ROOT / "examples" / "tt_cifar_conv_fc.json"),
)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_case(model: str, method: str | None, mode: str | None, config_file: Path | None, work: Path) -> dict:
    name = f"{model}-{method or 'dense'}"
    fp32, int8 = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    if config_file is not None:
        fconfig = FactorizeConfig(**read_config_file(config_file))
    else:
        fconfig = FactorizeConfig(method=method, ratio=4) if method else None
    export(model, fp32, factorize_config=fconfig)
    report = quantize(fp32, int8, QuantizeConfig(mode=mode, zoo_model=model))
    coverage = report["coverage"]
    balance = report["balance"]
    both = balance.get("sqnr_db_without"), balance.get("sqnr_db_with")
    return {"model": model, "variant": f"{method} 4x" if method and not config_file else (method or "dense"),
            "mode": report["mode"], "before": report["bytes_before"], "after": report["bytes_after"],
            "sqnr": report["sqnr_db"], "top1": report["top1_agreement"],
            "coverage": f"{coverage['integer']}/{coverage['weight_nodes']}",
            "balance": "no chains" if not balance["chains"] else
                       f"{_db(both[0])} / {_db(both[1])} ({'applied' if balance['applied'] else 'kept without'})",
            "integer_ops": ", ".join(f"{op} {n}" for op, n in report["cpu_kernels"]["integer"].items()),
            "float_ops": len(report["cpu_kernels"]["float_weight_ops"])}


def _db(value) -> str:
    return "exact" if value is None else f"{value:.1f}"


def write_markdown(rows: list[dict], command: str, seconds: float, md: Path) -> None:
    lines = ["# int8 size and accuracy (edgecompress quantize, CPU defaults)", "",
             f"Command: `{command}` (took {seconds / 60:.1f} min). Factorized variants at `--ratio 4` (TT: "
             "examples/tt_cifar_conv_fc.json). Calibrated on the zoo entry's inputs (digits_cnn: training "
             "split, evaluated on the held-out split; the others: seeded sample inputs, evaluated on another "
             "seed). SQNR over the model output against fp32. Coverage: weight nodes that became integer ops in "
             "the file. Integer kernels and float weight ops: what onnxruntime's CPU EP runs after fusing the QDQ "
             "pairs (report key `cpu_kernels`).", "",
             "| model | variant | mode | fp32 -> int8 | smaller | SQNR dB | top-1 agreement | coverage | "
             "integer kernels | float weight ops | SQNR without / with balancing |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['mode']} | {r['before'] / 1e6:.2f} MB -> "
                     f"{r['after'] / 1e6:.3f} MB | {r['before'] / r['after']:.2f}x | {_db(r['sqnr'])} | "
                     f"{r['top1']:.0%} | {r['coverage']} | {r['integer_ops']} | {r['float_ops']} | {r['balance']} |")
    io.write_text(md, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="cifar_conv only, into out/bench_quick/.")
    p.add_argument("--md", default=None, help="Markdown output (default docs/benchmarks_quantize.md).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    md = Path(args.md or (ROOT / "out" / "bench_quick" if args.quick else ROOT / "docs") / "benchmarks_quantize.md")
    cases = [c for c in CASES if c[0] == "cifar_conv"] if args.quick else CASES
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="edgecompress-bench-quantize-") as tmp:
        for case in cases:
            t0 = time.perf_counter()
            rows.append(run_case(*case, Path(tmp)))
            r = rows[-1]
            say(f"{r['model']} {r['variant']}: {r['before'] / r['after']:.2f}x smaller, SQNR {_db(r['sqnr'])} dB "
                f"({time.perf_counter() - t0:.0f}s)")
    seconds = time.perf_counter() - start
    write_markdown(rows, "python benchmarks/quantize.py" + (" --quick" if args.quick else ""), seconds, md)
    say(f"done in {seconds / 60:.1f} min: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
