"""Layer benchmark: every registered factorization method against the dense layer on onnxruntime CPU.

For the 3x3 conv shapes of ResNet-18 and the BERT-base FFN Linears, each method of
``edgecompress.factorize.methods()`` at about 2x, 4x and 8x parameter reduction is exported (torch.onnx,
onnxsim) and timed with the dense layer and the peer (the same layer factorized by tensorly-torch,
exported with torch.onnx where it can be) in interleaved rounds at 1 and 2 threads, batch 1. Reported:
actual parameter ratio, ranks, MAC ratio, measured speedup, efficiency = speedup / MAC ratio.
Random weights (timing does not depend on the values); decomposition time is not timed.

    python benchmarks/layers.py            # full run -> docs/benchmarks_layers.md and .json (~6-9 min, 2 cores)
    python benchmarks/layers.py --quick    # smoke run: few rounds
    python benchmarks/layers.py --case conv128@28 --methods tucker --ratios 4   # one cell
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import click
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, export_for_timing, machine_info, profile_nodes, time_interleaved  # noqa: E402

from edgecompress import exporters, io  # noqa: E402
from edgecompress.factorize import FactorizeConfig, factorize, methods  # noqa: E402
from edgecompress.factorize.registry import decomposer_for  # noqa: E402
from edgecompress.stats import count_macs, count_params  # noqa: E402

CASES = ("conv64@56", "conv128@28", "conv256@14", "conv512@7",
         "linear768x3072r1", "linear768x3072r128", "linear3072x768r1", "linear3072x768r128")
# tltorch factorization -> our method whose parameter count it is matched to
PEERS = {"conv": {"tucker": "tucker", "cp": "cp", "tt": "tt"}, "linear": {"blocktt": "tt"}}
PEER_NOTES = ("tltorch peers: conv 'tucker' is Tucker-2 (fixed_rank_modes='spatial'), implementation='factorized'; "
              "Linear 'cp'/'tucker' are left out: they put the input and all factors in one Einsum whose intermediates "
              "need tens of GiB (exporting 'cp' on the 768x3072 weight tried to allocate 186 GB). Peers have the "
              "parameter count of the matching edgecompress variant (tucker, cp, tt; blocktt <-> tt).")
err = Console(stderr=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer shape: ``conv{C}@{HW}`` (3x3, C->C, padding 1) or ``linear{in}x{out}r{rows}`` (1 x rows x in)."""

    name: str
    kind: str
    dims: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str) -> Case:
        if m := re.fullmatch(r"conv(\d+)@(\d+)", spec):
            return cls(spec, "conv", tuple(map(int, m.groups())))
        if m := re.fullmatch(r"linear(\d+)x(\d+)r(\d+)", spec):
            return cls(spec, "linear", tuple(map(int, m.groups())))
        raise click.BadParameter(f"{spec!r}: use conv<C>@<HW> or linear<in>x<out>r<rows>, e.g. {CASES[0]}, {CASES[4]}")

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        if self.kind == "conv":
            c, hw = self.dims
            layer, x = nn.Conv2d(c, c, 3, padding=1), torch.randn(1, c, hw, hw, generator=gen)
        else:
            n_in, n_out, rows = self.dims
            layer, x = nn.Linear(n_in, n_out), torch.randn(1, rows, n_in, generator=gen)
        return layer.eval(), x

    def title(self) -> str:
        if self.kind == "conv":
            return f"Conv2d 3x3 {self.dims[0]}->{self.dims[0]} @ {self.dims[1]}x{self.dims[1]}"
        return f"Linear {self.dims[0]}->{self.dims[1]}, {self.dims[2]} row{'s' if self.dims[2] > 1 else ''}"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def _finish(module: nn.Module, x: torch.Tensor, dense_params: int, dense_macs: int, row: dict) -> dict:
    """Export, simplify and check one module; fill in params, MACs and graph facts of ``row``."""
    params, macs = count_params(module), count_macs(module, [x])[0]
    row.update(params=params, param_ratio=dense_params / params, macs=macs, mac_ratio=dense_macs / max(macs, 1))
    try:
        proto, simplified = export_for_timing(module, [x])
    except Exception as exc:  # the peer's failures are a result, not a crash
        row["skip"] = f"export failed: {_short(exc)}"
        return row
    ops = exporters.op_counts(proto)
    parity = exporters.check_parity(proto, module, [[x]])
    row.update(ops=ops, simplified=simplified, parity_max_abs=parity.max_abs_diff, proto=proto)
    if "Einsum" in ops:
        row["notes"].append("contains Einsum")
    return row


