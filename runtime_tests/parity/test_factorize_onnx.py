"""Factorized layers and models exported to ONNX: onnxruntime matches PyTorch, and each factorized
layer is a chain of the expected standard nodes (no Einsum, nothing outside exporters.CHAIN_OPS)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from edgecompress import exporters, runtime
from edgecompress.export import ExportConfig, export, export_module
from edgecompress.factorize import FactorizeConfig, RankSpec, factorize
from edgecompress.factorize.registry import decomposer_for
from edgecompress.loading import InputSpec
from edgecompress.models import create_model

METHODS = ("svd", "svd-spatial", "tucker", "cp")
RTOL, ATOL = 1e-4, 1e-5

# convs per chain (Conv2d); Conv1d CP has one depthwise conv fewer, svd-spatial on Conv1d is svd
CONVS = {"svd": 2, "svd-spatial": 2, "tucker": 3, "cp": 4}
PADDING_OPS = {"zeros": {}, "reflect": {"Pad": 1}, "replicate": {"Pad": 1}, "circular": None}  # None: Slice+Concat


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


LAYERS = {
    "conv2d-stride-dilation": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2),
    "conv2d-same-even-nobias": lambda: nn.Conv2d(16, 24, (2, 4), padding="same", bias=False),
    "conv2d-groups": lambda: nn.Conv2d(16, 24, 3, padding=(1, 0), groups=2),
    "conv2d-reflect": lambda: nn.Conv2d(16, 24, 3, padding=1, padding_mode="reflect"),
    "conv2d-circular": lambda: nn.Conv2d(16, 24, 3, padding=1, padding_mode="circular"),
    "conv1d-replicate": lambda: nn.Conv1d(16, 24, 5, padding="same", padding_mode="replicate"),
    "conv1d-stride": lambda: nn.Conv1d(16, 24, 3, stride=2),
}


def _export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    proto, _ = exporters.simplify(exporters.export_onnx(module, [x]))
    exporters.check_model(proto)
    return proto


def _assert_parity(proto: onnx.ModelProto, module: nn.Module, x: torch.Tensor) -> None:
    (actual,) = runtime.run(runtime.make_session(proto, "cpu"), [x.numpy()])
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", sorted(LAYERS))
def test_each_factorized_conv_exports_as_its_chain(method, variant):
    torch.manual_seed(0)
    layer = LAYERS[variant]().eval()
    module = Holder(decomposer_for(method, layer)(layer, RankSpec(ratio=2)).module).eval()
    x = torch.randn(1, 16, *([12] * (layer.weight.dim() - 2)))
    proto = _export(module, x)
    _assert_parity(proto, module, x)
    chain = exporters.nodes_under(proto, "layer")
    assert len(chain) == len(proto.graph.node)  # every node belongs to the chain
    actual_method = module.layer.method
    assert all(n.name.startswith(f"layer/{actual_method}/") for n in chain)
    assert not exporters.foreign_ops(chain)
    counts = exporters.op_counts(proto)
    conv1d = isinstance(layer, nn.Conv1d)
    expected_convs = CONVS[actual_method] - (1 if conv1d and actual_method == "cp" else 0)
    assert counts.pop("Conv") == expected_convs
    padding = PADDING_OPS[layer.padding_mode]
    if padding is None:
        assert set(counts) == {"Slice", "Concat"}
    else:
        assert counts == padding


@pytest.mark.parametrize("method", ["svd", "tucker", "cp"])
def test_factorized_linear_is_two_matmuls_on_3d_activations(method):
    torch.manual_seed(0)
    layer = nn.Linear(48, 64)
    module = Holder(decomposer_for(method, layer)(layer, RankSpec(ratio=2)).module).eval()
    x = torch.randn(2, 7, 48)
    proto = _export(module, x)
    _assert_parity(proto, module, x)
    counts = exporters.op_counts(proto)
    assert counts.get("MatMul", 0) + counts.get("Gemm", 0) == 2 and "Einsum" not in counts
    assert not exporters.foreign_ops(exporters.nodes_under(proto, "layer"))


# --- models that are not in the zoo ------------------------------------------------------------


class ConvNet(nn.Module):
    """Grouped, dilated, strided and reflect-padded convs, with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise: stays dense
            nn.Conv2d(32, 48, 1), nn.ReLU(),
        )
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(8, 32, 5, padding="same"), nn.ReLU(),
                                  nn.Conv1d(32, 32, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
                                  nn.Conv1d(32, 64, 3, dilation=2, bias=False))
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.body(x).amax(2))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TinyMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)  # patches: 1x1 after the stride -> SVD for every method
        self.blocks = nn.Sequential(MixerBlock(16, 32), MixerBlock(16, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


NON_ZOO = {
    "convnet": (ConvNet, InputSpec((1, 3, 16, 16))),
    "conv1d": (Conv1dNet, InputSpec((1, 8, 32))),
    "mixer": (TinyMixer, InputSpec((1, 3, 16, 16))),
    "transformer": (lambda: create_model("text_classifier"), InputSpec((1, 16), "int64")),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(NON_ZOO))
def test_non_zoo_models_factorize_and_export_with_parity(method, name, tmp_path):
    torch.manual_seed(0)
    factory, spec = NON_ZOO[name]
    dense = factory().eval()
    exporters.fold_batchnorm_(dense)
    # embeddings belong to the TT issue (and a constant position table is folded away by onnxsim)
    factorized, report = factorize(dense, FactorizeConfig(method=method, ratio=2, exclude=("*embedding",)))
    assert report.factorized, [(r.name, r.reason) for r in report.layers]
    result = export_module(factorized, spec, tmp_path / "m.onnx", ExportConfig(tolerance=1e-4))
    assert result["parity"]["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert "Einsum" not in result["onnx"]["op_counts"]
    for record in report.factorized:
        chain = exporters.nodes_under(proto, record.name)
        assert chain and not exporters.foreign_ops(chain), (record.name, {n.op_type for n in chain})
    dense_records = {r.name: r.reason for r in report.layers if r.method == "dense"}
    if name == "convnet":
        assert "depthwise" in dense_records["features.7"]
        assert any("per group" in n for r in report.factorized if r.name == "features.3" for n in r.notes)


@pytest.mark.parametrize("method", ["svd", "tucker", "cp"])
def test_resnet18_cifar_export_at_ratio_4(method, tmp_path):
    out = tmp_path / "r.onnx"
    report = export("resnet18_cifar", out, ExportConfig(), FactorizeConfig(method=method, ratio=4))
    totals = report["totals"]
    assert totals["dense_layers"] == 0
    assert totals["params_before_factorized"] / totals["params_after_factorized"] >= 3.5
    assert report["parity"]["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(out))
    assert "Einsum" not in exporters.op_counts(proto)
    for layer in report["layers"]:
        chain = exporters.nodes_under(proto, layer["name"])
        assert not exporters.foreign_ops(chain)
        ops = exporters.op_counts(onnx.helper.make_model(onnx.helper.make_graph(chain, "g", [], [])))
        expected = {"Conv": CONVS[layer["method"]]} if layer["type"] == "Conv2d" else None
        if expected:
            assert ops == expected, (layer["name"], ops)
