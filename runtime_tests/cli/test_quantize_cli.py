"""``edgecompress quantize`` end to end, and every bad input: one-line error, non-zero exit, no output file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgecompress.cli import main
from edgecompress.export import export


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qcli")
    export("cifar_conv", tmp / "fp32.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp / "calib.npz", input=rng.standard_normal((8, 1, 3, 32, 32)).astype(np.float32))
    return tmp


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_quantize_static_with_report(model, tmp_path):
    out, report = tmp_path / "int8.onnx", tmp_path / "q.json"
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", model / "calib.npz",
                  "--calib-samples", 4, "--eval-samples", 4, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    for key in ("sqnr_db", "max_abs_diff", "top1_agreement", "bytes_before", "bytes_after", "layers", "mode", "format", "target", "calibration"):
        assert key in data
    assert data["mode"] == "static" and data["bytes_after"] == out.stat().st_size
    assert "SQNR" in result.output and "worst layers" in result.output


def test_quantize_mobile_uses_uint8_activations(model, tmp_path):
    out = tmp_path / "int8.onnx"
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--target", "mobile",
                  "--calib", model / "calib.npz", "--calib-samples", 4, "--eval-samples", 2, "--exclude", "features.0/*")
    assert result.exit_code == 0, result.output
    q = onnx.load(str(out))
    inits = {i.name: i for i in q.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)
    conv0 = next(n for n in q.graph.node if n.name == "features.0/Conv")
    assert conv0.input[1] in inits and inits[conv0.input[1]].data_type == onnx.TensorProto.FLOAT  # excluded


def test_signed_int8_activations_on_request_run_as_integer_kernels(model, tmp_path):
    out, report = tmp_path / "int8.onnx", tmp_path / "q.json"
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", model / "calib.npz",
                  "--calib-samples", 4, "--eval-samples", 2, "--activations", "int8", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["activation_type"] == "int8" and "S8S8" in data["reason"]
    assert data["cpu_kernels"]["float_weight_ops"] == [] and data["cpu_kernels"]["integer"]["QLinearConv"] == 4
    q = onnx.load(str(out))
    inits = {i.name: i for i in q.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points)


@pytest.mark.parametrize("args, message", [
    (["--target", "cuda", "--activations", "uint8"], "symmetric int8 activations"),
    (["--mode", "dynamic", "--activations", "int8"], "applies to static quantization"),
])
def test_activation_type_combinations_that_cannot_work_are_refused(model, tmp_path, args, message):
    out = tmp_path / "o.onnx"
    _fails(_run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", model / "calib.npz", *args),
           2, message, out)


def test_fp32_threshold_leaves_worst_layers_in_fp32(model, tmp_path):
    from edgecompress.quantize import QuantizeConfig, quantize

    config = QuantizeConfig(calib=str(model / "calib.npz"), calib_samples=4, eval_samples=4, fp32_threshold=1e-9)
    report = quantize(model / "fp32.onnx", tmp_path / "int8.onnx", config)
    assert report["fp32_layers"] and set(report["fp32_layers"]) <= set(report["coverage"]["left_float"])


def _fails(result, code, text, out):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_int8_flag_is_required(model, tmp_path):
    out = tmp_path / "o.onnx"
    _fails(_run("quantize", model / "fp32.onnx", "-o", out), 2, "quantize needs --int8 (the only precision supported)", out)


def test_not_an_onnx_file(tmp_path):
    bad, out = tmp_path / "bad.onnx", tmp_path / "o.onnx"
    bad.write_text("this is not a model\n" * 10)
    _fails(_run("quantize", bad, "--int8", "-o", out), 1, "not a valid ONNX", out)


def test_already_quantized(model, tmp_path):
    first = tmp_path / "int8.onnx"
    assert _run("quantize", model / "fp32.onnx", "--int8", "-o", first, "--calib", model / "calib.npz",
                "--calib-samples", 2, "--eval-samples", 2).exit_code == 0
    out = tmp_path / "again.onnx"
    _fails(_run("quantize", first, "--int8", "-o", out), 2, "already quantized", out)


@pytest.mark.parametrize("arrays, text", [
    ({"pixels": np.zeros((4, 1, 3, 32, 32), np.float32), "extra": np.zeros((4, 1, 3, 32, 32), np.float32)},
     "input names do not match"),
    ({"input": np.full((4, 1, 3, 32, 32), np.nan, np.float32)}, "NaN or Inf"),
    ({"input": np.zeros((4, 1, 3, 16, 16), np.float32)}, "has shape (4, 1, 3, 16, 16)"),
    ({"input": np.zeros((0, 1, 3, 32, 32), np.float32)}, "is empty"),
    ({}, "is empty"),
    ({"input": np.zeros((4, 1, 3, 32, 32), np.int64)}, "holds int64"),
])
def test_bad_calibration_data(model, tmp_path, arrays, text):
    calib, out = tmp_path / "calib.npz", tmp_path / "o.onnx"
    np.savez(calib, **arrays)
    _fails(_run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", calib), 2, text, out)


def test_a_one_input_model_takes_the_single_array_whatever_its_key(model, tmp_path):
    calib, out = tmp_path / "calib.npz", tmp_path / "o.onnx"
    np.savez(calib, pixels=np.random.default_rng(0).standard_normal((6, 1, 3, 32, 32)).astype(np.float32))
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", calib, "--calib-samples", 4,
                  "--eval-samples", 2)
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_empty_calibration_folder(model, tmp_path):
    folder, out = tmp_path / "calib", tmp_path / "o.onnx"
    folder.mkdir()
    _fails(_run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", folder), 2, "is empty", out)


def test_calibration_folder_one_file_per_sample(model, tmp_path):
    folder, out = tmp_path / "calib", tmp_path / "o.onnx"
    folder.mkdir()
    for k in range(4):
        np.save(folder / f"{k:03d}.npy", np.random.default_rng(k).standard_normal((3, 32, 32)).astype(np.float32))
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--calib", folder, "--eval-samples", 1)
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_cuda_dynamic_is_refused_with_the_reason(model, tmp_path):
    out = tmp_path / "o.onnx"
    _fails(_run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--target", "cuda", "--mode", "dynamic"),
           2, "no CUDA kernels", out)


def test_mobile_dynamic_is_refused(model, tmp_path):
    out = tmp_path / "o.onnx"
    _fails(_run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--target", "mobile", "--mode", "dynamic"),
           2, "constant scales", out)


def test_static_without_data_says_how_to_get_some(model, tmp_path):
    proto = onnx.load(str(model / "fp32.onnx"))
    del proto.metadata_props[:]  # not recognisable as a zoo export
    onnx.save(proto, str(tmp_path / "anon.onnx"))
    out = tmp_path / "o.onnx"
    _fails(_run("quantize", tmp_path / "anon.onnx", "--int8", "-o", out, "--mode", "static"), 2, "--random-calib", out)


def test_zoo_export_calibrates_on_its_own_samples(model, tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "q.json"
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--mode", "static",
                  "--calib-samples", 2, "--eval-samples", 2, "--report", report)
    assert result.exit_code == 0, result.output
    assert "cifar_conv" in json.loads(report.read_text())["calibration"]["source"]


def test_random_calibration_warns(model, tmp_path):
    out = tmp_path / "o.onnx"
    result = _run("quantize", model / "fp32.onnx", "--int8", "-o", out, "--random-calib", "--calib-samples", 2, "--eval-samples", 2)
    assert result.exit_code == 0, result.output
    assert "random inputs" in result.output and out.exists()


def test_held_out_samples_do_not_overlap():
    from edgecompress.calibration import hold_out

    samples = [{"x": np.full(1, k)} for k in range(10)]
    calib, held = hold_out(samples, 16, 4)
    assert len(held) >= 1 and not {int(s["x"][0]) for s in calib} & {int(s["x"][0]) for s in held}
    calib, held = hold_out(samples, 4, 4)
    assert [int(s["x"][0]) for s in calib] == [0, 1, 2, 3] and [int(s["x"][0]) for s in held] == [6, 7, 8, 9]
