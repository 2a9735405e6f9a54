"""mobile(): a loadable .ort file, its operator config and the NNAPI/CoreML coverage summary."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from edgecompress.errors import ConfigError, LoadError
from edgecompress.export import export
from edgecompress.factorize import FactorizeConfig
from edgecompress.mobile import MobileConfig, mobile


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mobile")
    src = root / "lenet_svd.onnx"
    export("lenet5", src, factorize_config=FactorizeConfig(method="svd", ratio=2))
    return src, root / "out", mobile(src, root / "out")


def test_writes_loadable_ort_and_config(converted):
    src, out, summary = converted
    ort_file = out / "lenet_svd.ort"
    assert ort_file.is_file() and summary["ort_model"] == str(ort_file)
    session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(session.run(None, {"input": x})[0], ref, rtol=1e-4, atol=1e-5)
    assert summary["ort_check"]["runs"] and summary["ort_check"]["max_abs_diff_vs_onnx"] < 1e-4
    config_text = (out / "lenet_svd.required_operators.config").read_text()
    assert "MatMul" in config_text and any("MatMul" in line for line in summary["required_operators"])


def test_json_coverage_summary(converted):
    _, out, summary = converted
    on_disk = json.loads((out / "lenet_svd.mobile.json").read_text())
    assert on_disk["coverage"] == summary["coverage"]
    for ep in ("nnapi", "coreml_neuralnetwork", "coreml_mlprogram"):
        info = on_disk["coverage"][ep]
        assert 0 < info["supported_nodes"] <= info["nodes"]
        assert info["coverage"] == pytest.approx(info["supported_nodes"] / info["nodes"], abs=1e-4)
        assert info["partitions"] == len(info["partition_sizes"]) >= 1
        assert sum(info["partition_sizes"]) == info["supported_nodes"]
        assert info["suitability"] in ("YES", "MAYBE", "NO")
    assert on_disk["coverage"]["nnapi"]["unsupported_ops"] == []
    assert "onnxruntime_perf_test" in on_disk["perf_test"]["nnapi"] and "-e nnapi" in on_disk["perf_test"]["nnapi"]
    assert "-r 100" in on_disk["perf_test"]["cpu"] and "lenet_svd.ort" in on_disk["perf_test"]["push"]


def test_bad_input_writes_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(LoadError, match="not a valid ONNX"):
        mobile(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoadError, match="does not exist"):
        mobile(tmp_path / "missing.onnx", tmp_path / "out")
    with pytest.raises(ConfigError):
        MobileConfig(target_platform="mips")
