"""TT family (tt, tt-naive, svd on Embedding): exactness at full rank, truncation, ranks, modes, MACs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecompress.factorize import FactorizeConfig, RankSpec, SkipLayer, factorize, relative_error
from edgecompress.factorize.embedding import svd_embedding
from edgecompress.factorize.tt import tt_conv, tt_embedding, tt_linear, tt_naive_conv
from edgecompress.factorize.tt_svd import balanced_factors, mode_shape, tt_full, tt_svd
from edgecompress.stats import count_macs, count_params

FULL = RankSpec(rank=10**6, multiple=1)
few = settings(max_examples=6, deadline=None)


def _close(module, layer, x):
    with torch.no_grad():
        torch.testing.assert_close(module(x), layer(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.dense_weight(), layer.weight, rtol=1e-4, atol=1e-5)


@few
@given(st.integers(2, 40), st.integers(2, 40), st.booleans(), st.booleans(), st.integers(0, 1000))
def test_tt_linear_full_rank_is_exact(n_in, n_out, bias, tokens, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    module = tt_linear(layer, FULL).module
    _close(module, layer, torch.randn(2, 3, n_in) if tokens else torch.randn(4, n_in))


@few
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 2, 3]), st.integers(1, 2), st.integers(0, 1),
       st.integers(1, 2), st.sampled_from([None, True, False]), st.integers(0, 1000))
def test_tt_conv2d_full_rank_is_exact(c_in, c_out, kernel, stride, padding, dilation, first, seed):
    torch.manual_seed(seed)
    layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation)
    module = tt_conv(layer, FULL, spatial_first=first).module
    _close(module, layer, torch.randn(2, c_in, 9, 8))


@few
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(1, 2), st.booleans(), st.integers(0, 1000))
def test_tt_conv1d_full_rank_is_exact(c_in, c_out, kernel, stride, first, seed):
    torch.manual_seed(seed)
    layer = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
    module = tt_conv(layer, FULL, spatial_first=first).module
    _close(module, layer, torch.randn(2, c_in, 11))


@few
@given(st.integers(2, 12), st.integers(2, 12), st.sampled_from([(3, 3), (3, 1), (2, 4)]), st.integers(1, 2), st.integers(0, 1000))
def test_tt_naive_full_rank_is_exact(c_in, c_out, kernel, stride, seed):
    torch.manual_seed(seed)
    layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1)
    module = tt_naive_conv(layer, FULL).module
    assert module.method == "tt-naive"
    _close(module, layer, torch.randn(2, c_in, 9, 8))
    conv1d = nn.Conv1d(c_in, c_out, 3, stride=stride)
    _close(tt_naive_conv(conv1d, FULL).module, conv1d, torch.randn(2, c_in, 10))


@few
@given(st.integers(2, 300), st.integers(2, 40), st.integers(0, 1000))
def test_tt_and_svd_embedding_full_rank_are_exact(vocab, dim, seed):
    torch.manual_seed(seed)
    layer = nn.Embedding(vocab, dim)
    ids = torch.randint(0, vocab, (3, 7))
    for decompose in (tt_embedding, svd_embedding):
        module = decompose(layer, FULL).module
        assert module.num_embeddings == vocab
        _close(module, layer, ids)
        assert module.dense_weight().shape == (vocab, dim)


@few
@given(st.sampled_from(["linear", "conv", "embedding", "naive"]), st.integers(0, 1000))
def test_truncated_error_does_not_grow_with_rank(kind, seed):
    torch.manual_seed(seed)
    layer, decompose = {"linear": (nn.Linear(64, 48), tt_linear), "conv": (nn.Conv2d(16, 24, 3), tt_conv),
                        "embedding": (nn.Embedding(200, 24), tt_embedding),
                        "naive": (nn.Conv2d(16, 24, 3), tt_naive_conv)}[kind]
    errors = [relative_error(layer.weight, decompose(layer, RankSpec(rank=r, multiple=1)).module.dense_weight())
              for r in (1, 2, 4, 8, 16, 64)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("ratio", [2, 5, 50])
def test_ratio_is_met_and_rounded_down(ratio):
    torch.manual_seed(0)
    layer = nn.Linear(512, 384)
    result = tt_linear(layer, RankSpec(ratio=ratio, multiple=8))
    cores = sum(p.numel() for p in result.module.cores)
    assert cores <= layer.weight.numel() / ratio
    max_rank = result.details["max_rank"]
    assert max_rank < 8 or max_rank % 8 == 0  # a ratio rank rounds down to the multiple
    assert max(result.module.ranks()) <= max_rank
    assert result.details["tt_ranks"][0] == result.details["tt_ranks"][-1] == 1
    assert result.details["in_modes"] and result.details["out_modes"]


def test_rank_rounds_up_and_energy_truncates_per_step():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    assert max(tt_linear(layer, RankSpec(rank=5, multiple=8), d=3).module.ranks()) == 8
    full = tt_linear(layer, RankSpec(energy=1.0, multiple=1), d=3).module
    part = tt_linear(layer, RankSpec(energy=0.5, multiple=1), d=3).module
    assert all(p <= f for p, f in zip(part.ranks(), full.ranks())) and part.ranks() != full.ranks()
    assert relative_error(layer.weight, full.dense_weight()) < 1e-5


def test_modes_are_balanced_and_primes_padded():
    assert balanced_factors(16, 3) == (2, 2, 4)
    assert mode_shape(8192, 5) == ((4, 4, 8, 8, 8), 8192)
    assert mode_shape(1536, 4) == ((4, 6, 8, 8), 1536)
    modes, size = mode_shape(1009, 4)  # a prime
    assert size > 1009 and max(modes) <= 8 and math.prod(modes) == size
    torch.manual_seed(0)
    layer = nn.Linear(13, 11)
    result = tt_linear(layer, FULL)
    assert any("padded 13 -> 14" in n for n in result.notes) and any("padded 11 -> 12" in n for n in result.notes)
    _close(result.module, layer, torch.randn(3, 13))


def test_tt_svd_cores_reconstruct():
    torch.manual_seed(0)
    t = torch.randn(4, 6, 5, 3).double()
    cores = tt_svd(t, [4, 6, 5, 3])
    assert [c.shape[-1] for c in cores] == [4, 15, 3, 1]
    torch.testing.assert_close(tt_full(cores).reshape(t.shape), t)


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(96, 80), torch.randn(3, 96)),
    (nn.Conv2d(16, 32, 3, padding=1), torch.randn(1, 16, 8, 8)),
    (nn.Conv1d(24, 12, 3, padding=1), torch.randn(2, 24, 10)),
])
def test_analytic_macs_match_the_flop_counter(layer, x):
    result = (tt_linear if isinstance(layer, nn.Linear) else tt_conv)(layer, RankSpec(ratio=3, multiple=1))
    macs = count_macs(result.module, [x])[0]
    if isinstance(layer, nn.Linear):
        assert macs == result.details["macs_per_row"] * x.shape[0]
    elif result.details["spatial_first"]:
        positions = math.prod(layer(x).shape[2:]) * x.shape[0]
        assert macs == result.details["macs_per_position"] * positions


def test_macs_note_when_tt_needs_more_than_dense():
    result = tt_linear(nn.Linear(256, 256), RankSpec(ratio=2, multiple=1), d=3)
    assert result.details["macs_per_row"] > 256 * 256
    assert any("TT is for size, not speed" in n for n in result.notes)


def test_grouped_and_padded_mode_convs_stay_dense():
    with pytest.raises(SkipLayer, match="groups=4"):
        tt_conv(nn.Conv2d(8, 8, 3, groups=4), RankSpec(ratio=2))
    with pytest.raises(SkipLayer, match="padding_mode"):
        tt_conv(nn.Conv2d(8, 8, 3, padding_mode="reflect"), RankSpec(ratio=2))
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3))
    _, report = factorize(model, FactorizeConfig(method="tt", ratio=2, rank_multiple=1))
    assert report.layers[0].method == "dense" and "groups=8" in report.layers[0].reason
    assert report.layers[1].method == "tt" and report.layers[1].details["variant"] == "tt-conv"


def test_report_holds_ranks_modes_and_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 96))
    new, report = factorize(model, FactorizeConfig(method="tt", ratio=4, rank_multiple=1))
    emb, lin = report.layers
    assert emb.method == lin.method == "tt"
    assert emb.details["vocab_modes"] and emb.details["dim_modes"] and emb.ranks == emb.details["tt_ranks"][1:-1]
    assert lin.details["in_modes"] and lin.ranks == lin.details["tt_ranks"][1:-1]
    assert emb.compression >= 4 and lin.compression >= 4
    assert count_params(new) == emb.params_after + lin.params_after
    assert new[0].num_embeddings == 1000


@pytest.mark.parametrize("layer,x,first", [
    (nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.randn(3, 32, 16, 16), True),
    (nn.Conv2d(64, 32, 3, padding=1), torch.randn(3, 64, 16, 16), False),
    (nn.Conv1d(48, 48, 9, padding=4), torch.randn(3, 48, 40), True),
    (nn.Linear(256, 512), torch.randn(64, 256), None),
])
def test_a_chain_fitted_in_torch_runs_through_its_dense_weight_with_the_same_outputs_and_gradients(layer, x, first):
    from edgecompress.factorize.base import in_torch_only

    torch.manual_seed(0)
    spec = RankSpec(ratio=4, multiple=1)
    module = tt_linear(layer, spec).module if first is None else tt_conv(layer, spec, spatial_first=first).module
    runs = []
    for cheaper in (False, True):
        module.zero_grad()
        if cheaper:
            with in_torch_only():
                assert module._through_dense(1, 1, 0) and (first is None or module._cheaper_dense(x))
                y = module(x)
        else:
            y = module(x)
        y.pow(2).sum().backward()
        runs.append((y.detach(), [p.grad.clone() for p in module.parameters()]))
    (y_chain, g_chain), (y_dense, g_dense) = runs
    torch.testing.assert_close(y_dense, y_chain, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_dense, g_chain):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    assert not module._through_dense(1e9, 1e9, 1)  # outside the block, as when exporting: the chain itself
