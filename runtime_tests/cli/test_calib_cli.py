"""``--calib`` on export and plan, for PyTorch and ONNX input: data-aware factors, errors on held-out
samples, and one-line errors (exit 2, nothing written) for data that does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecompress.data import run_onnx
from edgecompress.models import digits


@pytest.fixture(scope="module")
def digits_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "digits.npz"
    x, _ = digits.load_digits("train")
    np.savez(path, images=x[:72].numpy())  # any key: a one-input model takes the single array
    return path


def _accuracy(path) -> float:
    x, y = digits.load_digits("test")
    return float((run_onnx(path, x.numpy()).argmax(1) == y.numpy()).mean())


def test_export_digits_tucker_2x_with_the_defaults_keeps_the_model(cli, tmp_path):
    """The default floors keep the 1->64 stem and the 10-class head dense, and the zoo model's own training
    digits fit the factors: today's 10.3% becomes >= 98.5%."""
    out, report_path = tmp_path / "t.onnx", tmp_path / "t.json"
    result = cli("export", "digits_cnn", "--method", "tucker", "--ratio", "2", "-o", out, "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "no calibration data" not in result.output
    report = json.loads(report_path.read_text())
    assert "training data" in report["calibration"]["source"] and report["calibration"]["fit_samples"] == 64
    dense = {r["name"]: r["reason"] for r in report["layers"] if r["method"] == "dense"}
    assert "size floor" in dense["features.0"] and "size floor" in dense["classifier"]
    assert report["error_vs_dense"]["top1_agreement"] >= 0.95
    assert _accuracy(out) >= 0.985


def test_export_warns_where_the_model_lost_its_outputs_on_the_data(cli, tmp_path, digits_calib):
    """Weight-only TT at 4x keeps 16% of digits (dense 99.4%): measured on the held-out calibration samples,
    export says so in one line and in the report; a data-aware svd 2x that keeps the task says nothing."""
    lost, kept = tmp_path / "lost.onnx", tmp_path / "kept.onnx"
    result = cli("export", "digits_cnn", "--method", "tt", "--ratio", "4", "--data-free", "--calib", digits_calib,
                 "-o", lost, "--report", tmp_path / "lost.json")
    assert result.exit_code == 0, result.output
    assert "warning: the factorized model's outputs are" in " ".join(result.output.split())
    (warning,) = json.loads((tmp_path / "lost.json").read_text())["warnings"]
    assert "expect an accuracy loss" in warning and "held-out calibration samples" in warning
    result = cli("export", "digits_cnn", "--method", "svd", "--ratio", "2", "--calib", digits_calib, "-o", kept,
                 "--report", tmp_path / "kept.json")
    assert result.exit_code == 0 and "warning" not in result.output
    assert json.loads((tmp_path / "kept.json").read_text())["warnings"] == []


@pytest.mark.parametrize("error, warned", [
    ({"rel_error": 0.51, "top1_agreement": 0.778}, True),  # ocr_cls at params=2x: 66% agreement on 300 lines
    ({"rel_error": 0.195, "top1_agreement": 0.889}, True),  # ocr_cls svd 1.5x: 95% on 300 lines
    ({"rel_error": 0.08, "top1_agreement": 0.889}, False),  # CREPE full macs=4x: one neighbouring bin, RPA 100%
    ({"rel_error": 0.76}, True),  # CREPE tiny tucker 2x, sigmoid bins: RPA 99.5% -> 85.5%
    ({"rel_error": 0.17, "top1_agreement": 1.0}, False),
])
def test_the_loss_warning_reads_error_and_agreement_on_data(error, warned):
    from edgecompress.export import loss_warning

    on_data = {**error, "samples": 9, "inputs": "held-out calibration samples"}
    assert (loss_warning(on_data) is not None) == warned
    assert loss_warning({**on_data, "inputs": "random inputs"}) is None


def test_plan_with_calib_shows_the_output_errors(cli, digits_calib):
    result = cli("plan", "digits_cnn", "--method", "svd", "--ratio", "4", "--calib", digits_calib)
    assert result.exit_code == 0, result.output
    assert "output error" in result.stdout and "in model" in result.stdout
    data = json.loads(cli("plan", "digits_cnn", "--method", "svd", "--ratio", "4", "--calib", digits_calib,
                          "--json").stdout)
    assert data["calibration"]["fit_samples"] == 63 and data["calibration"]["held_out_samples"] == 9
    assert all(r["output_error"] is not None for r in data["layers"] if r["method"] != "dense")


def test_no_data_says_what_it_costs_unless_data_free_is_asked(cli, tmp_path):
    noted = cli("plan", "cifar_conv", "--method", "svd", "--ratio", "2")
    assert noted.exit_code == 0 and "no calibration data" in noted.output
    quiet = cli("plan", "cifar_conv", "--method", "svd", "--ratio", "2", "--data-free")
    assert quiet.exit_code == 0 and "no calibration data" not in quiet.output


def test_onnx_input_is_fitted_to_data_through_onnxruntime(cli, tmp_path, digits_calib):
    """The same flow for a file: layer inputs captured with onnxruntime, no PyTorch model of the network."""
    dense = tmp_path / "d.onnx"
    assert cli("export", "digits_cnn", "-o", dense).exit_code == 0
    out, report_path = tmp_path / "f.onnx", tmp_path / "f.json"
    result = cli("export", dense, "--method", "svd", "--ratio", "4", "--calib", digits_calib, "-o", out,
                 "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    fitted = [r for r in report["layers"] if r["method"] != "dense"]
    assert fitted and all(r["fit"].startswith("data") and r["output_error"] < 0.5 for r in fitted)
    assert report["error_vs_dense"]["inputs"] == "held-out calibration samples"
    assert _accuracy(out) >= 0.985


def _one_line_error(result, out, text):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("arrays, text", [
    ({"input": np.full((16, 1, 32, 32), np.nan, np.float32)}, "NaN or Inf"),
    ({"input": np.zeros((16, 1, 28, 28), np.float32)}, "expected N samples of ?x1x32x32"),
    ({"input": np.zeros((16, 1, 32, 32), np.int64)}, "holds int64"),
    ({"input": np.zeros((0, 1, 32, 32), np.float32)}, "is empty"),
    ({"a": np.zeros((4, 1, 32, 32), np.float32), "b": np.zeros((4, 1, 32, 32), np.float32)}, "names do not match"),
])
@pytest.mark.parametrize("model", ["digits_cnn", "onnx"])
def test_bad_calibration_data_is_one_line_and_writes_nothing(cli, tmp_path, arrays, text, model):
    calib, out = tmp_path / "c.npz", tmp_path / "o.onnx"
    np.savez(calib, **arrays)
    if model == "onnx":
        model = tmp_path / "d.onnx"
        assert cli("export", "digits_cnn", "-o", model).exit_code == 0
        text = text.replace("?x1x32x32", "1x1x32x32")
    _one_line_error(cli("export", model, "--method", "svd", "--calib", calib, "-o", out), out, text)
