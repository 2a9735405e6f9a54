"""``run`` on the bundled digits model: the report files, their schema, dense accuracy, a failed variant."""

import json
import re

import pytest

from edgecompress.pipeline import RunConfig, run
from edgecompress.report import ROW_KEYS

# 'bogus' is not a method: it must fail with its reason while tucker and every int8 variant complete.
CONFIG = RunConfig(methods=("tucker", "bogus"), ratios=(2.0,), threads=(1,), bench_runs=5, bench_warmup=1)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = run(None, out, CONFIG)
    return out, report, json.loads((out / "report.json").read_text())


def test_writes_three_report_files_and_onnx_files(result):
    out, report, _ = result
    for name in ("report.json", "report.md", "report.html", "dense.onnx", "dense-int8.onnx", "tucker-x2.onnx",
                 "tucker-x2-int8.onnx"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("bogus-*.onnx"))


def test_report_json_has_one_row_per_variant_with_the_schema(result):
    _, _, data = result
    names = [v["name"] for v in data["variants"]]
    assert names == ["dense", "dense-int8", "tucker-x2", "tucker-x2-int8", "bogus-x2", "bogus-x2-int8"]
    for row in data["variants"]:
        assert set(ROW_KEYS) <= set(row), row["name"]
    dense = data["variants"][0]
    assert dense["method"] == "dense" and dense["compression"] == 1.0 and dense["ratio"] is None


def test_dense_accuracy_on_the_held_out_set(result):
    _, report, _ = result
    dense = report.variant("dense")
    assert dense.accuracy >= 0.95 and dense.agreement == 1.0
    assert report.data["samples"] == 360 and report.data["labels"]


def test_completed_variants_have_every_field_filled(result):
    _, report, _ = result
    for name in ("dense", "dense-int8", "tucker-x2", "tucker-x2-int8"):
        v = report.variant(name)
        assert v.status == "ok" and v.error is None, name
        assert v.params > 0 and v.size_bytes > 0 and v.macs > 0 and v.compression >= 1.0
        assert set(v.latency_ms) == {"1"} and 0 < v.latency_ms["1"]["p50"] <= v.latency_ms["1"]["p90"]
        assert v.speedup > 0 and 0 <= v.accuracy <= 1 and 0 <= v.agreement <= 1
        assert (v.sqnr_db is None) == (name == "dense")


def test_factorized_variant_is_smaller_and_reports_its_layers(result):
    _, report, _ = result
    dense, tucker, int8 = report.variant("dense"), report.variant("tucker-x2"), report.variant("tucker-x2-int8")
    assert tucker.compression >= 2.0 and tucker.params < dense.params and tucker.macs < dense.macs
    assert int8.size_bytes < tucker.size_bytes / 3  # int8 weights
    factorized = [layer for layer in tucker.layers if layer["method"] == "tucker"]
    assert {layer["name"] for layer in factorized} == {"features.4", "features.8"}
    assert all(layer["ranks"] and layer["rel_error"] < 1 for layer in factorized)


def test_unknown_method_fails_alone_with_its_reason(result):
    _, report, data = result
    bogus = report.variant("bogus-x2")
    assert bogus.status == "failed" and bogus.failed_at == "factorize"
    assert "unknown method 'bogus'" in bogus.error
    assert report.variant("bogus-x2-int8").error == "its fp32 variant 'bogus-x2' failed"
    assert sum(v["status"] == "ok" for v in data["variants"]) == 4


def test_html_is_self_contained_with_both_plots(result):
    out, _, _ = result
    text = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 2
    assert "tucker-x2-int8" in text and "Layers of tucker-x2" in text


def test_markdown_has_table_and_pareto_front(result):
    out, report, data = result
    text = (out / "report.md").read_text()
    assert "| dense | dense |" in text and "Pareto front" in text
    assert data["pareto"] and set(data["pareto"]) <= {"dense", "dense-int8", "tucker-x2", "tucker-x2-int8"}


def test_method_that_factorizes_no_layer_fails_with_the_reason(tmp_path):
    # every layer of the digits CNN is below this size floor, so svd has nothing to factorize
    config = RunConfig(methods=("svd",), ratios=(4.0,), int8=False, threads=(1,), bench_runs=2, bench_warmup=0,
                       min_params=10**9)
    report = run(None, tmp_path, config)
    svd = report.variant("svd-x4")
    assert svd.status == "failed" and "factorized no layer" in svd.error and "floor of 1000000000" in svd.error
    assert svd.layers and all(layer["method"] == "dense" and "floor" in layer["reason"] for layer in svd.layers)
    assert report.variant("dense").status == "ok" and (tmp_path / "report.html").is_file()


def test_python_api_takes_an_nn_module_and_leaves_it_untouched(tmp_path):
    import torch

    from edgecompress.errors import ConfigError
    from edgecompress.models import create_model

    model = create_model("digits_cnn")
    bn_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    config = RunConfig(methods=("tucker",), ratios=(4.0,), int8=False, bench_runs=2, bench_warmup=0, threads=(1,))
    with pytest.raises(ConfigError, match="needs input_shape"):
        run(model, tmp_path, config)
    report = run(model, tmp_path, config, input_shape=(1, 1, 32, 32))
    assert report.model == "DigitsCNN" and report.variant("tucker-x4").status == "ok"
    assert report.data["source"] == "random samples" and report.variant("tucker-x4").agreement is not None
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == bn_before == 3
