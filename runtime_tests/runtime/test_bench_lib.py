"""bench(): result fields and ratios, interleaved rounds, batch handling, memory, profiling, agreement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgecompress import bench as bench_mod
from edgecompress import profile as prof
from edgecompress.bench import BenchConfig, agreement, bench, to_markdown
from edgecompress.errors import ConfigError, LoadError
from edgecompress.export import ExportConfig, export
from edgecompress.factorize import FactorizeConfig, methods


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    paths = {"dense": root / "lenet.onnx", "svd": root / "lenet_svd.onnx", "dyn": root / "lenet_dyn.onnx",
             "conv_svd": root / "cifar_conv_svd.onnx"}
    export("lenet5", paths["dense"])
    export("lenet5", paths["svd"], factorize_config=FactorizeConfig(method="svd", ratio=2))
    export("lenet5", paths["dyn"], ExportConfig(dynamic_batch=True))
    export("cifar_conv", paths["conv_svd"], factorize_config=FactorizeConfig(method="svd", ratio=2))
    return paths


@pytest.fixture(scope="module")
def report(models):
    return bench([models["dense"], models["svd"]], BenchConfig(threads=(1, 2), runs=5, warmup=1))


def test_result_fields_and_ratios(report, models):
    results = report["results"]
    assert [(r["name"], r["threads"]) for r in results] == [("lenet", 1), ("lenet_svd", 1), ("lenet", 2), ("lenet_svd", 2)]
    for r in results:
        assert {"model", "provider", "threads", "batch", "latency_ms", "size_bytes", "ratio", "throughput_per_s",
                "session_create_ms", "first_run_ms", "param_bytes", "peak_rss_bytes", "rss_delta_bytes"} <= set(r)
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
        assert lat["min"] <= lat["mean"] and r["runs"] == 5 and r["batch"] == 1 and r["provider"] == "cpu"
        assert r["throughput_per_s"] == pytest.approx(1000 / lat["mean"], rel=1e-3)
        assert r["peak_rss_bytes"] > r["rss_delta_bytes"] > 0
        base = next(b for b in results if b["name"] == "lenet" and b["threads"] == r["threads"])
        assert r["ratio"]["speedup"] == pytest.approx(base["latency_ms"]["p50"] / lat["p50"], rel=1e-3)
        assert r["ratio"]["size"] == pytest.approx(base["size_bytes"] / r["size_bytes"], rel=1e-3)
    dense, svd = results[0], results[1]
    assert dense["ratio"]["speedup"] == 1.0 and dense["ratio"]["size"] == 1.0
    assert dense["size_bytes"] == models["dense"].stat().st_size
    proto = onnx.load(models["dense"])
    assert dense["param_bytes"] == sum(4 * int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert svd["param_bytes"] < dense["param_bytes"] and svd["ratio"]["size"] > 1.5
    assert dense["placement"]["placement_fraction"] == 1.0
    assert report["config"]["baseline"] == str(models["dense"])
    assert "| lenet_svd | 1 | 1 |" in to_markdown(report)


class _FakeSession:
    def __init__(self, key, calls):
        self.key, self.calls = key, calls

    def run(self, _outputs, _feeds):
        self.calls.append(self.key)


def test_rounds_interleave_every_session_once_in_seeded_shuffled_order():
    keys = [(m, t) for t in (1, 2) for m in range(3)]

    def order(seed):
        calls = []
        sessions = {k: (_FakeSession(k, calls), {}) for k in keys}
        times = bench_mod._time_rounds(sessions, keys, BenchConfig(runs=8, seed=seed), None or (lambda *_: None))
        assert all(len(v) == 8 for v in times.values())
        return [calls[i:i + len(keys)] for i in range(0, len(calls), len(keys))]

    rounds = order(0)
    assert len(rounds) == 8 and all(sorted(r) == sorted(keys) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # shuffled per round
    assert order(0) == rounds and order(1) != rounds


def test_seconds_mode_and_baseline_by_path(models):
    report = bench([models["dense"], models["svd"]], BenchConfig(seconds=0.2, warmup=0, memory=False,
                                                                 baseline=str(models["svd"])))
    assert all(r["runs"] >= 3 for r in report["results"])
    assert report["results"][1]["ratio"]["speedup"] == 1.0


def test_batch_rewrites_dynamic_and_refuses_static(models):
    report = bench([models["dyn"]], BenchConfig(batch=4, runs=3, warmup=0, memory=False))
    assert report["results"][0]["batch"] == 4
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        bench([models["dense"]], BenchConfig(batch=4, runs=3))


def test_batch_follows_the_first_inputs_batch_dim_into_the_other_inputs(tmp_path):
    """A recurrent state as ``2 x batch x 4`` (silero-vad's): its axis 1 is the batch, its fixed 2 is not."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["state", "axes"], ["summed"], keepdims=0), helper.make_node("Add", ["x", "summed"], ["y"])],
        "stateful", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                     helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "stateful.onnx"))
    report = bench([tmp_path / "stateful.onnx"], BenchConfig(batch=3, runs=2, warmup=0, memory=False))
    assert report["results"][0]["batch"] == 3


