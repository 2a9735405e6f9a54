"""``edgecompress bench``: time ONNX models side by side and print latency, size, memory and ratios."""

from __future__ import annotations

from pathlib import Path

import click
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from edgecompress import io
from edgecompress.bench import BenchConfig, bench, to_markdown
from edgecompress.cli._options import console, err_console
from edgecompress.errors import ConfigError


def _threads(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"bad --threads {text!r}: give counts joined by commas, e.g. 1,2,4") from None


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--provider", default="cpu", show_default=True, help="cpu, cuda, tensorrt, xnnpack, ...")
@click.option("--threads", default="1", show_default=True, help="Intra-op thread counts, e.g. 1,2,4.")
@click.option("--batch", type=int, default=None, help="Batch size (the model's batch must be dynamic). Default: the model's.")
@click.option("--input-shape", default=None, metavar="SHAPE",
              help="Fix dynamic dims for every model: 1x3x224x224, or name=SHAPE,name=SHAPE (the batch is its first dim).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per session.")
@click.option("--runs", type=int, default=None, help="Timed rounds (default 50).")
@click.option("--seconds", type=float, default=None, help="Time rounds for this long instead of --runs.")
@click.option("--baseline", default="0", show_default=True, help="Model the ratios are against: index or path.")
@click.option("--target", type=click.Choice(["mobile"]), default=None,
              help="Preset: mobile = batch 1, threads 1,2,4, sequential, no spin-waiting.")
@click.option("--profile", is_flag=True, help="Per-layer time from onnxruntime's profiler.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with inputs by name (and optional 'labels'): agreement with the baseline.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory probe (a fresh process per model).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for inputs and round order.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False), default=None, help="Write a Markdown table.")
def command(models, provider, threads, batch, input_shape, warmup, runs, seconds, baseline, target, profile, data, no_memory, seed,
            json_out, md_out):
    """Time MODELS (ONNX files) in interleaved rounds and compare them with the baseline."""
    config = BenchConfig.for_target(
        target, provider=provider, threads=_threads(threads), batch=batch, warmup=warmup, runs=runs, seconds=seconds,
        baseline=baseline, profile=profile, memory=not no_memory, data=data, seed=seed, input_shape=input_shape)
    for out in (json_out, md_out):
        if out:
            io.ensure_writable(out)
    with Progress(TextColumn("{task.description:<15}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        report = bench(list(models), config, progress)
    if json_out:
        io.write_json(json_out, report)
    if md_out:
        io.write_text(md_out, to_markdown(report))
    _print(report)


def _print(report: dict) -> None:
    cfg = report["config"]
    batches = sorted({r["batch"] for r in report["results"]})
    table = Table(title=f"{cfg['provider']}, batch {','.join(map(str, batches))}, latency ms; ratios vs "
                        f"{Path(cfg['baseline']).name}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("model", no_wrap=True)
    for name in ("thr", "p50", "p90", "p99", "speedup", "size", "size x", "RSS +", "placed"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in report["results"]:
        lat, ratio = r["latency_ms"], r["ratio"]
        table.add_row(r["name"], str(r["threads"]), *(_ms(lat[k]) for k in ("p50", "p90", "p99")),
                      _x(ratio["speedup"]), _mb(r["size_bytes"]), _x(ratio["size"]), _mb(r.get("rss_delta_bytes")),
                      f"{100 * r['placement']['placement_fraction']:.0f}%")
    console.print(table)
    for r in report["results"]:
        if r["placement"]["placement_fraction"] < 1.0:
            err_console.print(f"[yellow]warning[/]: {r['name']}: {cfg['provider']} took {r['placement']['nodes_on_provider']}"
                              f" of {r['placement']['nodes_total']} nodes; CPU ran {r['placement']['cpu_fallback_ops']}")
        if "profile" in r and len(report["results"]) == len(cfg["threads"]):  # one model: its own layer table
            _print_layers(r)
        if "agreement" in r:
            a = r["agreement"]
            sqnr = "identical" if a["sqnr_db"] is None else f"{a['sqnr_db']:.1f} dB"
            console.print(f"{r['name']} (threads {r['threads']}) vs baseline: max |diff| {a['max_abs_diff']:.3g}, SQNR {sqnr}"
                          + (f", top-1 agreement {a['top1_agreement']:.1%}" if "top1_agreement" in a else "")
                          + (f", accuracy {a['accuracy']:.1%}" if "accuracy" in a else ""))


    if any("layers_vs_baseline" in r for r in report["results"]):
        for threads in cfg["threads"]:
            _print_layer_comparison([r for r in report["results"] if r["threads"] == threads], cfg)


def _print_layer_comparison(results: list[dict], cfg: dict) -> None:
    """One row per layer: its time in the baseline and in every other model, with the speedup; a layer
    that got slower is red (the candidates to keep dense on this provider)."""
    base = next(r for r in results if "layers_vs_baseline" not in r)
    others = [r for r in results if "layers_vs_baseline" in r]
    table = Table(title=f"per layer, ms (threads {base['threads']}, {cfg['provider']}); speedup vs {base['name']}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("layer", no_wrap=True)
    table.add_column(base["name"], justify="right")
    for r in others:
        table.add_column(r["name"], justify="right")
        table.add_column("x", justify="right")
    layers = [row["layer"] for row in others[0]["layers_vs_baseline"]]
    by_model = [{row["layer"]: row for row in r["layers_vs_baseline"]} for r in others]
    for layer in layers:
        cells = [_opt_ms(by_model[0][layer]["baseline_ms"])]
        for rows in by_model:
            row = rows.get(layer, {})
            speedup = row.get("speedup")
            cells += [_opt_ms(row.get("ms")), "-" if speedup is None else
                      (f"[red]{speedup:.2f}x[/]" if speedup < 1 else f"{speedup:.2f}x")]
        table.add_row(layer, *cells)
    console.print(table)


def _opt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_layers(r: dict) -> None:
    p = r["profile"]
    table = Table(title=f"{r['name']} (threads {r['threads']}): {p['node_ms']:.3f} ms of node time, "
                        f"{p['attributed_fraction']:.1%} attributed to layers")
    table.add_column("layer")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    rows = sorted({**p["layers_ms"], **p["unattributed_ms"]}.items(), key=lambda kv: -kv[1])
    for name, ms in rows:
        table.add_row(name, f"{ms:.4f}", f"{ms / p['node_ms']:.1%}" if p["node_ms"] else "-")
    console.print(table)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M" if value < 1e8 else f"{value / 1e6:.0f}M"
