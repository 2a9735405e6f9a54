"""keep_faster_: each chain profiled against its dense layer on the provider, slower chains put back.

Which layers are faster is a measurement (docs/bench.md), so the tests pin the decision with extreme
thresholds: min_speedup 1e9 (no chain can pass) and 1e-9 (every chain passes), and check the mechanics:
records, the module, the numbers it computes, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edgecompress import exporters
from edgecompress.cli import main
from edgecompress.errors import ConfigError
from edgecompress.factorize import FactorizeConfig, factorize
from edgecompress.latency import LatencyConfig, keep_faster_
from edgecompress.loading import load_model, sample_inputs


@pytest.fixture()
def cifar_tucker():
    loaded = load_model("cifar_conv")
    dense = loaded.module.eval()
    exporters.fold_batchnorm_(dense)
    inputs = sample_inputs(dense, loaded.input_spec)
    factorized, report = factorize(dense, FactorizeConfig(method="tucker", ratio=4), inputs)
    return dense, factorized, report, inputs


def test_every_chain_slower_than_required_goes_back_to_the_dense_layer(cifar_tucker):
    dense, factorized, report, inputs = cifar_tucker
    chains = [r.name for r in report.factorized]
    summary = keep_faster_(factorized, dense, report, inputs, LatencyConfig(runs=3, min_speedup=1e9))
    assert summary["reverted"] == chains and summary["kept"] == []
    for record in report.layers:
        assert record.method == "dense" and record.params_after == record.params_before
    for name in chains:
        record = next(r for r in report.layers if r.name == name)
        latency = record.details["latency"]
        assert latency["dense_ms"] > 0 and latency["chain_ms"] > 0 and latency["provider"] == "cpu"
        assert latency["speedup"] == pytest.approx(latency["dense_ms"] / latency["chain_ms"], rel=1e-3)
        assert "kept dense" in record.reason and f"{latency['speedup']:.2f}x" in record.reason
        assert type(factorized.get_submodule(name)) is type(dense.get_submodule(name))
    with torch.no_grad():
        assert torch.equal(factorized(inputs[0]), dense(inputs[0]))
    assert report.totals()["factorized_layers"] == 0


def test_chains_that_pass_the_threshold_stay(cifar_tucker):
    dense, factorized, report, inputs = cifar_tucker
    before = [(r.name, r.method, r.ranks) for r in report.layers]
    summary = keep_faster_(factorized, dense, report, inputs, LatencyConfig(runs=3, min_speedup=1e-9))
    assert summary["reverted"] == [] and summary["kept"] == [r.name for r in report.factorized]
    assert [(r.name, r.method, r.ranks) for r in report.layers] == before
    assert all("latency" in r.details for r in report.factorized)


def test_int8_precision_times_the_quantized_models(cifar_tucker):
    dense, factorized, report, inputs = cifar_tucker
    summary = keep_faster_(factorized, dense, report, inputs, LatencyConfig(runs=3, min_speedup=1e9, precision="int8"))
    assert summary["reverted"] and summary["config"]["precision"] == "int8"
    for record in report.layers:
        if "latency" in record.details:
            assert record.details["latency"]["precision"] == "int8" and "int8: kept dense" in record.reason


@pytest.mark.parametrize("fields, message", [({"threads": 0}, "threads"), ({"runs": 0}, "runs"),
                                             ({"min_speedup": 0}, "min speedup"), ({"precision": "fp16"}, "precision")])
def test_config_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        LatencyConfig(**fields)


def test_export_and_plan_keep_faster_through_the_cli(tmp_path):
    runner = CliRunner()
    out, report_path = tmp_path / "m.onnx", tmp_path / "m.json"
    result = runner.invoke(main, ["export", "cifar_conv", "--method", "svd", "--ratio", "4", "--min-speedup", "1e9",
                                  "-o", str(out), "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["latency"]["reverted"] and report["totals"]["factorized_layers"] == 0
    assert "kept dense, chain slower on cpu" in result.output
    result = runner.invoke(main, ["plan", "cifar_conv", "--method", "svd", "--ratio", "4", "--keep-faster", "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert all("latency" in r["details"] for r in layers if r["method"] != "dense")


@pytest.mark.parametrize("args, message", [
    (["export", "cifar_conv", "--keep-faster", "-o", "{out}"], "needs a factorization method (--method)"),
    (["export", "cifar_conv", "--method", "svd", "--precision", "int8", "-o", "{out}"], "only used by --keep-faster or --target latency"),
    (["export", "cifar_conv", "--method", "svd", "--keep-faster", "--provider", "cuda", "-o", "{out}"],
     "provider 'cuda' is not available"),
])
def test_keep_faster_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    from edgecompress.runtime import available_providers

    if "cuda" in args and "cuda" in available_providers():
        pytest.skip("CUDA is available here")
    result = CliRunner().invoke(main, [a.format(out=tmp_path / "m.onnx") for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_run_times_as_int8_when_it_makes_int8_variants():
    from edgecompress.pipeline import RunConfig

    assert RunConfig(keep_faster=True).latency_config().precision == "int8"
    assert RunConfig(keep_faster=True, int8=False).latency_config().precision == "fp32"
    assert RunConfig(keep_faster=True, keep_faster_precision="fp32").latency_config().precision == "fp32"


def test_run_keep_faster_records_the_measured_speedup_of_every_chain(tmp_path):
    from edgecompress.pipeline import RunConfig, run

    config = RunConfig(methods=("tucker",), ratios=(4.0,), int8=False, threads=(1,), bench_runs=2, bench_warmup=0,
                       keep_faster=True)
    report = run(None, tmp_path, config)
    variant = report.variant("tucker-x4")
    assert variant.status == "ok"
    timed = [layer for layer in variant.layers if "latency" in layer["details"]]
    assert timed and all(layer["details"]["latency"]["threads"] == 1 for layer in timed)
    assert all(layer["details"]["latency"]["precision"] == "fp32" for layer in timed)  # no int8 variants here
    assert all(layer["method"] != "dense" or "kept dense" in layer["reason"] for layer in timed)


def test_embeddings_stay_factorized_for_size_with_the_timing_noted():
    loaded = load_model("text_classifier")
    dense = loaded.module.eval()
    inputs = sample_inputs(dense, loaded.input_spec)
    factorized, report = factorize(dense, FactorizeConfig(method="svd", ratio=4), inputs)
    keep_faster_(factorized, dense, report, inputs, LatencyConfig(runs=3, min_speedup=1e9))
    by_name = {r.name: r for r in report.layers}
    token = by_name["token_embedding"]
    assert token.method == "svd" and any("factorized for size" in n for n in token.notes)
    assert all(r.method == "dense" for r in report.layers if r.type == "Linear")


def test_a_planned_latency_variant_of_run_is_timed_where_keep_faster_times():
    """``run --target latency=2x``: on the run's provider at its first thread count, as int8 when the run makes
    int8 variants (the kernels that ship), as --keep-faster does."""
    from edgecompress.pipeline import RunConfig, _fconfig

    planned = _fconfig(RunConfig(targets=(("latency", 2.0),), threads=(2, 4)), "auto", None, (("latency", 2.0),))
    assert (planned.provider, planned.threads, planned.precision) == ("cpu", 2, "int8")
    fp32 = _fconfig(RunConfig(targets=(("latency", 2.0),), int8=False), "auto", None, (("latency", 2.0),))
    assert (fp32.threads, fp32.precision) == (1, "fp32")
