"""Dynamic int8 on text_classifier and cifar_conv_fc, dense and SVD-factorized: every weight MatMul
(Gemm rewritten first, each SVD factor included) becomes MatMulInteger; Conv stays fp32 by default."""

from __future__ import annotations

import onnx
import pytest

from edgecompress import qgraph
from edgecompress.export import export
from edgecompress.factorize import FactorizeConfig
from edgecompress.quantize import QuantizeConfig, quantize

# fc1 of cifar_conv_fc (8192x1536) is left dense in the factorized case: its SVD alone takes over a
# minute on 2 shared cores; it still checks the Gemm rewrite, and fc2/classifier give the SVD chains.
CASES = [("text_classifier", None), ("text_classifier", FactorizeConfig(method="svd", ratio=4)),
         ("cifar_conv_fc", None), ("cifar_conv_fc", FactorizeConfig(method="svd", ratio=4, exclude=("fc1",)))]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'svd' if c[1] else 'dense'}")
def dynamic(request, tmp_path_factory):
    name, fconfig = request.param
    tmp = tmp_path_factory.mktemp(f"dq-{name}")
    export(name, tmp / "fp32.onnx", factorize_config=fconfig)
    report = quantize(tmp / "fp32.onnx", tmp / "int8.onnx", QuantizeConfig(mode="dynamic", eval_samples=2))
    return onnx.load(str(tmp / "fp32.onnx")), onnx.load(str(tmp / "int8.onnx")), report, fconfig is not None


def test_matmul_integer_for_every_weight_matmul(dynamic):
    fp32, q, report, factorized = dynamic
    linear = [n for n in qgraph.weight_nodes(fp32) if n.op_type in ("MatMul", "Gemm")]
    counts = report["op_counts"]
    assert counts.get("MatMulInteger", 0) == len(linear) > 0
    assert "Gemm" not in counts
    inits = {i.name for i in q.graph.initializer}
    assert not [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    if factorized:
        factors = [n.name for n in linear if "/svd/" in n.name]
        assert factors and not set(factors) & {n.name for n in q.graph.node if n.op_type in ("MatMul", "Gemm")}


def test_gemm_rewritten_and_convs_left_fp32(dynamic):
    fp32, q, report, _ = dynamic
    assert report["mode"] == "dynamic"
    assert report["gemm_rewritten"] == [n.name for n in fp32.graph.node if n.op_type == "Gemm"]
    convs = sum(n.op_type == "Conv" for n in fp32.graph.node)
    assert report["op_counts"].get("Conv", 0) == convs and "ConvInteger" not in report["op_counts"]
    if convs:
        assert any("Conv nodes in fp32" in w for w in report["warnings"])
    assert report["coverage"]["left_float"] == [n.name for n in fp32.graph.node if n.op_type == "Conv"]


def test_dynamic_accuracy_is_reported(dynamic):
    _, _, report, _ = dynamic
    assert report["sqnr_db"] > 20 and report["top1_agreement"] is not None
    # a zoo export carries its zoo name: accuracy is measured on the model's own held-out sample inputs
    assert "zoo model" in report["calibration"]["source"]


def test_a_tt_text_classifier_needs_no_calibration(tmp_path):
    """Its token table is a TT chain, so no Gather reads the ids from a table: the id range comes from the
    file's metadata (written at export), and dynamic int8 needs no --calib."""
    fp32_path, int8_path = tmp_path / "tt.onnx", tmp_path / "tt.int8.onnx"
    export("text_classifier", fp32_path, factorize_config=FactorizeConfig(method="tt", ratio=4, min_params=0))
    fp32 = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in fp32.metadata_props}
    assert props["edgecompress.vocab.input_ids"] == "8192"
    del fp32.metadata_props[:]  # no zoo name: quantize cannot calibrate on the zoo's samples
    onnx.helper.set_model_props(fp32, {"edgecompress.vocab.input_ids": "8192"})
    onnx.save(fp32, str(fp32_path))
    inits = {i.name for i in fp32.graph.initializer}
    assert not any(n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits for n in fp32.graph.node)
    report = quantize(fp32_path, int8_path, QuantizeConfig(mode="dynamic", eval_samples=2))
    linear = [n for n in qgraph.weight_nodes(fp32) if n.op_type in ("MatMul", "Gemm")]
    assert report["op_counts"].get("MatMulInteger", 0) == len(linear) > 0
    assert report["sqnr_db"] > 20 and "random inputs" in report["calibration"]["notes"][0]
