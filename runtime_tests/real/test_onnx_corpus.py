"""Real ONNX files as exporters write them (``edgecompress.models.onnx_corpus``: Paddle, tf2onnx, torch.onnx's
TorchScript and dynamo exporters, a transformers BERT; provenance and licences are in its docstring):
``plan``, ``export`` (tucker, svd, and a clean round trip), ``quantize`` and ``bench``, each with
``--input-shape``. Nothing is committed: the files come from public wheels (``pip download --no-deps``, cached)
or are written by the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from edgecompress.exporters import CHAIN_OPS
from edgecompress.models.onnx_corpus import CORPUS, corpus_file

from edgecompress import calibration, runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    cache: dict[str, tuple[Path, str]] = {}

    def get(name: str) -> tuple[Path, str]:
        if name not in cache:
            cache[name] = corpus_file(name, folder)
        return cache[name]

    return get


def _ops(path: Path) -> set[str]:
    """The op types of the file's graph and of its subgraphs (an If's branches)."""
    def walk(graph: onnx.GraphProto) -> set[str]:
        found = set()
        for node in graph.node:
            found.add(node.op_type)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    found |= walk(sub)
        return found

    return walk(runtime.load_onnx(path).graph)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_real_file_factorizes_into_a_proportionally_smaller_file(cli, corpus, tmp_path, name):
    path, shape = corpus(name)
    assert CORPUS[name][2] <= _ops(path)  # the file is what its docstring says
    plan = cli("plan", path, "--input-shape", shape, "--method", "tucker", "--ratio", "2", "--json")
    assert plan.exit_code == 0, plan.output
    layers = json.loads(plan.stdout)["layers"]
    assert layers and all(r["macs_before"] is not None for r in layers)  # MACs counted from the inferred shapes
    assert sum(r["macs_before"] for r in layers) > 0
    for method in ("tucker", "svd"):
        out, report_path = tmp_path / f"{method}.onnx", tmp_path / f"{method}.json"
        result = cli("export", path, "--input-shape", shape, "--method", method, "--ratio", "2", "-o", out,
                     "--report", report_path)
        assert result.exit_code == 0, result.output
        report = json.loads(report_path.read_text())
        totals, sizes = report["totals"], report["onnx"]
        assert totals["factorized_layers"] >= 1 and totals["macs"] < totals["macs_dense"]
        removed = 1 - totals["params"] / totals["params_dense"]
        assert removed > 0.05
        # the file shrinks by the bytes of the parameters removed, at least (folding takes off more)
        assert sizes["bytes"] <= sizes["bytes_input"] - 0.97 * 4 * (totals["params_dense"] - totals["params"]) + 4096
        assert _ops(out) <= _ops(path) | CHAIN_OPS  # no op outside the chain set is added
        assert "BatchNormalization" not in _ops(out) or _bn_after_activation(path)  # folded where it follows a Conv
        model = runtime.load_onnx(out)
        if any(isinstance(d, str) for d in _dims(runtime.load_onnx(path))):  # dynamic dims stay dynamic
            assert any(isinstance(d, str) for d in _dims(model))


def _dims(model: onnx.ModelProto) -> list[int | str]:
    from edgecompress.graph.shapes import dims, graph_inputs

    return [d for v in graph_inputs(model) for d in dims(v)]


def _bn_after_activation(path: Path) -> bool:
    """Whether a BatchNormalization follows something other than a Conv or Gemm (it then stays)."""
    model = runtime.load_onnx(path)
    producer = {o: n for n in model.graph.node for o in n.output}
    return any(n.op_type == "BatchNormalization" and getattr(producer.get(n.input[0]), "op_type", None) not in ("Conv", "Gemm")
               for n in model.graph.node)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_round_trip_keeps_the_outputs_and_is_no_larger(cli, corpus, tmp_path, name):
    path, shape = corpus(name)
    out, report_path = tmp_path / "same.onnx", tmp_path / "same.json"
    result = cli("export", path, "--input-shape", shape, "-o", out, "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["error_vs_dense"]["max_abs_diff"] <= 1e-4
    assert out.stat().st_size <= report["onnx"]["bytes_input"]
    original, written = runtime.load_onnx(path), runtime.load_onnx(out)
    fixed = _fixed(original, shape)
    feeds = calibration.random_samples(fixed, 1, 3)[0]
    for a, b in zip(runtime.make_session(original).run(None, feeds), runtime.make_session(written).run(None, feeds)):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def _fixed(model: onnx.ModelProto, shape: str) -> onnx.ModelProto:
    from edgecompress.graph.shapes import fixed, parse_input_shapes

    return fixed(model, parse_input_shapes(shape, model))


@pytest.mark.parametrize("name", ["paddle-ocr-cls", "tf2onnx-speech-embedding", "bert"])
def test_quantize_and_bench_take_the_input_shape(cli, corpus, tmp_path, name):
    path, shape = corpus(name)
    factorized, int8 = tmp_path / "f.onnx", tmp_path / "f.int8.onnx"
    assert cli("export", path, "--input-shape", shape, "--method", "tucker", "--ratio", "2", "-o", factorized).exit_code == 0
    report_path = tmp_path / "q.json"
    result = cli("quantize", factorized, "--int8", "--input-shape", shape, "-o", int8, "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["bytes_after"] < report["bytes_before"] and report["speed"]["int8_ms"] > 0
    bench_json = tmp_path / "b.json"
    result = cli("bench", path, factorized, int8, "--input-shape", shape, "--runs", "5", "--warmup", "1",
                 "--no-memory", "--json", bench_json)
    assert result.exit_code == 0, result.output
    assert len(json.loads(bench_json.read_text())["results"]) == 3


def test_bad_onnx_inputs_get_one_line_and_no_file(cli, corpus, tmp_path):
    path, _ = corpus("dynamo-external-data")
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(path.read_bytes())  # without its .data file
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(corpus("paddle-orientation")[0].read_bytes()[:100_000])
    cls, _ = corpus("paddle-ocr-cls")
    for args, message in (([alone], "dynamo.onnx.data is missing"),
                          ([truncated], "is not a valid ONNX file"),
                          ([cls, "--method", "svd"], "give --input-shape x=1x3x?x? with a number for each ?"),
                          ([cls, "--input-shape", "1x3x48"], "does not fit input 'x'"),
                          ([cls, "--input-shape", "1x4x48x192"], "dim 1 is fixed at 3"),
                          ([cls, "--input-shape", "y=1x3x48x192"], "the model's inputs are x")):
        out = tmp_path / "out.onnx"
        result = cli("export", *args, "-o", out)
        assert result.exit_code != 0, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert not out.exists()


def test_run_takes_a_real_file_with_dynamic_dims(cli, corpus, tmp_path):
    """PaddleOCR's opset-11 classifier with a dynamic height and width: every variant builds, int8 included
    (quantize converts it to opset 13 first: per-channel DequantizeLinear needs its axis)."""
    path, shape = corpus("paddle-ocr-cls")
    result = cli("run", path, "--input-shape", shape, "--methods", "tucker", "--ratio", "2", "--no-plan",
                 "--bench-runs", "2", "--threads", "1", "-o", tmp_path / "run")
    assert result.exit_code == 0, result.output
    variants = {v["name"]: v for v in json.loads((tmp_path / "run" / "report.json").read_text())["variants"]}
    assert set(variants) == {"dense", "dense-int8", "tucker-x2", "tucker-x2-int8"}
    assert all(v["status"] == "ok" for v in variants.values()), [v.get("error") for v in variants.values()]
    assert variants["tucker-x2"]["size_bytes"] < variants["dense"]["size_bytes"]


def test_silero_vad_quantizes_and_benches(cli, corpus, tmp_path):
    """silero-vad: its decoder's If branch reads an outer Relu output by name, its ``state`` input batches on
    axis 1, and its reflect Pad needs more than one sample. int8 loads and runs in both modes (it did not
    load before), bench finds the batch, and an input shape it cannot run on gets one line."""
    path, shape = corpus("torch-silero-vad")
    for mode in ("dynamic", "static"):
        out, report_path = tmp_path / f"{mode}.onnx", tmp_path / f"{mode}.json"
        result = cli("quantize", path, "--int8", "--mode", mode, "--random-calib", "--input-shape", shape, "-o", out,
                     "--report", report_path)
        assert result.exit_code == 0, result.output
        report = json.loads(report_path.read_text())
        assert report["sqnr_db"] is None or report["sqnr_db"] >= 12
        assert report["bytes_after"] < report["bytes_before"] or mode == "dynamic"
    bench_json = tmp_path / "b.json"
    result = cli("bench", path, tmp_path / "static.onnx", "--input-shape", shape, "--runs", "3", "--warmup", "1",
                 "--no-memory", "--json", bench_json)
    assert result.exit_code == 0, result.output
    assert [r["batch"] for r in json.loads(bench_json.read_text())["results"]] == [1, 1]
    for command in (("bench", path), ("quantize", path, "--int8", "-o", tmp_path / "q.onnx")):
        result = cli(*command)
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and "--input-shape" in lines[-1] and "does not run on inputs of shape" in lines[-1], lines
    assert not (tmp_path / "q.onnx").exists()