def build_ours(method: str, ratio: float, layer: nn.Module, x: torch.Tensor, dense: dict) -> dict:
    row = {"key": f"{method}@{ratio:g}x", "family": "edgecompress", "method": method, "target": ratio, "notes": []}
    try:
        model, report = factorize(nn.Sequential(layer), FactorizeConfig(method=method, ratio=ratio), [x])
    except Exception as exc:  # another method's bug must not stop the benchmark: it is reported
        return {**row, "skip": f"error: {_short(exc)}"}
    record = report.layers[0]
    if record.method == "dense":
        return {**row, "skip": record.reason or "left dense"}
    row.update(ranks=record.ranks, decompose_s=record.seconds, rel_error=record.rel_error, chain=record.method)
    row["notes"] += record.notes
    return _finish(model, x, dense["params"], dense["macs"], row)


def build_peer(case: Case, fac: str, fraction: float, ratio: float, layer: nn.Module, x: torch.Tensor,
               dense: dict, decompose: bool) -> dict:
    row = {"key": f"tltorch-{fac}@{ratio:g}x", "family": "tltorch", "method": f"tltorch {fac}", "target": ratio,
           "notes": [f"rank={fraction:.4f} of the weight"]}
    try:
        import tltorch
    except ImportError:
        return {**row, "skip": "tensorly-torch (tltorch) is not installed"}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = _tltorch_layer(tltorch, case, fac, fraction, layer, decompose)
    except Exception as exc:
        return {**row, "skip": f"tltorch failed: {_short(exc)}"}
    rank = module.rank
    row.update(ranks=list(rank) if isinstance(rank, (tuple, list)) else [int(rank)],
               decompose_s=time.perf_counter() - start)
    if not decompose:
        row["notes"].append("random factors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finish(nn.Sequential(module).eval(), x, dense["params"], dense["macs"], row)


def _tltorch_layer(tltorch, case: Case, fac: str, fraction: float, layer: nn.Module, decompose: bool) -> nn.Module:
    # ALS iterations capped: tltorch's own decomposition of a 512-channel kernel takes 10-50 s, and the
    # timing does not depend on the values
    kwargs = {"n_iter_max": 5} if fac in ("tucker", "cp") else {}
    if case.kind == "conv":
        extra = {"fixed_rank_modes": "spatial"} if fac == "tucker" else {}
        return tltorch.FactorizedConv.from_conv(layer, rank=fraction, factorization=fac, implementation="factorized",
                                                decompose_weights=decompose, decomposition_kwargs=kwargs, **extra)
    if decompose:
        return tltorch.FactorizedLinear.from_linear(layer, rank=fraction, factorization=fac,
                                                    implementation="factorized")
    from tltorch.utils import get_tensorized_shape

    shape_in, shape_out = get_tensorized_shape(layer.in_features, layer.out_features, order=3, min_dim=2, verbose=False)
    module = tltorch.FactorizedLinear(shape_in, shape_out, bias=True, factorization=fac, rank=fraction,
                                      implementation="factorized")
    module.reset_parameters()
    return module


def _peer_fraction(case: Case, layer: nn.Module, matched: dict | None, ratio: float) -> float:
    """tltorch's float rank is a fraction of the weight's size: match our variant's weight count."""
    if matched is None or "params" not in matched:
        return 1 / ratio
    bias = layer.bias.numel() if layer.bias is not None else 0
    return (matched["params"] - bias) / layer.weight.numel()


def build_variants(case: Case, layer, x, dense, opts) -> list[dict]:
    rows = []
    for method in opts["methods"]:
        if decomposer_for(method, layer) is None:
            rows.append({"key": method, "family": "edgecompress", "method": method, "target": None, "notes": [],
                         "skip": f"{method!r} does not apply to {type(layer).__name__}"})
            continue
        for ratio in opts["ratios"]:
            rows.append(build_ours(method, ratio, layer, x, dense))
            _say(rows[-1], case)
    _drop_duplicates(rows)
    if not opts["peers"]:
        return rows
    for fac, ours in PEERS[case.kind].items():
        for ratio in opts["ratios"]:
            matched = next((r for r in rows if r["method"] == ours and r["target"] == ratio and "skip" not in r), None)
            fraction = _peer_fraction(case, layer, matched, ratio)
            rows.append(build_peer(case, fac, fraction, ratio, layer, x, dense, opts["peer_decompose"]))
            _say(rows[-1], case)
    return rows


def _drop_duplicates(rows: list[dict]) -> None:
    """A method that builds another method's chain (cp or tucker on a Linear is its SVD) is not timed twice."""
    built = {(r["method"], r["target"]) for r in rows if "skip" not in r}
    for r in rows:
        chain = r.get("chain", r["method"])
        if "skip" not in r and chain != r["method"] and (chain, r["target"]) in built:
            r["skip"] = f"builds the same chain as {chain} at this ratio (not timed twice)"
            r.pop("proto")


def _say(row: dict, case: Case) -> None:
    if "skip" in row:
        err.print(f"  [yellow]{case.name} {row['key']}: skipped: {row['skip']}[/]")
    else:
        err.print(f"  {case.name} {row['key']}: ranks {row.get('ranks')}, params /{row['param_ratio']:.2f}, "
                  f"MACs /{row['mac_ratio']:.2f}, decomposed in {row.get('decompose_s', 0):.1f} s", highlight=False)


def bench_case(case: Case, opts: dict) -> dict:
    layer, x = case.build()
    dense = {"key": "dense", "family": "dense", "method": "dense", "target": 1, "notes": []}
    dense.update(params=count_params(layer), macs=count_macs(layer, [x])[0])
    _finish(layer, x, dense["params"], dense["macs"], dense)
    variants = build_variants(case, layer, x, dense, opts)
    timed = [dense, *(v for v in variants if "skip" not in v)]
    protos = {v["key"]: v["proto"] for v in timed}
    feeds = {"input": x.numpy()}
    for threads in opts["threads"]:
        err.print(f"  timing {len(protos)} graphs at {threads} thread(s), budget {opts['budget']:g} s")
        timings = time_interleaved(protos, feeds, threads, opts["budget"], opts["min_rounds"], opts["max_rounds"])
        base = timings["dense"]
        for v in timed:
            t = timings[v["key"]]
            # paired by round: both were timed within the same shuffled round, so drifts in machine load cancel
            speedup = statistics.median(d / s for d, s in zip(base.samples, t.samples))
            v.setdefault("timing", {})[str(threads)] = t.to_dict()
            v.setdefault("speedup", {})[str(threads)] = speedup
            v.setdefault("efficiency", {})[str(threads)] = speedup / v["mac_ratio"]
    profiles = []
    for v in timed:
        if any(fnmatch.fnmatchcase(f"{case.name}:{v['key']}", p) for p in opts["profile"]):
            nodes = profile_nodes(v["proto"], feeds, 1, opts["profile_runs"])
            profiles.append({"key": v["key"], "threads": 1, "nodes": nodes})
    for v in timed:
        v.pop("proto")
    return {"case": case.name, "title": case.title(), "input_shape": list(x.shape), "dense": dense,
            "variants": variants, "profiles": profiles}


def _fmt(value, spec=".2f", default="-") -> str:
    return default if value is None else format(value, spec)


def _row_cells(v: dict, threads: list[int]) -> list[str]:
    sp, ef = v.get("speedup", {}), v.get("efficiency", {})
    return [v["method"], _fmt(v.get("target"), "g"), _fmt(v.get("param_ratio")),
            " ".join(map(str, v.get("ranks", []))) or "-", _fmt(v.get("mac_ratio")),
            *(_fmt(sp.get(str(t))) for t in threads), *(_fmt(ef.get(str(t))) for t in threads)]


HOW = ("How: random weights (timing does not depend on the values; reconstruction errors of random weights say "
       "nothing about trained layers). Each layer is wrapped in a one-layer model, factorized by "
       "`edgecompress.factorize.factorize(FactorizeConfig(method, ratio))` (default rank multiple 8), exported with "
       "torch.onnx (opset 17), simplified with onnxsim and checked against PyTorch; ORT_ENABLE_ALL, batch 1, inputs "
       "bound once (IOBinding), spin-waiting off. Per shape the dense layer and all variants are timed in "
       "interleaved, shuffled rounds (time box {budget:g} s per shape and thread count, {min_rounds}-{max_rounds} "
       "rounds); times are medians. Decomposition time is not timed. `params ↓` = dense / factorized parameters "
       "(weights + bias), `MACs ↓` = dense / factorized multiply-accumulates (torch flop counter), speedup = median "
       "over rounds of (dense time / variant time in the same round), eff = speedup / MACs ↓ (1.0 = the FLOP limit). "
       "Profiles come from onnxruntime's profiler on the graph it runs (its NCHWc rewrite adds ReorderInput/Output); "
       "the profiler adds overhead, so read the shares, not the absolute times.")


def render_markdown(results: dict) -> str:
    m, threads = results["machine"], results["settings"]["threads"]
    lines = ["# Layer benchmark: factorized chains against the dense layer (onnxruntime CPU)", "",
             f"Command: `{results['command']}`", "",
             f"Run {results['date']}, {results['seconds']:.0f} s in all. Machine: {m['cpu']}, {m['cores']} cores; "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}.", "",
             HOW.format(**results["settings"]), "", PEER_NOTES, ""]
    for case in results["cases"]:
        lines += _case_markdown(case, threads)
    return "\n".join(lines)


