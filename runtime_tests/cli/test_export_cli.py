"""``edgecompress export`` and ``models`` through the real CLI: reports, exit codes, no stray files."""

import json
import pickle

import pytest
import torch


def test_models_lists_zoo(cli):
    result = cli("models", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert len(rows) >= 7
    assert rows["resnet18"]["params"] == 11_689_512 and rows["resnet18"]["input_shape"] == [1, 3, 224, 224]


def test_export_writes_model_and_report(cli, tmp_path):
    result = cli("export", "lenet5", "-o", tmp_path / "m.onnx", "--report", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert {"model", "input_shape", "onnx", "parity", "totals"} <= set(report)
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["onnx"]["op_counts"]["Conv"] == 2
    assert "parity" in result.output


def test_export_from_factory_file(cli, tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),"
        " nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))\n"
    )
    result = cli("export", f"{tmp_path / 'net.py'}:build", "--input-shape", "1x3x24x24",
                 "-o", tmp_path / "n.onnx", "--report", tmp_path / "n.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "n.json").read_text())
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert "BatchNormalization" not in report["onnx"]["op_counts"]


def _one_line_error(result):
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def bad_weights(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    with open(tmp_path / "code.pt", "wb") as f:
        pickle.dump({"w": torch.nn.Linear(1, 1)}, f)
    torch.save({"x": torch.zeros(1)}, tmp_path / "mismatch.pt")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["resnet81"], "did you mean 'resnet18'"),
    (["lenet5", "--weights", "{d}/corrupt.pt"], "corrupt"),
    (["lenet5", "--weights", "{d}/code.pt"], "carries code"),
    (["lenet5", "--weights", "{d}/mismatch.pt"], "do not match"),
    (["lenet5", "--weights", "{d}/missing.pt"], "does not exist"),
    (["lenet5", "--input-shape", "1xax3"], "bad input shape"),
    (["no/such/file.py:build", "--input-shape", "1x3x8x8"], "no such file"),
    (["lenet5", "--ratio", "4"], "need --method"),
])
def test_bad_input_one_line_no_file(cli, bad_weights, args, message):
    out = bad_weights / "x.onnx"
    result = cli("export", *[a.format(d=bad_weights) for a in args], "-o", out)
    assert message in _one_line_error(result)
    assert not out.exists()
    assert not [p for p in bad_weights.iterdir() if p.name.startswith(".x.onnx")], "no temp file left"


def test_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("export", "lenet5", "-o", blocker / "sub" / "x.onnx")
    assert "cannot create folder" in _one_line_error(result)


@pytest.mark.parametrize("command", [["export", "lenet5"], ["quantize", "MODEL", "--int8", "--random-calib"]])
def test_output_in_a_place_that_refuses_files_is_one_line(cli, tmp_path, command):
    """/proc takes no new files even for root (who passes every permission check): one line, not a
    tempfile traceback."""
    model = tmp_path / "m.onnx"
    assert cli("export", "lenet5", "-o", model).exit_code == 0
    args = [str(model) if a == "MODEL" else a for a in command]
    result = cli(*args, "-o", "/proc/edgecompress-test.onnx")
    assert "cannot write to '/proc'" in _one_line_error(result)


def test_a_factorized_model_with_more_macs_than_dense_says_it_will_run_slower(cli, tmp_path):
    """TT-conv compresses parameters, not compute: digits at tt 4x has more MACs than dense, and export says so."""
    out, report = tmp_path / "tt.onnx", tmp_path / "tt.json"
    result = cli("export", "digits_cnn", "--method", "tt", "--ratio", "4", "--data-free", "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    totals = json.loads(report.read_text())["totals"]
    assert totals["macs"] > totals["macs_dense"] and totals["params"] < totals["params_dense"]
    text = " ".join(result.output.split())
    assert f"{totals['macs'] / totals['macs_dense']:.1f}x the dense model's MACs" in text and "run slower" in text
