"""``svd`` for Embedding: a thin table ``[V, r]`` (one Gather) followed by a projection ``r -> D`` (one MatMul).

The same truncated SVD as for Linear (``svd.truncated_svd``, singular values split evenly between the
two factors). The layer keeps ``num_embeddings``, which ``loading.sample_inputs`` reads to draw token ids.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgecompress.capture.stats import LayerStats
from edgecompress.factorize.base import FactorizedLayer, SkipLayer
from edgecompress.factorize.ranks import RankSpec
from edgecompress.factorize.registry import Decomposition, register
from edgecompress.factorize.svd import truncated_svd


class LowRankEmbedding(FactorizedLayer):
    """``E ~ A B``: Gather rows of ``A [V, r]``, then MatMul with ``B [r, D]``."""

    method = "svd"

    def __init__(self, table: nn.Embedding, projection: nn.Linear):
        super().__init__()
        self.table, self.projection = table, projection

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.table(ids))

    def dense_weight(self) -> torch.Tensor:
        return self.table.weight @ self.projection.weight.t()

    def ranks(self) -> list[int]:
        return [self.table.embedding_dim]


@register("svd", nn.Embedding)
def svd_embedding(layer: nn.Embedding, spec: RankSpec, stats: LayerStats | None = None) -> Decomposition:
    """With data each row counts as often as its id was looked up (``E^T diag(p) E``, the output covariance),
    plus ``damping`` spread over all ids, so that ids the calibration data never used still count."""
    if layer.max_norm is not None:
        raise SkipLayer("Embedding with max_norm renormalises rows at lookup: svd leaves it dense")
    if stats is not None and stats.tokens is not None:
        table = layer.weight.detach().double()
        p = stats.tokens / stats.tokens.sum().clamp_min(1) + stats.damping / len(stats.tokens)
        gram = (table.T * p) @ table
        left, right, notes = truncated_svd(table.T, spec, {"output_gram": gram[None]})  # E^T ~ left @ right
        a, b = right.T, left.T
    else:
        a, b, notes = truncated_svd(layer.weight, spec)
    rank = a.shape[1]
    table = nn.Embedding(layer.num_embeddings, rank)
    projection = nn.Linear(rank, layer.embedding_dim, bias=False)
    table.weight.data.copy_(a)
    projection.weight.data.copy_(b.t())
    if layer.padding_idx is not None:
        notes = [*notes, f"padding_idx {layer.padding_idx}: its row is approximated like the others"]
    return Decomposition(LowRankEmbedding(table, projection), notes)
