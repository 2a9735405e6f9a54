"""The report of a ``run``: one row per variant, a per-layer table per factorized variant, and plots.

``write_report(report, out_dir)`` writes ``report.json`` (machines), ``report.md`` (a terminal or a
pull request) and ``report.html``: one self-contained file, its matplotlib plots embedded as base64
PNG, with no script and no link to the network, so that it opens anywhere. The plots are latency vs
file size and accuracy (or agreement with the dense model, without labels) vs latency, with the
Pareto front marked: the variants that no other variant beats on both axes.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io as _io
import math
from pathlib import Path
from typing import Any

from edgecompress import io

ROW_KEYS = ("name", "method", "ratio", "int8", "compression", "params", "size_bytes", "macs", "latency_ms",
            "speedup", "accuracy", "agreement", "sqnr_db", "status", "error")


@dataclasses.dataclass
class Variant:
    name: str
    method: str
    ratio: float | None = None
    int8: bool = False
    compression: float | None = None
    params: int | None = None
    size_bytes: int | None = None
    macs: int | None = None
    latency_ms: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # threads -> {p50, p90}
    speedup: float | None = None  # dense p50 / this p50 at the first thread count
    accuracy: float | None = None
    agreement: float | None = None  # top-1 agreement with the dense model
    sqnr_db: float | None = None  # output SQNR against the dense model
    score: float | None = None  # the user's task metric (``--eval``), higher is better
    status: str = "ok"
    error: str | None = None
    failed_at: str | None = None
    speedup_by_threads: dict[str, float] = dataclasses.field(default_factory=dict)
    max_abs_diff: float | None = None
    onnx: str | None = None
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    layer_ms: dict[str, float] | None = None
    finetune: dict[str, Any] | None = None
    quantize: dict[str, Any] | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    plan: dict[str, Any] | None = None  # a planned variant: targets, reached, methods (per-layer choices in layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    model: str
    input_shape: list[int]
    config: dict[str, Any]
    data: dict[str, Any]
    variants: list[Variant] = dataclasses.field(default_factory=list)
    steps: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float | None = None

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def threads(self) -> str:
        return str(self.config["threads"][0])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "input_shape": self.input_shape, "config": self.config, "data": self.data,
                "variants": [v.to_dict() for v in self.variants], "pareto": pareto_front(self),
                "recommended": recommended(self),
                "steps": self.steps, "notes": self.notes, "seconds": self.seconds}


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    io.write_json(paths["json"], report.to_dict())
    io.write_text(paths["md"], to_markdown(report))
    io.write_text(paths["html"], to_html(report))
    return paths


def quality(v: Variant) -> float | None:
    """The user's score (``--eval``) when given, else accuracy when labels were given, else agreement with the
    dense model."""
    if v.score is not None:
        return v.score
    return v.accuracy if v.accuracy is not None else v.agreement


def quality_name(report: Report) -> str:
    if report.config.get("eval"):
        return f"score ({report.config['eval'].rpartition(':')[2]})"
    return "accuracy" if report.data.get("labels") else "agreement"


def p50(v: Variant, threads: str) -> float | None:
    return v.latency_ms.get(threads, {}).get("p50")


def recommended(report: Report) -> dict[str, Any] | None:
    """The fastest variant (p50 at the first thread count) whose quality is within ``max_drop`` (a fraction,
    from the run config; default 0.01, one point) of the dense model's; None without the figures."""
    dense = next((v for v in report.variants if v.name == "dense" and v.status == "ok"), None)
    if dense is None or quality(dense) is None:
        return None
    drop = report.config.get("max_drop", 0.01)
    fit = [v for v in report.variants if v.status == "ok" and quality(v) is not None and p50(v, report.threads)
           and quality(v) >= quality(dense) - drop]
    if not fit:
        return None
    best = min(fit, key=lambda v: p50(v, report.threads))
    return {"variant": best.name, "max_drop": drop, "quality": quality(best), "speedup": best.speedup,
            "compression": best.compression}


