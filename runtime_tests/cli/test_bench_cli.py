"""``edgecompress bench`` and ``edgecompress mobile`` through the real CLI: outputs, exit codes, messages."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgecompress.cli import main
from edgecompress.export import export
from edgecompress.factorize import FactorizeConfig
from edgecompress.runtime import available_providers


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_cli")
    dense, svd = root / "dense.onnx", root / "svd.onnx"
    export("lenet5", dense)
    export("lenet5", svd, factorize_config=FactorizeConfig(method="svd", ratio=2))
    return str(dense), str(svd)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_bench_json_and_markdown(pair, tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    result = invoke("bench", *pair, "--threads", "1", "--runs", "5", "--warmup", "1", "--json", out, "--markdown", md)
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "speedup" in result.output
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [r["model"] for r in rows] == list(pair)
    for r in rows:
        assert {"model", "provider", "threads", "batch", "latency_ms", "size_bytes", "ratio"} <= set(r)
        assert {"p50", "p90", "p99", "mean", "min"} <= set(r["latency_ms"])
    assert rows[0]["ratio"]["speedup"] == 1.0 and rows[1]["ratio"]["size"] > 1.5
    assert md.read_text().count("| svd |") == 1


def test_mobile_target_profile_and_baseline(pair):
    result = invoke("bench", *pair, "--target", "mobile", "--runs", "2", "--warmup", "0", "--no-memory",
                    "--profile", "--baseline", "1")
    assert result.exit_code == 0, result.output
    assert "ratios vs svd.onnx" in result.output
    # two models profiled: one side-by-side table per thread count, layer by layer
    assert result.output.count("per layer, ms (threads") == 3 and "speedup vs svd" in result.output


def test_cuda_unavailable_exits_2_naming_providers(pair):
    if "cuda" in available_providers():
        pytest.skip("this machine has CUDA")
    result = invoke("bench", pair[0], "--provider", "cuda", "--runs", "1")
    assert result.exit_code == 2
    assert "available: cpu" in result.output and "edgecompress[gpu]" in result.output


@pytest.mark.cuda
def test_cuda_bench_reports_placement(pair, tmp_path):
    out = tmp_path / "cuda.json"
    result = invoke("bench", *pair, "--provider", "cuda", "--runs", "5", "--warmup", "1", "--json", out)
    assert result.exit_code == 0, result.output
    for r in json.loads(out.read_text())["results"]:
        assert r["provider"] == "cuda" and 0 < r["placement"]["placement_fraction"] <= 1.0
        assert r["placement"]["nodes_total"] >= r["placement"]["nodes_on_provider"] > 0


@pytest.mark.parametrize("args, code, message", [
    (["missing.onnx"], 1, "does not exist"),
    (["{bad}"], 1, "is not a valid ONNX file"),
    (["{dense}", "--batch", "4"], 2, "fixed batch of 1"),
    (["{dense}", "--runs", "3", "--seconds", "1"], 2, "not both"),
    (["{dense}", "--threads", "one"], 2, "bad --threads"),
    (["{dense}", "--provider", "tpu"], 2, "unknown provider"),
])
def test_bench_bad_input_one_line(pair, tmp_path, args, code, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"corrupt")
    args = [a.format(bad=bad, dense=pair[0]) for a in args]
    result = invoke("bench", *args)
    assert result.exit_code == code
    assert message in result.output
    assert result.output.strip().count("\n") == 0 and result.output.startswith("Error:")


def test_mobile_command(pair, tmp_path):
    result = invoke("mobile", pair[1], "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "svd.ort").is_file() and (tmp_path / "m" / "svd.mobile.json").is_file()
    assert "onnxruntime_perf_test" in result.output and "nnapi" in result.output
    bad = invoke("mobile", tmp_path / "nope.onnx", "-o", tmp_path / "m2")
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and "does not exist" in bad.output