def _case_markdown(case: dict, threads: list[int]) -> list[str]:
    d = case["dense"]
    head = ["method", "target x", "params ↓", "ranks", "MACs ↓", *(f"speedup {t}t" for t in threads),
            *(f"eff {t}t" for t in threads), "ONNX ops / notes"]
    timing = d.get("timing", {})
    times = ", ".join(f"{timing[str(t)]['median_ms']:.3f} ms @{t}t" for t in threads if str(t) in timing)
    lines = [f"## {case['title']} (input {'x'.join(map(str, case['input_shape']))})", "",
             f"Dense: {d['params']:,} params, {d['macs'] / 1e6:.1f} M MACs, {times}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for v in case["variants"]:
        if "skip" in v:
            skipped.append(f"- {v['key']}: {v['skip']}")
            continue
        ops = ", ".join(f"{k} {n}" for k, n in v["ops"].items())
        lines.append("| " + " | ".join([*_row_cells(v, threads), "; ".join([ops, *v["notes"]])]) + " |")
    lines += ["", *(["Skipped:", *skipped, ""] if skipped else [])]
    for prof in case["profiles"]:
        total = sum(n["mean_us"] for n in prof["nodes"]) or 1.0
        nodes = ", ".join(f"{n['op']} {n['mean_us']:.0f} ({n['mean_us'] / total:.0%})" for n in prof["nodes"])
        lines += [f"Profile of {prof['key']}, 1 thread, µs per node: {nodes}", ""]
    return lines


def print_case(console: Console, case: dict, threads: list[int]) -> None:
    """The concise terminal view: efficiency only at the first thread count."""
    table = Table(title=case["title"], title_justify="left")
    cols = ["method", "x", "params↓", "ranks", "MACs↓", *(f"spd{t}" for t in threads), f"eff{threads[0]}"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("method", "ranks") else "right", no_wrap=True,
                         max_width=12 if col == "ranks" else None)
    for v in [case["dense"], *case["variants"]]:
        if "skip" not in v:
            table.add_row(*_row_cells(v, threads)[: len(cols)])
    console.print(table)


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated numbers", param_hint=option) from None
    if not values or min(values) <= (1 if option == "--ratios" else 0):
        raise click.BadParameter(f"{text!r}: ratios must be above 1, thread counts at least 1", param_hint=option)
    return values


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 0.3 s time box, 3-5 rounds per shape.")
@click.option("--out", type=click.Path(dir_okay=False), default="docs/benchmarks_layers.md", show_default=True,
              help="Markdown results; the JSON goes beside it (same name, .json).")
@click.option("--case", "cases", multiple=True, help=f"Shape(s) to run (default all: {', '.join(CASES)}).")
@click.option("--methods", "method_list", default="", help="Comma-separated methods (default: all registered).")
@click.option("--ratios", default="2,4,8", show_default=True, help="Parameter-reduction targets.")
@click.option("--threads", default="1,2", show_default=True)
@click.option("--budget", type=float, default=None,
              help="Seconds of timing per shape and thread count [20; quick 0.3].")
@click.option("--no-peers", is_flag=True, help="Leave out the tensorly-torch peers.")
@click.option("--peer-decompose", is_flag=True,
              help="Initialise peers by tltorch's decomposition (slow) instead of random factors.")
@click.option("--profile", "profile", multiple=True,
              help="case:variant patterns to profile per node [conv*:tucker@4x, conv*:dense].")
def main(quick, out, cases, method_list, ratios, threads, budget, no_peers, peer_decompose, profile):
    """Benchmark every factorization method on single layers against the dense layer (onnxruntime CPU)."""
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    registered = methods()
    chosen = [m.strip() for m in method_list.split(",") if m.strip()] or registered
    unknown = sorted(set(chosen) - set(registered))
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}; registered: {registered}", param_hint="--methods")
    case_list = [Case.parse(spec) for spec in cases or CASES]
    opts = {"methods": chosen, "ratios": _numbers(ratios, float, "--ratios"),
            "threads": _numbers(threads, int, "--threads"), "peers": not no_peers, "peer_decompose": peer_decompose,
            "budget": budget if budget is not None else (0.3 if quick else 20.0),
            "min_rounds": 3, "max_rounds": 5 if quick else 200, "profile_runs": 10 if quick else 100,
            "profile": list(profile) or ["conv*:tucker@4x", "conv*:dense"]}
    settings = {k: v for k, v in opts.items() if k not in ("profile_runs",)}
    out_md, out_json = Path(out), Path(out).with_suffix(".json")
    io.ensure_writable(out_md)
    console, start = Console(), time.perf_counter()
    results = {"command": command_line(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine_info(), "settings": settings, "registered_methods": registered, "cases": []}
    for case in case_list:
        err.print(f"[bold]{case.name}[/]: {case.title()}")
        results["cases"].append(bench_case(case, opts))
        print_case(console, results["cases"][-1], opts["threads"])
        results["seconds"] = time.perf_counter() - start
        io.write_json(out_json, results)  # after every shape: a long run that dies keeps what it measured
        io.write_text(out_md, render_markdown(results) + "\n")
    err.print(f"wrote {out_md} and {out_json} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