@pytest.mark.parametrize("fields, message", [
    ({"runs": 5, "seconds": 1.0}, "not both"), ({"threads": (0,)}, "threads"), ({"runs": 0}, "runs"),
    ({"batch": 0}, "batch"), ({"warmup": -1}, "warmup")])
def test_config_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        BenchConfig(**fields)


def test_mobile_target_preset():
    config = BenchConfig.for_target("mobile", runs=3)
    assert (config.batch, config.threads, config.sequential, config.spinning, config.runs) == (1, (1, 2, 4), True, False, 3)


def test_bad_inputs(tmp_path, models):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(LoadError, match="not a valid ONNX"):
        bench([bad])
    with pytest.raises(LoadError, match="does not exist"):
        bench([tmp_path / "missing.onnx"])
    with pytest.raises(ConfigError, match="out of range"):
        bench([models["dense"]], BenchConfig(baseline=3))


def test_profile_attributes_factorized_model_to_layers(models):
    report = bench([models["conv_svd"]], BenchConfig(runs=3, warmup=1, memory=False, profile=True, profile_runs=5))
    result = report["results"][0]
    p = result["profile"]
    assert p["attributed_fraction"] >= 0.9
    assert "classifier" in p["layers_ms"] and "features.0" in p["layers_ms"]
    assert sum(p["layers_ms"].values()) + sum(p["unattributed_ms"].values()) == pytest.approx(p["node_ms"], rel=1e-2)
    assert result["placement"]["nodes_on_provider"] == result["placement"]["nodes_total"] > 0


def test_profile_compares_layers_with_the_baseline(models):
    report = bench([models["dense"], models["svd"]], BenchConfig(runs=3, warmup=1, memory=False, profile=True,
                                                                  profile_runs=5))
    base, svd = report["results"]
    assert "layers_vs_baseline" not in base
    rows = {row["layer"]: row for row in svd["layers_vs_baseline"]}
    assert set(rows) == set(base["profile"]["layers_ms"]) | set(svd["profile"]["layers_ms"])
    for name, row in rows.items():
        assert row["baseline_ms"] == base["profile"]["layers_ms"].get(name)
        assert row["ms"] == svd["profile"]["layers_ms"].get(name)
        if row["baseline_ms"] and row["ms"]:
            assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ms"], rel=1e-3)
    text = to_markdown(report)
    assert "Per layer, lenet_svd vs the baseline" in text
    assert all(f"| {name} |" in text for name in rows)


def test_compare_layers_orders_by_baseline_time_and_marks_missing_layers():
    rows = prof.compare_layers({"a": 1.0, "b": 3.0, "gone": 0.5}, {"a": 2.0, "b": 1.0, "new": 0.1})
    assert [r["layer"] for r in rows] == ["b", "a", "gone", "new"]
    assert [r["speedup"] for r in rows] == [3.0, 0.5, None, None]
    assert rows[2]["ms"] is None and rows[3]["baseline_ms"] is None


