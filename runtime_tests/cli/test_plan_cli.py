"""``edgecompress plan`` (table and JSON) and the factorization usage errors of plan and export."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgecompress.cli import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_plan_prints_the_per_layer_table(runner):
    result = runner.invoke(main, ["plan", "cifar_conv", "--method", "tucker", "--ratio", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    for header in ("layer", "type", "method", "ranks", "params", "MACs", "error", "reason / notes"):
        assert header in out
    assert "features.4" in out and "tucker" in out
    assert "factorized" in out and "left dense" in out


def test_plan_json_has_one_record_per_candidate_layer(runner):
    result = runner.invoke(main, ["plan", "resnet18_cifar", "--method", "cp", "--ratio", "4", "--include", "layer1.*",
                                  "--include", "layer2.0.*", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18_cifar" and data["config"]["method"] == "cp"
    names = [r["name"] for r in data["layers"]]
    assert names == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                     "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    by_name = {r["name"]: r for r in data["layers"]}
    conv = by_name["layer1.0.conv1"]
    assert conv["method"] == "cp" and conv["ranks"] == [64]
    assert conv["params_before"] / conv["params_after"] >= 4
    assert conv["macs_after"] < conv["macs_before"] and 0 < conv["rel_error"] < 1
    pointwise = by_name["layer2.0.downsample.0"]
    assert pointwise["method"] == "svd" and "1x1 conv is a Linear over channels" in pointwise["notes"][0]
    totals = data["totals"]
    assert totals["factorized_layers"] == 7 and totals["params_before_factorized"] / totals["params_after_factorized"] >= 4


def test_plan_reports_dense_layers_with_the_reason(runner):
    result = runner.invoke(main, ["plan", "lenet5", "--method", "svd", "--rank", "500", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    dense = [r for r in data["layers"] if r["method"] == "dense"]
    assert dense and all(r["reason"] for r in dense)


def test_plan_keeps_layers_below_min_params_dense_and_lists_them(runner):
    # cifar_conv: the 3-channel stem features.0 (1.8k parameters) is below the floor, features.4 (74k) above it
    result = runner.invoke(main, ["plan", "cifar_conv", "--method", "tucker", "--ratio", "4", "--min-params", "4096",
                                  "--json"])
    assert result.exit_code == 0, result.output
    by_name = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    first = by_name["features.0"]
    assert first["params_before"] < 4096 and first["method"] == "dense" and "floor of 4096" in first["reason"]
    assert by_name["features.4"]["method"] == "tucker"


def test_plan_needs_a_method(runner):
    result = runner.invoke(main, ["plan", "cifar_conv"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: plan needs --method (svd, svd-spatial, tucker, cp, tt, ...) or --target KIND=VALUE"]


BAD = {
    "unknown method": (["--method", "tuker"], "unknown method 'tuker'"),
    "rank 0": (["--method", "svd", "--rank", "0"], "rank must be an integer of at least 1, got 0"),
    "ratio 0.5": (["--method", "tucker", "--ratio", "0.5"], "ratio must be above 1"),
    "ratio 1": (["--method", "cp", "--ratio", "1"], "ratio must be above 1"),
    "energy 1.5": (["--method", "svd", "--energy", "1.5"], "energy must be in (0, 1]"),
    "energy 0": (["--method", "svd", "--energy", "0"], "energy must be in (0, 1]"),
    "min params -1": (["--method", "svd", "--min-params", "-1"], "min params must be a whole number >= 0"),
}


@pytest.mark.parametrize("command", ["export", "plan"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_factorization_options_are_one_line_errors_and_write_nothing(runner, tmp_path, command, case):
    options, message = BAD[case]
    out = tmp_path / "out.onnx"
    args = [command, "cifar_conv", *options] + (["-o", str(out), "--report", str(tmp_path / "r.json")] if command == "export" else [])
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_export_with_tucker_writes_the_model_and_the_report(runner, tmp_path):
    out, report_path = tmp_path / "m.onnx", tmp_path / "m.json"
    result = runner.invoke(main, ["export", "cifar_conv", "--method", "tucker", "--ratio", "4", "-o", str(out),
                                  "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert out.is_file() and report["method"] == "tucker" and report["parity"]["max_abs_diff"] <= 1e-4
    for layer in report["layers"]:
        assert set(layer) >= {"name", "type", "method", "ranks", "params_before", "params_after", "macs_before",
                              "macs_after", "rel_error"}
        assert layer["method"] != "dense" or layer["reason"]
