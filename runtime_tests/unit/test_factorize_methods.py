"""svd, svd-spatial, tucker and cp on single layers: exactness at full rank, error vs rank, the
chain's structure, rank choice, and the layers that stay dense (with the reason)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompress.factorize import FactorizeConfig, RankSpec, SkipLayer, factorize, relative_error
from edgecompress.factorize import cp as cp_module
from edgecompress.factorize.registry import decomposer_for

RTOL, ATOL = 1e-4, 1e-5
EXACT_METHODS = ("svd", "svd-spatial", "tucker")  # exact at full rank; cp is not (ALS)


def conv_variants():
    """Every conv variant the issue lists: stride, padding (ints, per-axis, 'same', 'valid'),
    dilation, no bias, groups, non-zero padding modes, 1x1, Conv1d."""
    return {
        "plain": nn.Conv2d(8, 12, 3, padding=1),
        "stride-dilation-nobias": nn.Conv2d(8, 12, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
        "same-even": nn.Conv2d(8, 12, 4, padding="same", dilation=2),
        "valid": nn.Conv2d(8, 12, 3, padding="valid"),
        "groups": nn.Conv2d(8, 12, 3, padding=1, groups=2),
        "reflect": nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect"),
        "replicate-same": nn.Conv2d(8, 12, (3, 5), padding="same", padding_mode="replicate"),
        "circular": nn.Conv2d(8, 12, 3, padding=(2, 1), padding_mode="circular"),
        "pointwise-stride": nn.Conv2d(8, 12, 1, stride=2),
        "conv1d": nn.Conv1d(8, 12, 5, padding=2),
        "conv1d-same-circular": nn.Conv1d(8, 12, 4, padding="same", padding_mode="circular", bias=False),
        "conv1d-groups-stride": nn.Conv1d(8, 16, 3, stride=2, groups=4),
    }


def _input(layer: nn.Module, seed: int = 0) -> torch.Tensor:
    spatial = layer.weight.dim() - 2
    return torch.randn(2, layer.in_channels, *([11] * spatial), generator=torch.Generator().manual_seed(seed))


def _decompose(method: str, layer: nn.Module, spec: RankSpec):
    decomposer = decomposer_for(method, layer)
    assert decomposer is not None, f"{method} has no decomposer for {type(layer).__name__}"
    return decomposer(layer, spec)


@pytest.mark.parametrize("method, variant", [(m, v) for m in EXACT_METHODS for v in sorted(conv_variants())
                                             if not (m == "svd-spatial" and v.startswith("conv1d"))])
def test_full_rank_reproduces_the_dense_conv(method, variant):
    torch.manual_seed(0)
    layer = conv_variants()[variant].eval()
    result = _decompose(method, layer, RankSpec(rank=10_000, multiple=1))
    x = _input(layer)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), layer(x), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(result.module.dense_weight(), layer.weight, rtol=RTOL, atol=ATOL)
    assert any("clamped" in n for n in result.notes)


@pytest.mark.parametrize("method", EXACT_METHODS + ("cp",))
def test_full_rank_reproduces_the_dense_linear_on_3d_activations(method):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    result = _decompose(method, layer, RankSpec(rank=24, multiple=1))
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), layer(x), rtol=RTOL, atol=ATOL)
    assert result.module.method == "svd"
    if method != "svd":
        assert any(f"{method} on a Linear is its truncated SVD" in n for n in result.notes)


@pytest.mark.parametrize("variant", sorted(conv_variants()))
def test_cp_chain_computes_its_weight_and_has_depthwise_steps(variant):
    torch.manual_seed(0)
    layer = conv_variants()[variant].eval()
    result = _decompose("cp", layer, RankSpec(rank=2, multiple=1))
    module = result.module
    reference = conv_variants()[variant].eval()
    reference.load_state_dict(layer.state_dict())
    reference.weight.data.copy_(module.dense_weight())
    x = _input(layer)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=RTOL, atol=ATOL)
    assert relative_error(layer.weight, module.dense_weight()) < 1.0  # better than nothing at rank 2
    if layer.kernel_size in ((1, 1), (1,)):
        assert module.method == "svd"
        return
    convs = module.convs()
    spatial = layer.weight.dim() - 2
    assert module.method == "cp" and len(convs) == 2 + spatial
    assert all(c.groups == c.in_channels == c.out_channels for c in convs[1:-1])  # depthwise steps


def _error(method: str, layer: nn.Module, rank: int) -> float:
    result = _decompose(method, layer, RankSpec(rank=rank, multiple=1))
    return relative_error(layer.weight, result.module.dense_weight())


layer_configs = st.fixed_dictionaries({
    "kind": st.sampled_from(["conv1d", "conv2d", "linear"]),
    "c_in": st.integers(2, 10), "c_out": st.integers(2, 10), "groups": st.sampled_from([1, 2]),
    "k": st.integers(1, 4), "k2": st.integers(1, 4), "stride": st.integers(1, 2), "dilation": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, "same", "valid"]), "bias": st.booleans(),
    "mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]), "seed": st.integers(0, 1000),
})


def _build(cfg) -> nn.Module:
    torch.manual_seed(cfg["seed"])
    if cfg["kind"] == "linear":
        return nn.Linear(cfg["c_in"] * 2, cfg["c_out"] * 2, bias=cfg["bias"])
    c_in, c_out, groups = cfg["c_in"] * cfg["groups"], cfg["c_out"] * cfg["groups"], cfg["groups"]
    stride = 1 if cfg["padding"] == "same" else cfg["stride"]
    kernel = cfg["k"] if cfg["kind"] == "conv1d" else (cfg["k"], cfg["k2"])
    conv = nn.Conv1d if cfg["kind"] == "conv1d" else nn.Conv2d
    return conv(c_in, c_out, kernel, stride=stride, padding=cfg["padding"], dilation=cfg["dilation"],
                groups=groups, bias=cfg["bias"], padding_mode=cfg["mode"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=layer_configs, method=st.sampled_from(EXACT_METHODS))
def test_error_does_not_grow_with_rank_and_the_chain_matches_its_weight(cfg, method):
    layer = _build(cfg).eval()
    if method == "svd-spatial" and not isinstance(layer, nn.Conv2d):
        method = "svd"
    full = _decompose(method, layer, RankSpec(rank=10_000, multiple=1)).module
    max_rank = max(full.ranks())
    errors = [_error(method, layer, r) for r in range(1, max_rank + 1)]
    assert errors[-1] < 1e-5
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    # the exported chain computes what dense_weight says (padding, stride, dilation, groups included)
    half = _decompose(method, layer, RankSpec(rank=max(1, max_rank // 2), multiple=1)).module
    reference = _build(cfg).eval()
    reference.weight.data.copy_(half.dense_weight())
    x = _input(layer, cfg["seed"]) if not isinstance(layer, nn.Linear) else torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(half(x), reference(x), rtol=RTOL, atol=ATOL)


def test_grouped_conv_is_factorized_per_group_and_depthwise_stays_dense():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, groups=4), nn.Conv2d(16, 16, 3, groups=16))
    _, report = factorize(model, FactorizeConfig(method="tucker", rank=2, rank_multiple=1))
    grouped, depthwise = report.layers
    assert grouped.method == "tucker" and grouped.ranks == [2, 2]
    assert "factorized per group (4 groups)" in grouped.notes
    assert depthwise.method == "dense" and "depthwise" in depthwise.reason


def _net_with_a_small_head() -> nn.Module:
    # the head (1024 -> 16: 16400 parameters) holds 4.0% of the layers' 406k
    return nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 64, 3, padding=1), nn.Conv2d(64, 512, 1), nn.AdaptiveAvgPool2d(2), nn.Conv2d(512, 256, 1),
                         nn.Flatten(), nn.Linear(1024, 16))


def test_the_output_layer_stays_dense_while_it_holds_a_small_share_unless_named():
    model = _net_with_a_small_head()
    config = FactorizeConfig(method="svd", ratio=4, head_share=0.05)
    _, report = factorize(model, config)
    head = report.layers[-1]
    assert head.name == "9" and head.method == "dense"
    assert head.reason.startswith("the output layer (") and "--head-share" in head.reason, head.reason
    assert all(r.method == "svd" for r in report.layers[1:-1])
    for named in (FactorizeConfig(method="svd", ratio=4, head_share=0.05, include=("*",)),
                  FactorizeConfig(method="svd", ratio=4, head_share=0.05, overrides=(("9", {"ratio": 2.0}),)),
                  FactorizeConfig(method="svd", ratio=4, head_share=0.0),
                  FactorizeConfig(method="svd", ratio=4, head_share=0.01)):  # it holds more than 1%
        assert factorize(model, named)[1].layers[-1].method == "svd", named
    # excluding the head does not make the layer before it the output layer
    _, report = factorize(model, FactorizeConfig(method="svd", ratio=4, head_share=0.05, exclude=("9",)))
    assert report.layers[-1].name == "7" and report.layers[-1].method == "svd"


def test_no_saving_leaves_the_layer_dense_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    for method in ("svd", "svd-spatial", "tucker", "cp"):
        _, report = factorize(model, FactorizeConfig(method=method, ratio=9))
        assert [r.method for r in report.layers] == ["dense", "dense"]
        assert all(r.reason.startswith("no ") and "save" in r.reason for r in report.layers), [r.reason for r in report.layers]


@pytest.mark.parametrize("method", ["svd", "svd-spatial", "tucker", "cp"])
def test_ratio_is_met_and_ranks_are_multiples(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 96, 3, padding=1), nn.Conv1d(64, 64, 3))
    _, report = factorize(model, FactorizeConfig(method=method, ratio=4, include=("0",)))
    record = report.layers[0]
    assert record.method == method
    assert record.params_before / record.params_after >= 4
    # on the rank block, unless rounding down to it would drop more than a fifth of the rank
    assert all(r % 8 == 0 or r % 8 > 0.2 * r for r in record.ranks), record.ranks


def test_tucker_ranks_split_the_budget_where_the_weight_keeps_most_and_follow_the_energy_per_mode():
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 128, 3)
    low_rank_out = torch.einsum("or,rihw->oihw", torch.randn(128, 8), torch.randn(8, 32, 3, 3))
    layer.weight.data.copy_(low_rank_out)
    result = _decompose("tucker", layer, RankSpec(ratio=4))
    # proportional ranks ([40, 8]) would cut the inputs; the output mode holds 8 directions, the inputs all 32
    assert result.module.ranks() == [8, 32]
    assert result.details["tucker_error"] < 1e-6
    assert any("instead of the proportional [40, 8]" in note for note in result.notes), result.notes
    layer = nn.Conv2d(32, 128, 3)
    low = _decompose("tucker", layer, RankSpec(energy=0.5, multiple=1)).module.ranks()
    high = _decompose("tucker", layer, RankSpec(energy=0.95, multiple=1)).module.ranks()
    assert all(a < b for a, b in zip(low, high))
    assert _decompose("tucker", layer, RankSpec(energy=1.0, multiple=1)).module.ranks() == [128, 32]


def test_cp_recovers_a_low_rank_kernel_as_well_as_tensorly():
    import tensorly as tl
    from tensorly.decomposition import parafac

    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(n, 4, generator=gen) for n in (10, 8, 3, 3)]
    t = torch.einsum("or,ir,hr,wr->oihw", *factors)
    t = t + 1e-3 * t.norm() / math.sqrt(t.numel()) * torch.randn(t.shape, generator=gen)
    ours = cp_module.cp_als(t, 4, max_iterations=200, tolerance=1e-9)
    with tl.backend_context("numpy"):  # tltorch, imported by other tests, switches the global backend to pytorch
        cp_tl = parafac(t.double().numpy(), 4, init="svd", normalize_factors=True, n_iter_max=200, tol=1e-10)
        theirs = float(np.linalg.norm(cp_tl.to_tensor() - t.double().numpy()) / np.linalg.norm(t.double().numpy()))
    assert ours.error < 5e-3
    assert ours.error <= theirs * 1.05 + 1e-6
    torch.testing.assert_close(ours.rebuild(), t, atol=1e-2 * float(t.abs().max()), rtol=0)


def test_cp_divergence_is_detected_retried_and_reported(monkeypatch):
    real = cp_module.cp_als

    def flaky(t, rank, init="svd", seed=0, **kw):
        result = real(t, rank, init, seed, **kw)
        if init == "svd":
            result.factors[0] = result.factors[0] * float("nan")
            result.error = float("nan")
        return result

    monkeypatch.setattr(cp_module, "cp_als", flaky)
    result = _decompose("cp", nn.Conv2d(8, 8, 3), RankSpec(rank=8, multiple=1))
    assert any("svd start" in n and "non-finite" in n for n in result.notes)
    assert result.module.ranks() == [8] and math.isfinite(relative_error(result.module.dense_weight(), result.module.dense_weight()))


def test_cp_falls_back_to_half_rank_then_dense(monkeypatch):
    real = cp_module.cp_als

    def diverges_at_16(t, rank, init="svd", seed=0, **kw):
        result = real(t, rank, init, seed, **kw)
        if rank == 16:
            result.error = 2.0
        return result

    monkeypatch.setattr(cp_module, "cp_als", diverges_at_16)
    result = _decompose("cp", nn.Conv2d(16, 16, 3), RankSpec(rank=16, multiple=8))
    assert result.module.ranks() == [8] and "falling back to rank 8" in result.notes

    monkeypatch.setattr(cp_module, "diagnose", lambda result, norm: "diverged (test)")
    with pytest.raises(SkipLayer, match="diverged"):
        _decompose("cp", nn.Conv2d(16, 16, 3), RankSpec(rank=16, multiple=8))


def test_svd_of_a_wide_matrix_is_optimal_and_balanced():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(300, 40, generator=gen) @ torch.randn(40, 700, generator=gen) + 0.1 * torch.randn(300, 700, generator=gen)
    layer = nn.Linear(700, 300)
    layer.weight.data.copy_(matrix)
    module = _decompose("svd", layer, RankSpec(rank=40, multiple=1)).module
    s = torch.linalg.svdvals(matrix.double())
    optimal = float(s[40:].norm() / s.norm())
    assert relative_error(matrix, module.dense_weight()) == pytest.approx(optimal, rel=1e-4)
    # sqrt(s) in each factor: the two factors' row/column norms agree
    torch.testing.assert_close(module.first.weight.norm(dim=1), module.second.weight.norm(dim=0), rtol=1e-4, atol=1e-6)


def test_torch_transformer_layers_are_left_dense_with_the_reason():
    from edgecompress.factorize import FactorizeConfig, factorize

    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    model, report = factorize(layer, FactorizeConfig(method="svd", ratio=2, rank_multiple=1))
    records = {r.name: r for r in report.layers}
    assert records["self_attn.out_proj"].method == "dense"
    assert "MultiheadAttention" in records["self_attn.out_proj"].reason
    assert records["linear1"].method == "dense" and "TransformerEncoderLayer" in records["linear1"].reason
    torch.testing.assert_close(model(x), layer(x))


@pytest.mark.parametrize("conv", [nn.Conv2d(128, 16, (9, 1), stride=(2, 1), padding=(4, 0), dilation=(1, 1)),
                                  nn.Conv1d(96, 8, 7, padding=6, dilation=2),
                                  nn.Conv2d(64, 8, 3, groups=2, padding=1, padding_mode="reflect")])
def test_channel_svd_takes_the_input_side_of_a_conv_that_narrows_its_channels(conv):
    """A conv with few outputs keeps at most O directions on the output side (conv k, then 1x1): at the same
    parameters the input side (1x1, then conv k) keeps more, and svd takes it, exactly as its chain says."""
    from edgecompress.factorize.layers import InputSVDConv

    torch.manual_seed(0)
    result = _decompose("svd", conv, RankSpec(ratio=2))
    chain = result.module
    assert isinstance(chain, InputSVDConv) and chain.method == "svd"
    assert sum(p.numel() for p in chain.parameters()) <= sum(p.numel() for p in conv.parameters()) / 2
    steps = chain.convs()
    assert [s.kernel_size for s in steps] == [(1,) * len(conv.kernel_size), conv.kernel_size]
    assert steps[1].stride == conv.stride and steps[1].dilation == conv.dilation
    note = next(n for n in result.notes if "side channel SVD" in n)
    assert note.startswith("input-side") and "against" in note
    x = torch.randn(2, conv.in_channels, *([24] * len(conv.kernel_size)))
    with torch.no_grad():
        exact = conv._conv_forward(x, chain.dense_weight().reshape(conv.weight.shape), conv.bias)
        torch.testing.assert_close(chain(x), exact, atol=1e-4, rtol=1e-4)
        assert relative_error(conv(x), chain(x)) < 1