@pytest.mark.skipif("tucker" not in methods(), reason="tucker is not registered in edgecompress.factorize yet")
def test_profile_attributes_tucker_resnet(tmp_path):
    path = tmp_path / "r18_tucker.onnx"
    # layers 1-2 only keeps the test short; the chains and their fused/reordered nodes are the same
    export("resnet18_cifar", path, factorize_config=FactorizeConfig(method="tucker", ratio=2,
                                                                    include=("layer1.*", "layer2.*")))
    assert any(n.name.startswith("layer1.0.conv1/tucker/") for n in onnx.load(path).graph.node)
    p = bench([path], BenchConfig(runs=2, warmup=1, memory=False, profile=True, profile_runs=3))["results"][0]["profile"]
    assert p["attributed_fraction"] >= 0.9
    assert "layer1.0.conv1" in p["layers_ms"]


def test_attribute_maps_renamed_and_fused_nodes():
    node = onnx.helper.make_node
    graph = onnx.helper.make_graph(
        [node("Conv", ["x", "w"], ["/l1/conv/Conv_output_0"], name="l1.conv/tucker/0"),
         node("Relu", ["/l1/conv/Conv_output_0"], ["/l1/relu/Relu_output_0"], name="l1.relu/Relu"),
         node("Gemm", ["/l1/relu/Relu_output_0", "b"], ["y"], name="fc/svd/1"),
         node("Flatten", ["y"], ["z"], name="Flatten")], "g", [], [])
    model = onnx.helper.make_model(graph)

    def event(name, op, ts, dur=1000, provider="CPUExecutionProvider"):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "provider": provider}}

    events = [{"name": "model_run", "ts": 0}, event("/l1/relu/Relu_output_0_nchwc", "Conv", 1, 4000),
              event("fused fc/svd/1", "FusedGemm", 2), event("Flatten_token_3", "Flatten", 3),
              event("ReorderOutput_token_5", "ReorderOutput", 4)]
    result = prof.attribute(model, events, "CPUExecutionProvider", runs=1)
    assert result.layers == {"l1.conv": 4.0, "fc": 1.0}
    assert result.unattributed == {"(root)": 1.0, "(unattributed) Reorder": 1.0}
    assert result.attributed_fraction == pytest.approx(5 / 7)
    assert result.nodes_total == 4 and result.placement_fraction == 1.0
    events.append(event("Other", "Conv", 5, provider="CUDAExecutionProvider"))
    result = prof.attribute(model, events, "CUDAExecutionProvider", runs=1)
    assert result.nodes_on_provider == 1 and result.cpu_fallback_ops == {"Conv": 1, "FusedGemm": 1, "Flatten": 1,
                                                                         "ReorderOutput": 1}


def test_agreement_numbers():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    out = ref + np.array([[0.1, 0.0], [0.0, 0.0]])
    a = agreement(out, ref, np.array([0, 0]))
    assert a["max_abs_diff"] == pytest.approx(0.1)
    assert a["sqnr_db"] == pytest.approx(10 * np.log10(5.0 / 0.01), abs=1e-3)
    assert a["top1_agreement"] == 1.0 and a["accuracy"] == 0.5
    assert agreement(ref, ref)["sqnr_db"] is None


def test_data_agreement_with_baseline(tmp_path, models):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5])
    np.savez(tmp_path / "d.npz", input=x, labels=labels)
    report = bench([models["dense"], models["svd"]], BenchConfig(runs=2, warmup=0, memory=False,
                                                                 data=str(tmp_path / "d.npz")))
    base, svd = (r["agreement"] for r in report["results"])
    assert base["max_abs_diff"] == 0.0 and base["sqnr_db"] is None and base["top1_agreement"] == 1.0
    dense_out = np.concatenate([ort.InferenceSession(str(models["dense"])).run(None, {"input": x[i:i + 1]})[0]
                                for i in range(6)])
    svd_out = np.concatenate([ort.InferenceSession(str(models["svd"])).run(None, {"input": x[i:i + 1]})[0]
                              for i in range(6)])
    assert svd["max_abs_diff"] == pytest.approx(float(np.abs(svd_out - dense_out).max()), rel=1e-4)
    assert svd["accuracy"] == pytest.approx(float(np.mean(svd_out.argmax(-1) == labels)))
    assert svd["samples"] == 6 and svd["sqnr_db"] is not None
    np.savez(tmp_path / "wrong.npz", a=x, b=x)
    with pytest.raises(ConfigError, match="lacks inputs"):
        bench([models["dense"]], BenchConfig(runs=1, memory=False, data=str(tmp_path / "wrong.npz")))
