"""``edgecompress export``: (factorize,) export to ONNX, simplify, check parity, write a report."""

from __future__ import annotations

import click
from edgecompress.models import DEFAULT_MODEL
from rich.table import Table

from edgecompress import io
from edgecompress.cli._options import (
    console,
    err_console,
    fmt_bytes,
    fmt_int,
    model_options,
)
from edgecompress.cli.factorize_options import (
    factorize_config_from,
    factorize_options,
    judge_from,
    latency_config_from,
    latency_options,
    timed,
    torch_calibration_from,
)
from edgecompress.errors import ConfigError
from edgecompress.export import ExportConfig, export


@click.command("export")
@click.argument("model", required=False, default=None)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@model_options
@factorize_options
@latency_options
@click.option("--opset", default=17, show_default=True, help="ONNX opset.")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch dimension dynamic.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--tolerance", default=1e-4, show_default=True, help="Largest |ONNX - PyTorch| accepted.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
def command(model, out, weights, input_shape, input_dtype, opset, dynamic_batch, no_simplify, tolerance, report_path,
            keep_faster, min_speedup, precision, provider, threads, **fopts):
    """Export MODEL to ONNX, checked against PyTorch.

    MODEL is a zoo name (see `edgecompress models`), path/to/file.py:factory or package.module:factory;
    default: the bundled default model. With --method the supported layers are factorized first.
    MODEL can also be an ONNX file, as any exporter wrote it: its weights are read wherever they sit and
    BatchNormalization is folded into its Conv. With --method (svd, svd-spatial, tucker, cp, tt) its
    Conv/Gemm/MatMul/Gather weight nodes are factorized in the file itself; without, the file is written back
    clean (never larger). The error is measured against the original. For dynamic dims give --input-shape
    (1x3x224x224, or name=SHAPE,name=SHAPE for several inputs); the written file keeps them dynamic (tt: fixed).
    """
    model = model or DEFAULT_MODEL
    config = ExportConfig(opset=opset, dynamic_batch=dynamic_batch, simplify=not no_simplify, tolerance=tolerance)
    fconfig = factorize_config_from(**fopts)
    judge = judge_from(fopts["user_eval"], fopts["max_drop"])
    lconfig = latency_config_from(keep_faster, min_speedup, precision, provider, threads, fconfig)
    fconfig = timed(fconfig, precision, provider, threads)
    if report_path:
        io.ensure_writable(report_path)
    io.ensure_writable(out)
    if lconfig is not None:
        from edgecompress.runtime import resolve_provider

        resolve_provider(lconfig.provider)  # an unavailable provider fails before any work
    with err_console.status("loading") as status:
        if model.endswith(".onnx"):
            report = _export_onnx_file(model, out, config, fconfig, lconfig, weights, input_shape, status,
                                       fopts["calib_path"], judge)
        else:
            from edgecompress.loading import load_model

            loaded = load_model(model, weights, input_shape, input_dtype)
            calib = torch_calibration_from(loaded, fopts["calib_path"], fconfig)
            report = export(loaded, out, config, fconfig, stage=lambda s: status.update(s), latency_config=lconfig,
                            calib=calib, judge=judge)
    if fopts["save_plan"]:
        io.write_json(fopts["save_plan"], report["plan_config"])
    if report.get("plan", {}).get("note"):
        err_console.print(f"note: {report['plan']['note']}", highlight=False, soft_wrap=True)
    for warning in report.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if report_path:
        io.write_json(report_path, report)
    _print_summary(report)


def _export_onnx_file(model, out, config, fconfig, lconfig, weights, input_shape, status, calib_path, judge) -> dict:
    from edgecompress.graph import export_factorized_onnx

    unsupported = [flag for flag, given in (("--weights", weights), ("--dynamic-batch", config.dynamic_batch)) if given]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} cannot be used with an ONNX file as MODEL")
    return export_factorized_onnx(model, out, fconfig, config, stage=lambda s: status.update(s), latency_config=lconfig,
                                  calib_path=calib_path, input_shapes=input_shape, judge=judge)


def _print_summary(report: dict) -> None:
    totals, onnx_info = report["totals"], report["onnx"]
    table = Table(title=f"{report['model']} -> {onnx_info['path']}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    if "input_shape" in report:
        table.add_row("input", "x".join(map(str, report["input_shape"])))
    if report.get("source") == "onnx":
        graph = report["graph"]
        table.add_row("read", graph["normalized"])
        table.add_row("written", graph["written"])
        if graph["analysed_at"]:
            table.add_row("analysed at", ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in graph["analysed_at"].items()))
        if graph["unread"]:
            table.add_row("weight nodes left as they are", f"{len(graph['unread'])}: " + ", ".join(
                f"{u['node']} ({u['reason']})" for u in graph["unread"][:3]) + (" ..." if len(graph["unread"]) > 3 else ""))
        if graph["fixed_output"]:
            table.add_row("input dims", "fixed in the written file (TT chains bake the shape in)")
        for note in graph.get("notes", []):
            table.add_row("note", note)
    if report.get("method"):
        if "plan" in report:
            from edgecompress.plan.targets import describe, error_summary

            plan = report["plan"]
            table.add_row("plan", f"for {describe(plan['targets'].items())}, reached {describe(plan['reached'].items())}"
                          f"{error_summary(plan)} ({', '.join(plan['methods'])})")
        else:
            table.add_row("method", report["method"])
        table.add_row("factorized layers", f"{totals['factorized_layers']} (dense: {totals['dense_layers']})")
        table.add_row("params", f"{fmt_int(totals['params_dense'])} -> {fmt_int(totals['params'])}"
                      f" ({totals['params_dense'] / totals['params']:.2f}x)")
        if "macs" in totals:
            table.add_row("MACs", f"{fmt_int(totals['macs_dense'])} -> {fmt_int(totals['macs'])}")
            if totals["macs_dense"] and totals["macs"] > totals["macs_dense"]:
                table.add_row("note", f"{totals['macs'] / totals['macs_dense']:.1f}x the dense model's MACs: expect it "
                              "to run slower (--keep-faster keeps a layer dense where its chain is not faster)")
        error = report["error_vs_dense"]
        agree = f", top-1 agreement {100 * error['top1_agreement']:.1f}%" if "top1_agreement" in error else ""
        table.add_row("error vs dense (rel)", f"{error['rel_error']:.3g} on {error['samples']} "
                      f"{error.get('inputs', 'random inputs')}{agree}")
        if "latency" in report:
            latency = report["latency"]
            table.add_row(f"kept dense, chain slower on {latency['config']['provider']}",
                          ", ".join(latency["reverted"]) or "none")
    else:
        table.add_row("params", fmt_int(totals["params"]))
        if "macs" in totals:
            table.add_row("MACs", fmt_int(totals["macs"]))
        if "error_vs_dense" in report:
            error = report["error_vs_dense"]
            table.add_row("error vs input (max |diff|)", f"{error['max_abs_diff']:.2e} on {error['samples']} {error['inputs']}")
    if "bytes_input" in onnx_info:
        table.add_row("ONNX size", f"{fmt_bytes(onnx_info['bytes_input'])} -> {fmt_bytes(onnx_info['bytes'])}")
    else:
        table.add_row("ONNX size", fmt_bytes(onnx_info["bytes"]))
    table.add_row("nodes", f"{onnx_info['nodes']} ({', '.join(f'{k} {v}' for k, v in onnx_info['op_counts'].items())})")
    if "parity" in report:
        parity = report["parity"]
        table.add_row("parity max |diff|", f"{parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:g})")
    console.print(table)
