"""Every zoo model (and a factory-file model) exports to ONNX with onnxruntime matching PyTorch."""

import onnx
import pytest

from edgecompress import exporters
from edgecompress.export import ExportConfig, export
from edgecompress.models import list_models

TOLERANCE = 1e-4  # max |ONNX - torch|, the export default


@pytest.mark.parametrize("name", [m for m in list_models() if m not in ("resnet18", "mobilenet_v2", "crepe_full")])
def test_zoo_model_exports_with_parity(name, tmp_path):
    report = export(name, tmp_path / f"{name}.onnx")
    assert report["parity"]["max_abs_diff"] <= TOLERANCE
    if report["input_dtype"] == "int64":
        assert report["parity"]["rel_error"] <= 1e-5
    proto = onnx.load(str(tmp_path / f"{name}.onnx"))
    ops = exporters.op_counts(proto)
    # CREPE's BatchNorm follows a ReLU, so there is no conv to fold it into: its 6 stay
    assert ops.get("BatchNormalization", 0) == (6 if name.startswith("crepe") else 0)
    assert not [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")], "no contrib/custom ops"
    assert report["onnx"]["bytes"] == (tmp_path / f"{name}.onnx").stat().st_size


def test_resnet18_report(tmp_path):
    report = export("resnet18", tmp_path / "r.onnx")
    assert report["model"] == "resnet18" and report["input_shape"] == [1, 3, 224, 224]
    assert report["parity"]["max_abs_diff"] <= TOLERANCE
    assert report["onnx"]["op_counts"]["Conv"] == 20
    assert "BatchNormalization" not in report["onnx"]["op_counts"]
    assert report["totals"]["params"] == 11_689_512 - 4_800  # BatchNorm folded: its scale and shift are gone


def test_node_names_carry_module_paths(tmp_path):
    export("resnet18_cifar", tmp_path / "r.onnx")
    names = {n.name for n in onnx.load(str(tmp_path / "r.onnx")).graph.node}
    assert {"conv1/Conv", "layer2.0.conv1/Conv", "layer2.0.downsample.0/Conv", "fc/Gemm"} <= names


def test_dynamic_batch(tmp_path):
    export("lenet5", tmp_path / "l.onnx", ExportConfig(dynamic_batch=True))
    from edgecompress import runtime
    import numpy as np

    session = runtime.make_session(tmp_path / "l.onnx")
    (out,) = runtime.run(session, [np.zeros((5, 1, 28, 28), np.float32)])
    assert out.shape == (5, 10)


def test_batchnorm_is_folded_before_export():
    from edgecompress.models import create_model

    model = create_model("resnet18_cifar")
    assert exporters.fold_batchnorm_(model) == 20