def pareto_front(report: Report) -> list[str]:
    """Names of the variants no other variant beats on both latency (lower) and quality (higher)."""
    points = [(p50(v, report.threads), quality(v), v.name) for v in report.variants if v.status == "ok"]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    front = []
    for lat, q, name in points:
        dominated = any(l2 <= lat and q2 >= q and (l2 < lat or q2 > q) for l2, q2, _ in points)
        if not dominated:
            front.append(name)
    return front


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "bytes":
        return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
    if kind == "count":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}k" if value >= 1e3 else str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def variant_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The main table as header + string rows (shared by Markdown, HTML and the CLI)."""
    threads = [str(t) for t in report.config["threads"]]
    header = ["variant", "method", "ratio", "int8", "compression", "params", "size", "MACs"]
    header += [f"ms p50/p90 {t}t" for t in threads]
    scored = bool(report.config.get("eval"))
    header += ["speedup", "accuracy" if report.data.get("labels") else "agreement",
               *([quality_name(report)] if scored else []), "SQNR dB", "status"]
    rows = []
    for v in report.variants:
        row = [v.name, v.method, _fmt(v.ratio), "yes" if v.int8 else "", _fmt(v.compression, "x"),
               _fmt(v.params, "count"), _fmt(v.size_bytes, "bytes"), _fmt(v.macs, "count")]
        for t in threads:
            lat = v.latency_ms.get(t)
            row.append(f"{lat['p50']:.3f}/{lat['p90']:.3f}" if lat else "-")
        row += [_fmt(v.speedup, "x"), _fmt(v.accuracy if v.accuracy is not None else v.agreement, "pct"),
                *([_fmt(v.score)] if scored else []), _fmt(v.sqnr_db),
                "ok" if v.status == "ok" else f"failed: {v.error}"]
        rows.append(row)
    return header, rows


def layer_rows(v: Variant) -> tuple[list[str], list[list[str]]]:
    """One row per candidate layer; a 'chain speedup' column when --keep-faster timed the chains."""
    timed = any("latency" in (layer.get("details") or {}) for layer in v.layers)
    planned = v.plan is not None
    header = ["layer", "type", "method", "ranks", "params", "MACs", "rel. error", "time ms",
              *(["chain speedup"] if timed else []), *(["plan damage", "runner-up"] if planned else []), "note"]
    rows = []
    for layer in v.layers:
        ms = (v.layer_ms or {}).get(layer["name"])
        speedup = ((layer.get("details") or {}).get("latency") or {}).get("speedup")
        rows.append([layer["name"], layer["type"], layer["method"], ",".join(map(str, layer.get("ranks") or [])) or "-",
                     f"{_fmt(layer['params_before'], 'count')} -> {_fmt(layer['params_after'], 'count')}",
                     f"{_fmt(layer.get('macs_before'), 'count')} -> {_fmt(layer.get('macs_after'), 'count')}",
                     _fmt(layer.get("rel_error")), _fmt(ms), *([_fmt(speedup, "x")] if timed else []),
                     *(_plan_cells((layer.get("details") or {}).get("plan")) if planned else []),
                     "; ".join(([layer["reason"]] if layer.get("reason") else []) + list(layer.get("notes") or []))])
    return header, rows


def _plan_cells(choice: dict | None) -> list[str]:
    if choice is None:
        return ["-", "-"]
    runner = choice.get("runner_up")
    return [f"{choice['damage']:.3g}", "-" if runner is None else f"{runner['choice']} ({runner['damage']:.3g})"]


def plan_line(v: Variant) -> str:
    from edgecompress.plan.targets import describe

    plan = v.plan
    line = (f"Planned for {describe(plan['targets'].items())}: reached {describe(plan['reached'].items())}, "
            f"methods {', '.join(plan['methods'])}; damage: {plan['damage']}.")
    return line + (f" Note: {plan['note']}" if plan.get("note") else "")


