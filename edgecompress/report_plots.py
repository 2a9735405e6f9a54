"""The report's plots as PNG bytes: latency vs file size, and accuracy vs latency with the Pareto front.

Figures are made with ``matplotlib.figure.Figure`` (no pyplot, no global state, no display needed).
One colour per method, hollow markers for fp32 and filled ones for int8; every point is labelled.
"""

from __future__ import annotations

from edgecompress.report import Report, Variant, p50, pareto_front, png, quality, quality_name

_COLORS = {"dense": "#222222", "svd": "#1f77b4", "svd-spatial": "#17becf", "tucker": "#2ca02c", "cp": "#d62728",
           "tt": "#9467bd", "tt-naive": "#8c564b", "auto": "#ff7f0e"}


def _color(method: str) -> str:
    return _COLORS.get(method, "#7f7f7f")


def _scatter(ax, variants: list[Variant], xs, ys, floor: float | None = None) -> None:
    """Points below ``floor`` are drawn on it as down-triangles, labelled with their true value."""
    for v, x, y in zip(variants, xs, ys):
        clipped = floor is not None and y < floor
        marker = "v" if clipped else "s" if v.int8 else "o"
        ax.scatter([x], [floor if clipped else y], s=50, marker=marker, edgecolors=_color(v.method),
                   facecolors=_color(v.method) if v.int8 else "none", linewidths=1.5, zorder=3)
        label = f"{v.name} ({y:.0f}%)" if clipped else v.name
        ax.annotate(label, (x, floor if clipped else y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    handles = {}
    for v in variants:
        handles.setdefault(v.method, ax.scatter([], [], marker="o", edgecolors=_color(v.method), facecolors="none"))
    ax.legend(list(handles.values()), list(handles), fontsize=7, title="filled square: int8", title_fontsize=7)
    ax.grid(True, alpha=0.3)


def latency_vs_size(report: Report) -> bytes | None:
    from matplotlib.figure import Figure

    t = report.threads
    vs = [v for v in report.variants if v.status == "ok" and p50(v, t) is not None and v.size_bytes]
    if not vs:
        return None
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    _scatter(ax, vs, [v.size_bytes / 1e6 for v in vs], [p50(v, t) for v in vs])
    _log_if_spread(ax, "y", [p50(v, t) for v in vs])
    ax.set_xlabel("ONNX file size (MB)")
    ax.set_ylabel(f"latency p50 (ms), {t} thread(s)")
    ax.set_title(f"{report.model}: latency vs size")
    return png(fig)


def quality_vs_latency(report: Report) -> bytes | None:
    from matplotlib.figure import Figure

    t = report.threads
    vs = [v for v in report.variants if v.status == "ok" and p50(v, t) is not None and quality(v) is not None]
    if not vs:
        return None
    scored = bool(report.config.get("eval"))
    label = quality_name(report) if scored else "accuracy" if report.data.get("labels") else "top-1 agreement with dense"
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    scale = 1 if scored else 100  # the user's score in its own units, else percent
    values = [quality(v) * scale for v in vs]
    # a few far-off variants would squash the ones worth comparing: show at most ~20 points below the best
    floor = 5 * ((max(values) - 20) // 5) if not scored and min(values) < max(values) - 20 else None
    _scatter(ax, vs, [p50(v, t) for v in vs], values, floor)
    _log_if_spread(ax, "x", [p50(v, t) for v in vs])
    if floor is not None:
        ax.set_ylim(floor - 1, max(values) + 1)
    front = set(pareto_front(report))
    points = sorted((p50(v, t), scale * quality(v)) for v in vs if v.name in front)
    if points:
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="#ff7f0e", linewidth=1.5,
                zorder=2, label="Pareto front")
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=160, facecolors="none", edgecolors="#ff7f0e",
                   linewidths=1.5, zorder=2)
    ax.set_xlabel(f"latency p50 (ms), {t} thread(s)")
    ax.set_ylabel(label if scored else f"{label} (%)")
    ax.set_title(f"{report.model}: {label} vs latency (Pareto front in orange)")
    return png(fig)


def _log_if_spread(ax, which: str, values: list[float]) -> None:
    """A log scale with plain tick labels (0.2, 0.5, 1, 2) when the values span more than 5x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not values or min(values) <= 0 or max(values) / min(values) <= 5:
        return
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plots(report: Report) -> list[tuple[str, bytes]]:
    """(title, PNG) for each plot that has data to draw."""
    made = [("latency vs size", latency_vs_size(report)), ("accuracy vs latency", quality_vs_latency(report))]
    return [(title, data) for title, data in made if data]
