"""``edgecompress run``: the whole job in one command, written up as report.json / .md / .html."""

from __future__ import annotations

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgecompress import pipeline
from edgecompress.cli._options import console, err_console, model_options
from edgecompress.errors import ConfigError, EdgeCompressError


class _RichProgress(pipeline.Progress):
    """One progress bar per pipeline stage, on stderr."""

    def __init__(self, bars: Progress):
        self.bars, self.tasks = bars, {}

    def start(self, stage: str, total: int) -> None:
        self.tasks[stage] = self.bars.add_task(stage, total=max(total, 1), detail="")
        if total == 0:
            self.bars.update(self.tasks[stage], completed=1, detail="nothing to do")

    def advance(self, stage: str, detail: str = "") -> None:
        self.bars.update(self.tasks[stage], advance=1, detail=detail)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise ConfigError(f"bad {what} {text!r}: write whole numbers joined by commas, e.g. 1,2") from None
    return values


@click.command("run")
@click.argument("model", required=False, default=None)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the ONNX files and report.json / report.md / report.html.")
@model_options
@click.option("--methods", default=None, metavar="M1,M2",
              help="Factorization methods, comma-separated. Default: svd,tucker,cp,tt (those installed).")
@click.option("--ratio", "ratios", type=float, multiple=True, help="Per-layer parameter compression (repeatable). Default: 2 and 4.")
@click.option("--int8/--no-int8", default=True, show_default=True, help="Also quantize every variant to int8 (the provider's default: on CPU static QDQ for conv nets, dynamic for Linear-only models).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with the inputs (and optional labels, train_inputs, train_labels). Default for the bundled model: its held-out set.")
@click.option("--calib", "calib_path", type=click.Path(), default=None, metavar="FILE.npz|DIR",
              help="Calibration samples (no labels) the factors are fitted to and int8 is calibrated on, read as "
                   "export --calib reads them. Default: --data's train part, else the bundled model's own data.")
@click.option("--provider", default="cpu", show_default=True, help="onnxruntime execution provider for bench and evaluation.")
@click.option("--threads", default="1,2", show_default=True, help="Thread counts to time, comma-separated, e.g. 1,2.")
@click.option("--finetune-epochs", type=int, default=0, show_default=True,
              help="Distil each factorized model from the dense one for N epochs before export.")
@click.option("--finetune-minutes", type=float, default=None,
              help="A time budget per variant for fine-tuning, besides --finetune-epochs.")
@click.option("--distill-loss", type=click.Choice(["kl", "bce", "mse"]), default=None,
              help="The distillation loss on the outputs. Default: from the output: kl for logits or "
                   "log-probabilities, bce for sigmoid probabilities, mse for regression.")
@click.option("--bench-runs", type=int, default=50, show_default=True, help="Timed rounds in the interleaved bench.")
@click.option("--profile", is_flag=True, help="Profile each variant to time every layer (slower).")
@click.option("--min-params", type=int, default=pipeline.RunConfig.min_params, show_default=True,
              help="Keep layers with fewer parameters dense (listed with the reason).")
@click.option("--head-share", type=click.FloatRange(0, 1), default=pipeline.RunConfig.head_share, show_default=True,
              metavar="SHARE",
              help="Keep the output layer (the last in forward order: no later layer corrects its errors) dense "
                   "while it holds at most this share of the layers' parameters (0: factorize it).")
@click.option("--data-free", is_flag=True,
              help="Fit the factors to the weights alone (the data then only measures). Default: fitted to the "
                   "data's train part (calibration), layer by layer.")
@click.option("--target", "targets", multiple=True, metavar="KIND=VALUE",
              help="Add a planned variant auto-<kind><value>x per target (params=4x, macs=4x, latency=2x: timed on "
                   "--provider at the first --threads, as int8 when the run makes int8 variants): each layer's "
                   "method (among --methods) and ratio chosen for that whole-model figure. "
                   "Default: params=<largest --ratio>.")
@click.option("--max-error", type=float, default=None, metavar="E",
              help="A bound on each planned variant's whole-model output error on the held-out calibration "
                   "samples (relative, e.g. 0.1): layers step back towards dense until it holds.")
@click.option("--max-drop", type=float, default=0.01, show_default=True,
              help="The report recommends the fastest variant within this drop of dense accuracy (0.01: one point; "
                   "with --eval, in the score's own units).")
@click.option("--eval", "user_eval", metavar="FILE.py:FUNCTION",
              help="Your task metric: a function taking an ONNX file's path and returning a score, higher is "
                   "better. Every variant is scored with it (the report's score column, the recommendation, the "
                   "Pareto front), and so is each fine-tuning epoch. A planned variant (--target) is stepped back "
                   "towards dense until it scores within --max-drop of dense (PyTorch models and ONNX files).")
