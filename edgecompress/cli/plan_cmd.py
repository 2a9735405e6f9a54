"""``edgecompress plan``: the per-layer factorization table (ranks, params, MACs, error) without exporting."""

from __future__ import annotations

import click
from rich import box
from rich.console import Console
from rich.table import Table

from edgecompress.cli._options import console, err_console, fmt_int, model_options
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
from edgecompress.io import to_json
from edgecompress.plan.targets import describe, error_summary


@click.command("plan")
@click.argument("model")
@model_options
@factorize_options
@latency_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--sequential", is_flag=True,
              help="With data: fit layer by layer in the compressed model, as export does (one partial forward per "
                   "layer). Default: each layer on the dense model's inputs, all from one calibration pass.")
def command(model, weights, input_shape, input_dtype, as_json, sequential, keep_faster, min_speedup, precision, provider,
            threads, **fopts):
    """Show what factorizing MODEL would do, layer by layer, without exporting.

    MODEL is a zoo name (see `edgecompress models`), path/to/file.py:factory or package.module:factory,
    or an ONNX file (its Conv/Gemm/MatMul/Gather weight nodes, read as any exporter wrote them; methods svd,
    svd-spatial, tucker, cp, tt). For an ONNX file with dynamic dims give --input-shape (1x3x224x224, or
    name=SHAPE,name=SHAPE), or --calib data, which fixes them; MACs are counted at that shape.
    """
    from edgecompress.factorize import plan

    config = factorize_config_from(**fopts)
    if config is None:
        raise ConfigError("plan needs --method (svd, svd-spatial, tucker, cp, tt, ...) or --target KIND=VALUE")
    judge = judge_from(fopts["user_eval"], fopts["max_drop"])
    latency = latency_config_from(keep_faster, min_speedup, precision, provider, threads, config)
    config = timed(config, precision, provider, threads)
    if latency is not None:
        from edgecompress.runtime import resolve_provider

        resolve_provider(latency.provider)  # an unavailable provider fails before any work
    with err_console.status("factorizing") as status:
        if model.endswith(".onnx"):
            from edgecompress.graph import factorize_onnx
            from edgecompress.runtime import load_onnx

            if weights:
                raise ConfigError("--weights cannot be used with an ONNX file as MODEL")
            _, report = factorize_onnx(load_onnx(model), config, latency_config=latency, calib_path=fopts["calib_path"],
                                       sequential=sequential, input_shapes=input_shape, judge=judge)
        else:
            from edgecompress.loading import load_model

            loaded = load_model(model, weights, input_shape, input_dtype)
            calib = torch_calibration_from(loaded, fopts["calib_path"], config)
            report = plan(loaded, config, progress=lambda name, i, n: status.update(f"factorizing {name} ({i + 1}/{n})"),
                          latency_config=latency, calib=calib, sequential=sequential, judge=judge)
    if fopts["save_plan"]:
        from edgecompress.io import write_json

        write_json(fopts["save_plan"], report.config.to_file())
    if report.plan and report.plan.get("note"):
        err_console.print(f"note: {report.plan['note']}", highlight=False, soft_wrap=True)
    if as_json:
        click.echo(to_json({"model": model, **report.to_dict()}))
        return
    # piped output gets rich's default 80 columns, which would truncate every column: widen it
    out = console if console.is_terminal else Console(width=160, highlight=False)
    out.print(_table(model, report))


def _table(model: str, report) -> Table:
    t = report.totals()
    caption = (f"{t['factorized_layers']} factorized, {t['dense_layers']} left dense; params {_change(t['params_before'], t['params_after'])}, "
               f"MACs {_change(t['macs_before'], t['macs_after'])}")
    if report.graph:  # an ONNX file: how it was read
        graph = report.graph
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in graph["analysed_at"].items())
        caption += f"\nread with {graph['normalized']}; analysed at {shapes}"
        if graph["unread"]:
            caption += "; weight nodes left as they are: " + ", ".join(f"{u['node']} ({u['reason']})" for u in graph["unread"])
    plan = report.plan
    what = (f"plan for {describe(plan['targets'].items())}, reached {describe(plan['reached'].items())}"
            f"{error_summary(plan)}" if plan
            else f"{report.config.method}, {report.config.rank_spec().describe()}")
    table = Table(title=f"{model}: {what} ({report.seconds:.1f} s)",
                  caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    chain_timed = any("latency" in r.details for r in report.layers)
    table.add_column("layer", no_wrap=True)
    measured = any(r.output_error is not None for r in report.layers)
    columns = ("type", "method", "ranks", "params", "after", "MACs", "after", "error")
    columns += (("output error", "in model") if measured else ()) + (("speedup",) if chain_timed else ())
    columns += ("damage", "runner-up") if plan else ()
    for col in columns:
        table.add_column(col, justify="left" if col in ("type", "method") else "right", no_wrap=True)
    table.add_column("reason / notes", overflow="fold", min_width=30)
    for r in report.layers:
        remark = "; ".join(([r.reason] if r.reason else []) + r.notes)
        error = "-" if r.rel_error is None else f"{r.rel_error:.3g}"
        speedup = (r.details.get("latency") or {}).get("speedup")
        outputs = [_error(r.output_error), _error(r.output_error_in_model)] if measured else []
        table.add_row(r.name, r.type, r.method, ",".join(map(str, r.ranks)) or "-", fmt_int(r.params_before),
                      fmt_int(r.params_after), fmt_int(r.macs_before), fmt_int(r.macs_after), error, *outputs,
                      *(("-" if speedup is None else f"{speedup:.2f}x",) if chain_timed else ()),
                      *(_planned(r.details.get("plan")) if plan else ()), remark)
    return table


def _planned(choice: dict | None) -> tuple[str, str]:
    """The plan's damage of a layer's choice and its runner-up (the label and damage)."""
    if choice is None:
        return "-", "-"
    runner = choice.get("runner_up")
    return f"{choice['damage']:.3g}", "-" if runner is None else f"{runner['choice']} ({runner['damage']:.3g})"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _change(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return fmt_int(before)
    ratio = f" ({before / after:.2f}x)" if after else ""
    return f"{fmt_int(before)} -> {fmt_int(after)}{ratio}"
