"""TT chains exported to ONNX: only chain ops, ``module/tt/k`` names, parity on onnxruntime; zoo models and
models from outside the zoo (a transformer, an MLP-mixer, a Conv1d net)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from edgecompress import exporters
from edgecompress.cli import main
from edgecompress.export import ExportConfig, export, export_module
from edgecompress.factorize import FactorizeConfig, RankSpec, factorize
from edgecompress.factorize.tt import tt_conv, tt_embedding, tt_linear, tt_naive_conv
from edgecompress.loading import InputSpec

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tt_cifar_conv_fc.json"


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("build,x,method,matmuls", [
    (lambda: tt_linear(nn.Linear(96, 80), RankSpec(ratio=3, multiple=1), d=3), torch.randn(2, 5, 96), "tt", 3),
    (lambda: tt_linear(nn.Linear(13, 11), RankSpec(ratio=1.5, multiple=1), d=2), torch.randn(3, 13), "tt", 3),
    (lambda: tt_conv(nn.Conv2d(12, 20, 3, stride=2, padding=1), RankSpec(ratio=2, multiple=1), d=2), torch.randn(2, 12, 9, 9), "tt", 2),
    (lambda: tt_conv(nn.Conv2d(16, 8, 3, padding=1), RankSpec(ratio=2, multiple=1), d=2, spatial_first=False), torch.randn(2, 16, 6, 6), "tt", 2),
    (lambda: tt_conv(nn.Conv1d(7, 11, 3, padding=1), RankSpec(ratio=1.5, multiple=1), d=2), torch.randn(2, 7, 10), "tt", 3),
    (lambda: tt_naive_conv(nn.Conv2d(12, 20, 3, padding=1), RankSpec(ratio=2, multiple=1)), torch.randn(2, 12, 7, 7), "tt-naive", 2),
    (lambda: tt_embedding(nn.Embedding(1000, 24), RankSpec(ratio=4, multiple=1), d=3), torch.randint(0, 1000, (2, 7)), "tt", 2),
])
def test_layer_exports_as_a_chain(build, x, method, matmuls, dynamic):
    model = Holder(build().module).eval()
    proto, ok = exporters.simplify(exporters.export_onnx(model, [x], dynamic_batch=dynamic))
    assert ok
    chain = exporters.nodes_under(proto, "layer")
    assert len(chain) == len(proto.graph.node) and all(n.name.startswith(f"layer/{method}/") for n in chain)
    assert not exporters.foreign_ops(chain)
    assert sum(n.op_type == "MatMul" for n in chain) == matmuls
    assert exporters.check_parity(proto, model, [[x]]).max_abs_diff <= 1e-4
    other = torch.randint(0, 1000, (5, 7)) if not x.is_floating_point() else torch.randn(5, *x.shape[1:])
    if dynamic:
        assert exporters.check_parity(proto, model, [[other]]).max_abs_diff <= 1e-4


def _factorized_nodes(proto: onnx.ModelProto, report: dict) -> list:
    return [n for r in report["layers"] if r["method"] != "dense" for n in exporters.nodes_under(proto, r["name"])]


def _layer(report: dict, name: str) -> dict:
    return next(r for r in report["layers"] if r["name"] == name)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    out = tmp_path_factory.mktemp("tt") / "resnet.onnx"
    return out, export("resnet18_cifar", out, factorize_config=FactorizeConfig(method="tt", ratio=4))


def test_resnet18_ratio_4(resnet):
    out, report = resnet
    totals = report["totals"]
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert totals["factorized_layers"] == 21
    assert totals["params_before_factorized"] / totals["params_after_factorized"] >= 3.5
    proto = onnx.load(out)
    nodes = _factorized_nodes(proto, report)
    assert len(nodes) > 100 and not exporters.foreign_ops(nodes)
    assert "Einsum" not in exporters.op_counts(proto)


def test_cifar_conv_fc_ratio_50(tmp_path):
    report = export("cifar_conv_fc", tmp_path / "m.onnx", factorize_config=FactorizeConfig(method="tt", ratio=50))
    assert report["parity"]["max_abs_diff"] <= 1e-4
    for name in ("fc1", "fc2"):
        layer = _layer(report, name)
        assert layer["method"] == "tt" and layer["params_before"] / layer["params_after"] >= 50
    assert not exporters.foreign_ops(_factorized_nodes(onnx.load(tmp_path / "m.onnx"), report))


def test_text_classifier_ratio_10(tmp_path):
    report = export("text_classifier", tmp_path / "t.onnx", factorize_config=FactorizeConfig(method="tt", ratio=10))
    assert report["parity"]["max_abs_diff"] <= 1e-4
    emb = _layer(report, "token_embedding")
    assert emb["method"] == "tt" and emb["params_before"] / emb["params_after"] >= 10
    nodes = exporters.nodes_under(onnx.load(tmp_path / "t.onnx"), "token_embedding")
    assert {"Div", "Mod", "Gather", "MatMul"} <= {n.op_type for n in nodes} and not exporters.foreign_ops(nodes)


def test_cifar_conv_fc_whole_network_over_80x_from_the_cli(tmp_path):
    out, report_path = tmp_path / "c.onnx", tmp_path / "c.json"
    result = CliRunner().invoke(main, ["export", "cifar_conv_fc", "--config", str(CONFIG), "-o", str(out),
                                       "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["totals"]["params_dense"] / report["totals"]["params"] >= 80
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert {r["name"] for r in report["layers"] if r["method"] == "tt"} == {"features.4", "features.8", "features.11", "fc1", "fc2"}


def test_tt_naive_from_the_cli(tmp_path):
    result = CliRunner().invoke(main, ["export", "cifar_conv", "--method", "tt-naive", "--ratio", "2",
                                       "-o", str(tmp_path / "n.onnx"), "--report", str(tmp_path / "n.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "n.json").read_text())
    methods = {r["name"]: r["method"] for r in report["layers"]}
    assert methods["classifier"] == "dense" and methods["features.8"] == "tt-naive"


class Block(nn.Module):
    """A pre-norm transformer block with explicit Linears (3-D activations)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Mixer(nn.Module):
    """An MLP-mixer layer: token mixing on the transposed activations, then channel mixing."""

    def __init__(self, tokens=16, dim=24):
        super().__init__()
        self.token_mix = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(), nn.Linear(32, tokens))
        self.channel_mix = nn.Sequential(nn.Linear(dim, 48), nn.GELU(), nn.Linear(48, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = x + self.token_mix(x.transpose(1, 2)).transpose(1, 2)
        return self.head((x + self.channel_mix(x)).mean(1))


def conv1d_net():
    return nn.Sequential(nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 3, stride=2, dilation=2),
                         nn.ReLU(), nn.Conv1d(32, 16, 1), nn.Flatten(), nn.Linear(16 * 14, 10))


@pytest.mark.parametrize("build,shape", [(Block, (2, 10, 32)), (Mixer, (2, 16, 24)), (conv1d_net, (2, 8, 32))])
def test_models_outside_the_zoo_export(build, shape, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    spec = InputSpec(shape)
    new, report = factorize(model, FactorizeConfig(method="tt", ratio=2, rank_multiple=1))
    assert report.totals()["factorized_layers"] >= 3
    result = export_module(new, spec, tmp_path / "m.onnx", ExportConfig(dynamic_batch=True))
    assert result["parity"]["max_abs_diff"] <= 1e-4
    proto = onnx.load(tmp_path / "m.onnx")
    nodes = [n for r in report.factorized for n in exporters.nodes_under(proto, r.name)]
    assert nodes and not exporters.foreign_ops(nodes)