def finetune_rows(v: Variant) -> tuple[str, list[str], list[list[str]]]:
    """The fine-tuning of ``v``: a line (the loss and why, the epoch kept) and its per-epoch table."""
    f = v.finetune
    line = (f"Fine-tuning of {v.name}: loss {f['loss_kind']} ({f['loss_reason']}), feature term weight "
            f"{f['feature_weight']:g}, BatchNorm {f['batchnorm']}, {f['seconds']:.1f} s"
            + (f"; kept epoch {f['kept_epoch']}" if "kept_epoch" in f else "") + (f". {f['note']}" if f.get("note") else "")
            + (f". {f['backed_off']}" if f.get("backed_off") else "") + ".")
    score = (f"score ({f['scored_by'].rpartition(':')[2]}, --eval)" if f.get("scored_by")
             else "held-out score (agreement, or minus the output loss)")
    header = ["epoch", "loss", "output term", "feature term", score]
    rows = [[str(e["epoch"]), *(f"{e[k]:.4g}" if k in e else "-" for k in ("loss", "output", "feature", "score"))]
            for e in f["epochs"]]
    return line, header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _summary(report: Report) -> list[str]:
    data = report.data
    lines = [f"Model `{report.model}`, input {'x'.join(map(str, report.input_shape))}; provider "
             f"`{report.config['provider']}`; data: {data.get('source')}"
             + (f" ({data['samples']} samples)" if data.get("samples") else "") + ".",
             f"Latency: p50 / p90 in ms over {report.config['bench_runs']} interleaved rounds; speedup is dense p50 / "
             f"variant p50 at {report.threads} thread(s); compression is the whole model's parameter ratio to dense."]
    front = pareto_front(report)
    if front:
        lines.append(f"Pareto front (latency at {report.threads} thread(s) vs {quality_name(report)}): "
                     + ", ".join(front) + ".")
    pick = recommended(report)
    if pick:
        what = quality_name(report)
        if report.config.get("eval"):  # the user's score, in its own units
            within, value = f"{pick['max_drop']:g} of dense {what}", f"{what} {pick['quality']:.4g}"
        else:
            within, value = f"{100 * pick['max_drop']:g} point(s) of dense {what}", f"{100 * pick['quality']:.2f}%"
        lines.append(f"Recommended: {pick['variant']}, the fastest variant within {within} ({value}, "
                     f"{pick['speedup'] or 1:.2f}x faster, {pick['compression'] or 1:.2f}x fewer parameters).")
    bench = report.steps.get("bench", {})
    if bench.get("status") == "failed":
        lines.append(f"Benchmark step failed: {bench.get('error')}.")
    lines += report.notes
    if report.seconds is not None:
        lines.append(f"Run time: {report.seconds:.1f} s.")
    return lines


def to_markdown(report: Report) -> str:
    lines = [f"# edgecompress run: {report.model}", ""]
    lines += [line + "  " for line in _summary(report)] + [""]
    lines += _md_table(*variant_rows(report))
    for v in report.variants:
        if v.layers and not v.int8 and v.status == "ok":
            lines += ["", f"## Layers of {v.name}", ""] + ([plan_line(v), ""] if v.plan else []) + _md_table(*layer_rows(v))
        if v.finetune and v.finetune.get("epochs") and not v.int8:
            line, header, rows = finetune_rows(v)
            lines += ["", line, ""] + _md_table(header, rows)
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0;
font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}tr.failed td{color:#a00}tr.front td:first-child{font-weight:bold}
img{max-width:48%;margin-right:1%}h1{font-size:1.5em}h2{font-size:1.2em}"""


def _html_table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr class=\"{c}\">" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>"
                   for row, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(report: Report) -> str:
    from edgecompress.report_plots import plots

    header, rows = variant_rows(report)
    front = set(pareto_front(report))
    classes = ["failed" if v.status != "ok" else "front" if v.name in front else "" for v in report.variants]
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>edgecompress: {html.escape(report.model)}"
             f"</title><style>{_CSS}</style></head><body>", f"<h1>edgecompress run: {html.escape(report.model)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in _summary(report)]
    parts.append(_html_table(header, rows, classes))
    for title, png in plots(report):
        parts.append(f"<img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">")
    for v in report.variants:
        if v.layers and not v.int8 and v.status == "ok":
            parts += [f"<h2>Layers of {html.escape(v.name)}</h2>", *([f"<p>{html.escape(plan_line(v))}</p>"] if v.plan else []),
                      _html_table(*layer_rows(v))]
        if v.finetune and v.finetune.get("epochs") and not v.int8:
            line, header, rows = finetune_rows(v)
            parts += [f"<p>{html.escape(line)}</p>", _html_table(header, rows)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def png(fig) -> bytes:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()
