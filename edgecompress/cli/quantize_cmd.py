"""``edgecompress quantize``: int8 quantization of an ONNX model, with what it cost in accuracy."""

from __future__ import annotations

import click
from rich.table import Table

from edgecompress import io
from edgecompress.cli._options import console, err_console, fmt_bytes
from edgecompress.errors import ConfigError
from edgecompress.quantize import (
    CALIB_METHODS,
    FORMATS,
    ISLANDS,
    MODES,
    TARGETS,
    QuantizeConfig,
    quantize,
)


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--int8", "int8", is_flag=True, help="Quantize to int8 (required: the only precision supported).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--mode", type=click.Choice(MODES), default=None, help="Default: static with calibration data, else dynamic (CPU).")
@click.option("--target", type=click.Choice(TARGETS), default="cpu", show_default=True, help="Where the model will run.")
@click.option("--calib", type=click.Path(), default=None, help="Calibration data: .npz (input name -> N samples) or a folder of .npy.")
@click.option("--calib-samples", default=16, show_default=True, help="Samples used for calibration (the rest of --calib is held out).")
@click.option("--eval-samples", default=8, show_default=True, help="Held-out samples for the accuracy figures.")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default="minmax", show_default=True)
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel. Default: per-channel for static.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="qdq", show_default=True)
@click.option("--exclude", multiple=True, metavar="NODE_PATTERN", help="Leave matching nodes (fnmatch on node names) in fp32; repeatable.")
@click.option("--balance/--no-balance", default=None, help="Balance scales between factors of factorized chains. Default: on when there are chains.")
@click.option("--no-compare-balance", is_flag=True, help="Quantize once (skip the with/without balancing comparison).")
@click.option("--random-calib", is_flag=True, help="Calibrate on random inputs (a last resort; warns).")
@click.option("--zoo-model", default=None, metavar="NAME", help="Calibrate on this zoo model's sample inputs.")
@click.option("--fp32-threshold", type=float, default=None, help="Leave layers whose added relative error is above this in fp32.")
@click.option("--dynamic-conv", is_flag=True, help="Dynamic mode: quantize Conv too (ConvInteger; slow on CPU).")
@click.option("--activations", type=click.Choice(["uint8", "int8"]), default=None,
              help="Static mode: activation type. Default: uint8 on cpu and mobile (2.5x faster than int8 on x86, "
                   "docs/quantize.md), int8 on cuda.")
@click.option("--input-shape", default=None, metavar="SHAPE",
              help="Fix the file's dynamic dims for random samples and the speed check: 1x3x224x224, or name=SHAPE,...")
@click.option("--no-speed-check", is_flag=True,
              help="Skip timing the int8 file against the input (1 CPU thread; it warns when int8 is slower).")
@click.option("--islands", type=click.Choice(ISLANDS), default="measure", show_default=True,
              help="Static CPU int8: ops left in float between Q/DQ pairs (HardSwish on the CPU EP). measure: per kind, "
                   "quantize again with them and the conv feeding each left float, and keep that where it runs "
                   "faster (1 thread; part of the speed check); int8: keep them as they are; float: always float.")
@click.option("--seed", default=0, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
def command(model, int8, out, mode, target, calib, calib_samples, eval_samples, calib_method, per_channel, fmt, exclude,
            balance, no_compare_balance, random_calib, zoo_model, fp32_threshold, dynamic_conv, activations, input_shape,
            no_speed_check, islands, seed, report_path):
    """Quantize the ONNX model MODEL to int8 and report what it cost (SQNR, top-1 agreement, worst layers)."""
    if not int8:
        raise ConfigError("quantize needs --int8 (the only precision supported)")
    config = QuantizeConfig(mode=mode, calib=calib, calib_samples=calib_samples, eval_samples=eval_samples,
                            calib_method=calib_method, per_channel=per_channel, format=fmt, exclude=tuple(exclude),
                            target=target, balance=balance, compare_balance=not no_compare_balance,
                            random_calib=random_calib, zoo_model=zoo_model, fp32_threshold=fp32_threshold,
                            dynamic_conv=dynamic_conv, activations=activations, seed=seed, input_shape=input_shape,
                            check_speed=not no_speed_check, islands=islands)
    if report_path:
        io.ensure_writable(report_path)
    with err_console.status("loading") as status:
        report = quantize(model, out, config, stage=lambda s: status.update(s))
    if report_path:
        io.write_json(report_path, report)
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}")
    _print_summary(report)


def _db(value) -> str:
    return "exact" if value is None else f"{value:.1f} dB"


def _print_summary(report: dict) -> None:
    table = Table(title=f"{report['input']} -> {report['output']}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    types = f"act {report['activation_type'] or 'dynamic'} / weights {report['weight_type']}"
    table.add_row("target / mode / format", f"{report['target']} / {report['mode']} / {report['format']}")
    table.add_row("types", f"{types}, {'per-channel' if report['per_channel'] else 'per-tensor'}")
    calib = report["calibration"]
    table.add_row("calibration", f"{calib['source']}: {calib['calibration_samples']} samples")
    table.add_row("evaluation", f"{calib['evaluation_samples']} samples, {'held out' if calib['held_out'] else 'NOT held out'}")
    table.add_row("size", f"{fmt_bytes(report['bytes_before'])} -> {fmt_bytes(report['bytes_after'])} ({report['compression']:.2f}x)")
    cov = report["coverage"]
    table.add_row("integer weight nodes", f"{cov['integer']} / {cov['weight_nodes']}")
    table.add_row("SQNR", _db(report["sqnr_db"]))
    table.add_row("max |int8 - fp32|", f"{report['max_abs_diff']:.3g}")
    if report["top1_agreement"] is not None:
        table.add_row("top-1 agreement", f"{100 * report['top1_agreement']:.1f}%")
    bal = report["balance"]
    if bal["chains"]:
        figures = ", ".join(f"{k.removeprefix('sqnr_db_')} {_db(bal[k])}" for k in ("sqnr_db_without", "sqnr_db_with") if k in bal)
        table.add_row("balancing", f"{'applied' if bal['applied'] else 'not applied'} ({bal['chains']} chains; {figures})")
    if report["fp32_layers"]:
        table.add_row("left in fp32", ", ".join(report["fp32_layers"]))
    if report.get("speed"):
        speed = report["speed"]
        table.add_row("speed vs input (1 CPU thread)", f"{speed['fp32_ms']:.2f} -> {speed['int8_ms']:.2f} ms ({speed['speedup']:.2f}x)")
    islands = (report.get("cpu_kernels") or {}).get("float_islands")
    if islands:
        table.add_row("float between Q/DQ", ", ".join(f"{op} x{n}" for op, n in islands.items()))
    console.print(table)
    worst = Table(title="worst layers (error added by the layer)")
    for col in ("layer", "op", "added rel. error", "SQNR at output"):
        worst.add_column(col, justify="left" if col == "layer" else "right")
    for rec in report["layers"][:8]:
        worst.add_row(rec["name"], rec["op"], f"{rec['local_error']:.3g}", _db(rec["sqnr_db"]))
    if report["layers"]:
        console.print(worst)