@click.option("--no-plan", is_flag=True, help="No planned variant (only the uniform method x ratio ones).")
@click.option("--keep-faster", is_flag=True,
              help="Time each factorized layer against its dense layer (profiled on --provider, first --threads; "
                   "as int8 when --int8) and keep it dense where the chain is not faster.")
def command(model, out_dir, weights, input_shape, input_dtype, methods, ratios, int8, data, calib_path, provider, threads,
            finetune_epochs, finetune_minutes, distill_loss, bench_runs, profile, min_params, head_share, data_free,
            keep_faster, targets, no_plan, max_error, max_drop, user_eval):
    """Dense vs factorized vs int8 variants of MODEL, side by side: size, speed, accuracy.

    MODEL is a zoo name, path/to/file.py:factory or package.module:factory; default: the bundled
    digits CNN (trained weights and its held-out set ship with edgecompress). MODEL can also be an ONNX
    file: its variants are factorized in the file (svd, svd-spatial, tucker, cp), without fine-tuning.
    """
    from edgecompress.plan import parse_target

    if targets and no_plan:
        raise ConfigError("--target adds planned variants and --no-plan removes them: give one")
    ratios = tuple(ratios) or (2.0, 4.0)
    planned = () if no_plan else tuple(parse_target(t) for t in targets) or (("params", max(ratios)),)
    config = pipeline.RunConfig(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods is not None else None,
        ratios=ratios, int8=int8, provider=provider, threads=_ints(threads, "--threads"),
        finetune_epochs=finetune_epochs, finetune_minutes=finetune_minutes, distill_loss=distill_loss,
        bench_runs=bench_runs, profile=profile, min_params=min_params, head_share=head_share, data_free=data_free,
        keep_faster=keep_faster, targets=planned, max_drop=max_drop, eval=user_eval, max_error=max_error)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[detail]}"))
    with Progress(*columns, console=err_console, transient=False) as bars:
        report = pipeline.run(model, out_dir, config, data, weights, input_shape, input_dtype, _RichProgress(bars),
                              calib_path)
    _print(report, out_dir)
    if report.variant("dense").status != "ok":
        raise EdgeCompressError(f"the dense model itself failed: {report.variant('dense').error}")


def _print(report, out_dir: str) -> None:
    """A compact table (the full one is in the report files); failures listed below it."""
    threads = [str(t) for t in report.config["threads"]]
    quality = "acc" if report.data.get("labels") else "agree"
    table = Table(title=f"{report.model}: {sum(v.status == 'ok' for v in report.variants)} of "
                        f"{len(report.variants)} variants built")
    scored = bool(report.config.get("eval"))
    for col in ["variant", "compr", "size", *[f"p50 {t}t" for t in threads], "speedup", quality,
                *(["score"] if scored else []), "SQNR"]:
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for v in report.variants:
        q = v.accuracy if v.accuracy is not None else v.agreement
        lat = [f"{v.latency_ms[t]['p50']:.3f}" if t in v.latency_ms else "-" for t in threads]
        table.add_row(v.name, "-" if v.compression is None else f"{v.compression:.2f}x",
                      "-" if v.size_bytes is None else f"{v.size_bytes / 1e6:.2f}M", *lat,
                      "-" if v.speedup is None else f"{v.speedup:.2f}x", "-" if q is None else f"{100 * q:.1f}%",
                      *([("-" if v.score is None else f"{v.score:.4g}")] if scored else []),
                      "-" if v.sqnr_db is None else f"{v.sqnr_db:.1f}", style="red" if v.status != "ok" else None)
    console.print(table)
    for variant in report.variants:
        if variant.status != "ok":
            console.print(f"[red]{variant.name} failed[/red]: {variant.error}", markup=True)
    names = {v.name for v in report.variants}
    for note in report.notes:  # the run's own notes (calibration, data); each variant's are in the report
        if note.partition(":")[0] not in names:
            console.print(f"note: {note}", highlight=False, soft_wrap=True, style="dim")
    from edgecompress.report import recommended

    pick = recommended(report)
    if pick:
        within = f"{pick['max_drop']:g} of dense score" if scored else f"{100 * pick['max_drop']:g} point(s) of dense"
        console.print(f"recommended: {pick['variant']} (the fastest within {within})")
    console.print(f"report: {out_dir}/report.html, report.md, report.json ({report.seconds:.1f} s)")
