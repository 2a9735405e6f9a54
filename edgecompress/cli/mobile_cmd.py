"""``edgecompress mobile``: ORT-format model, reduced-operator config, NNAPI/CoreML coverage, perf_test lines."""

from __future__ import annotations

import click
from rich.table import Table

from edgecompress.cli._options import console, err_console
from edgecompress.mobile import MobileConfig, mobile


@click.command("mobile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for MODEL.ort, its .required_operators.config and MODEL.mobile.json.")
@click.option("--target-platform", type=click.Choice(["arm", "amd64"]), default="arm", show_default=True,
              help="arm: phones (no x86-only layout optimizations).")
@click.option("--runs", type=int, default=100, show_default=True, help="Runs in the printed perf_test command.")
@click.option("--no-check", is_flag=True, help="Skip the NNAPI/CoreML usability check.")
def command(model, out_dir, target_platform, runs, no_check):
    """Prepare MODEL (ONNX) for onnxruntime mobile and check NNAPI/CoreML coverage."""
    config = MobileConfig(target_platform=target_platform, check=not no_check, perf_runs=runs)
    with err_console.status("converting to ORT format"):
        summary = mobile(model, out_dir, config)
    table = Table(title=f"{model} -> {summary['ort_model']} ({summary['ort_bytes'] / 1e6:.2f} MB)")
    for name in ("provider", "nodes", "covered", "partitions", "unsupported ops", "verdict"):
        table.add_column(name, justify="left" if name in ("provider", "unsupported ops") else "right")
    for ep, info in summary["coverage"].items():
        if isinstance(info, dict):
            table.add_row(ep, str(info["nodes"]), f"{info['coverage']:.0%}", str(info["partitions"]),
                          ", ".join(op.split(":")[-1] for op in info["unsupported_ops"]) or "-", info["suitability"])
    console.print(table)
    check = summary["ort_check"]
    console.print(f"ORT file loads and runs; max |diff| vs ONNX {check['max_abs_diff_vs_onnx']:.2e}")
    console.print(f"summary: {summary['summary_json']}")
    console.print("On a device (Android, adb; CoreML on macOS/iOS):")
    for line in summary["perf_test"].values():
        console.print(f"  {line}", soft_wrap=True, markup=False)
