"""The Tensor-Train layers: TT-matrix Linear, TT-conv (and the naive 4-D TT conv), TT-embedding.

Every forward is a chain of Reshape / Transpose / MatMul (one MatMul per TT core), a Conv for the
spatial core, Gather for embeddings and for dropping padded outputs, Div/Mod on token ids, Add for
the bias. Shapes other than the batch are baked in as Python ints so that a dynamic-batch export
needs no Shape nodes.

The chain (``_TTChain._chain``) works on a 2-D state whose columns are, innermost first, the incoming
rank and the input modes still to contract, least significant first (``a_1`` is the least significant
digit of the input index). Core ``k`` is stored ready for MatMul as ``[(a_k r_{k-1}), (r_k b_k)]``;
after each product the new output mode ``b_k`` is moved to the front with a 2-D transpose, so the
output modes pile up most significant first and the final state is ``[out, rows (, r_d)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from edgecompress.factorize.base import IN_TORCH_ONLY, FactorizedLayer
from edgecompress.factorize.tt_svd import deinterleave, tt_full


class _IndexDiv(torch.autograd.Function):
    """``ids // d`` for non-negative int64 ids, exported as one ONNX ``Div`` (torch's own export of
    integer division adds Casts or a floor fix-up of eight nodes)."""

    @staticmethod
    def forward(ctx, ids, divisor):
        return torch.div(ids, divisor, rounding_mode="floor")

    @staticmethod
    def symbolic(g, ids, divisor):
        return g.op("Div", ids, divisor)


def to_chain(core: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """A TT-SVD core ``[r, a*b, r']`` -> the MatMul layout ``[(a r), (r' b)]``."""
    r, _, r2 = core.shape
    return core.reshape(r, a, b, r2).permute(1, 0, 3, 2).reshape(a * r, r2 * b)


def chain_macs(in_modes, out_modes, chain_ranks) -> int:
    """MACs of the MatMul chain per input row (one row of the 2-D state before padding)."""
    total = 0
    for k in range(len(in_modes)):
        total += math.prod(out_modes[: k + 1]) * math.prod(in_modes[k:]) * chain_ranks[k] * chain_ranks[k + 1]
    return total


def from_chain(matrix: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The MatMul layout ``[(a r), (r' b)]`` -> core ``[r, a, b, r']``."""
    r, r2 = matrix.shape[0] // a, matrix.shape[1] // b
    return matrix.reshape(a, r, r2, b).permute(1, 0, 3, 2)


class _TTChain(FactorizedLayer):
    """Shared part of the TT-matrix and TT-conv layers: the cores, padding and the MatMul chain."""

    method = "tt"

    def __init__(self, cores: Sequence[torch.Tensor], in_modes: Sequence[int], out_modes: Sequence[int],
                 chain_ranks: Sequence[int], in_size: int, out_size: int):
        super().__init__()
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.chain_ranks = tuple(chain_ranks)  # r_0 .. r_d of the chain
        self.in_size, self.out_size = in_size, out_size
        self.cores = nn.ParameterList(nn.Parameter(c.float().contiguous()) for c in cores)
        in_pad, out_pad = math.prod(in_modes) - in_size, math.prod(out_modes) - out_size
        if in_pad:  # zero columns appended as Gather(first column) @ zeros: valid with a dynamic batch
            self.register_buffer("pad_index", torch.zeros(1, dtype=torch.long))
            self.register_buffer("pad_zeros", torch.zeros(1, in_pad * chain_ranks[0]))
        if out_pad:
            self.register_buffer("keep_index", torch.arange(out_size))

    def _chain(self, z: torch.Tensor) -> torch.Tensor:
        """``z [rows, in_size * r_0]`` -> ``[out_size, rows * r_d]``."""
        if hasattr(self, "pad_index"):
            z = torch.cat([z, torch.matmul(z.index_select(1, self.pad_index), self.pad_zeros)], dim=1)
        for core, a, b, r in zip(self.cores, self.in_modes, self.out_modes, self.chain_ranks):
            z = torch.matmul(z.reshape(-1, a * r), core)
            z = z.reshape(-1, b).t()
        z = z.reshape(math.prod(self.out_modes), -1)
        return z.index_select(0, self.keep_index) if hasattr(self, "keep_index") else z

    def _through_dense(self, rows: float, chain_per_row: float, dense_per_row: float) -> bool:
        """Whether ``rows`` outputs are cheaper through the rebuilt dense weight (``IN_TORCH_ONLY``: fitting or
        measuring in torch, never while exporting): rebuilding costs about the weight times the largest rank."""
        if not IN_TORCH_ONLY.get():
            return False
        rebuild = dense_per_row * max(self.chain_ranks)
        return rows * dense_per_row + rebuild < rows * chain_per_row

    def core_tensors(self) -> list[torch.Tensor]:
        """Cores as ``[r_{k-1}, a_k, b_k, r_k]``."""
        return [from_chain(c, a, b) for c, a, b in zip(self.cores, self.in_modes, self.out_modes)]

    def _chain_matrix(self) -> torch.Tensor:
        """The chain as ``[out_size, in_size, r_0 * r_d]`` (the boundary ranks flattened last)."""
        full = tt_full(self.core_tensors())  # [r_0, a_1, b_1, ..., a_d, b_d, r_d]
        boundary = full.shape[0] * full.shape[-1]
        modes_last = full.movedim(0, -2)  # [a_1, ..., b_d, r_0, r_d]
        matrix = deinterleave(modes_last.reshape(*modes_last.shape[:-2], boundary), self.out_modes, self.in_modes)
        return matrix[: self.out_size, : self.in_size]


class TTLinear(_TTChain):
    """TT-matrix Linear (Novikov et al. 2015): ``d`` MatMuls, on any leading dimensions."""

    @property
    def in_features(self) -> int:
        return self.in_size

    @property
    def out_features(self) -> int:
        return self.out_size

    def __init__(self, cores, in_modes, out_modes, chain_ranks, in_features, out_features, bias=None):
        super().__init__(cores, in_modes, out_modes, chain_ranks, in_features, out_features)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.out_size * self.in_size
        if self._through_dense(x.numel() / self.in_size, chain_macs(self.in_modes, self.out_modes, self.chain_ranks), dense):
            return torch.nn.functional.linear(x, self.dense_weight(), self.bias)
        lead = [int(s) for s in x.shape[1:-1]]
        y = self._chain(x.reshape(-1, self.in_size)).t()
        if x.dim() == 1:
            y = y.reshape(self.out_size)
        elif lead:
            y = y.reshape(-1, *lead, self.out_size)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        return self._chain_matrix()[..., 0]

    def ranks(self) -> list[int]:
        return list(self.chain_ranks[1:-1])


class TTConv(_TTChain):
    """TT-conv (Garipov et al. 2016; seed 003 eq. (8)-(9)) for Conv1d/Conv2d.

    ``spatial_first``: every input channel is an image for ``spatial`` (Conv 1 -> r_0 with the
    original kernel, stride, padding, dilation), then the channel cores. Otherwise the channel cores
    run first, at the input resolution, and ``spatial`` (Conv r_d -> 1) comes last: cheaper when the
    layer reduces channels at stride 1."""

    def __init__(self, spatial: nn.Module, cores, in_modes, out_modes, chain_ranks, in_channels, out_channels,
                 bias=None, spatial_first: bool = True):
        super().__init__(cores, in_modes, out_modes, chain_ranks, in_channels, out_channels)
        self.spatial, self.spatial_first = spatial, spatial_first
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def in_channels(self) -> int:
        return self.in_size

    @property
    def out_channels(self) -> int:
        return self.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.in_size, self.out_size
        if self._cheaper_dense(x):
            return self.spatial._conv_forward(x, self.dense_weight(), self.bias)
        if self.spatial_first:
            r0 = self.chain_ranks[0]
            z = self.spatial(x.reshape(-1, 1, *[int(v) for v in x.shape[2:]]))  # [B*C, r_0, *out]
            out_sp = [int(v) for v in z.shape[2:]]
            p = math.prod(out_sp)
            z = z.reshape(-1, c, r0, p).permute(0, 3, 1, 2).reshape(-1, c * r0)
            y = self._chain(z).reshape(s, -1, p).transpose(0, 1).reshape(-1, s, *out_sp)
        else:
            rd, in_sp = self.chain_ranks[-1], [int(v) for v in x.shape[2:]]
            p = math.prod(in_sp)
            z = self._chain(x.reshape(-1, c, p).transpose(1, 2).reshape(-1, c))  # [S, B*P*r_d]
            z = z.reshape(s, -1, p, rd).permute(1, 0, 3, 2).reshape(-1, rd, *in_sp)
            z = self.spatial(z)
            y = z.reshape(-1, s, *[int(v) for v in z.shape[2:]])
        if self.bias is not None:
            y = y + self.bias.reshape(s, *([1] * (y.dim() - 2)))
        return y

    def _cheaper_dense(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the rebuilt dense weight, one Conv with the spatial core's stride,
        padding and dilation (``_through_dense``)."""
        if not isinstance(self.spatial, (nn.Conv1d, nn.Conv2d)):
            return False
        k, stride = math.prod(self.spatial.kernel_size), math.prod(self.spatial.stride)
        rows = x.numel() / self.in_size / stride  # output positions, about
        if self.spatial_first:
            chain = self.in_size * self.chain_ranks[0] * k + chain_macs(self.in_modes, self.out_modes, self.chain_ranks)
        else:
            chain = stride * chain_macs(self.in_modes, self.out_modes, self.chain_ranks) + self.out_size * self.chain_ranks[-1] * k
        return self._through_dense(rows, chain, self.out_size * self.in_size * k)

    def spatial_kernel(self) -> torch.Tensor:
        """The spatial core as ``[rank, *kernel]``."""
        w = self.spatial.weight
        return w[:, 0] if self.spatial_first else w[0]

    def dense_weight(self) -> torch.Tensor:
        kernel = self.spatial_kernel()
        chain = self._chain_matrix()  # [S, C, r_0 * r_d]: one of the boundary ranks is 1
        weight = torch.tensordot(chain, kernel.reshape(kernel.shape[0], -1), dims=([2], [0]))
        return weight.reshape(self.out_size, self.in_size, *kernel.shape[1:])

    def ranks(self) -> list[int]:
        return list(self.chain_ranks[:-1] if self.spatial_first else self.chain_ranks[1:])


class TTNaiveConv(TTConv):
    """The naive TT of the 4-D kernel (seed 003 eq. (7)), modes ``(kh, kw, C, S)``: Conv kh x 1 (1 -> r_1),
    Conv 1 x kw (r_1 -> r_2), then MatMul ``(C r_2) -> r_3`` and MatMul ``r_3 -> S`` (Conv1d: one Conv)."""

    method = "tt-naive"

    def spatial_kernel(self) -> torch.Tensor:
        if isinstance(self.spatial, nn.Sequential):  # Conv2d: [r1, 1, kh, 1] then [r2, r1, 1, kw]
            first, second = self.spatial[0].weight[:, 0, :, 0], self.spatial[1].weight[:, :, 0, :]
            return torch.einsum("pqy,qx->pxy", second, first)
        return self.spatial.weight[:, 0]

    def ranks(self) -> list[int]:
        spatial = [self.spatial[0].out_channels] if isinstance(self.spatial, nn.Sequential) else []
        return [*spatial, *self.chain_ranks[:-1]]


class TTEmbedding(FactorizedLayer):
    """TT-embedding (Hrinchuk et al. 2020): the id is split into digits by Div/Mod, each core's slice is
    gathered, and the slices are multiplied token by token (batched MatMul)."""

    method = "tt"

    def __init__(self, cores: Sequence[torch.Tensor], vocab_modes: Sequence[int], dim_modes: Sequence[int],
                 num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.vocab_modes, self.dim_modes = tuple(vocab_modes), tuple(dim_modes)  # most significant first
        self.tt_ranks = tuple([1] + [c.shape[-1] for c in cores])
        # core k as [v_k, r_{k-1} * d_k * r_k]: one Gather per core
        self.cores = nn.ParameterList(nn.Parameter(c.permute(1, 0, 2, 3).reshape(c.shape[1], -1).float().contiguous())
                                      for c in cores)
        strides = [math.prod(vocab_modes[k + 1:]) for k in range(len(vocab_modes))]
        for k, (stride, v) in enumerate(zip(strides, vocab_modes)):
            self.register_buffer(f"stride_{k}", torch.tensor(stride, dtype=torch.long))
            self.register_buffer(f"mode_{k}", torch.tensor(v, dtype=torch.long))
        if math.prod(dim_modes) > embedding_dim:
            self.register_buffer("keep_index", torch.arange(embedding_dim))

    def _digit(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        d = len(self.vocab_modes)
        digit = ids if k == d - 1 else _IndexDiv.apply(ids, getattr(self, f"stride_{k}"))
        return digit if k == 0 else torch.remainder(digit, getattr(self, f"mode_{k}"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        z = None
        for k, core in enumerate(self.cores):
            r, dk, r2 = self.tt_ranks[k], self.dim_modes[k], self.tt_ranks[k + 1]
            rows = core.index_select(0, self._digit(flat, k))
            if z is None:
                z = rows.reshape(-1, dk, r2)
            else:
                z = torch.matmul(z, rows.reshape(-1, r, dk * r2))
                z = z.reshape(-1, int(z.shape[1]) * dk, r2)
        z = z.reshape(-1, math.prod(self.dim_modes))
        if hasattr(self, "keep_index"):
            z = z.index_select(1, self.keep_index)
        return z.reshape(-1, *[int(v) for v in ids.shape[1:]], self.embedding_dim) if ids.dim() > 1 else z

    def core_tensors(self) -> list[torch.Tensor]:
        return [c.reshape(v, self.tt_ranks[k], self.dim_modes[k], self.tt_ranks[k + 1]).permute(1, 0, 2, 3)
                for k, (c, v) in enumerate(zip(self.cores, self.vocab_modes))]

    def dense_weight(self) -> torch.Tensor:
        d = len(self.vocab_modes)
        full = tt_full(self.core_tensors())[0, ..., 0]  # [v_1, d_1, ..., v_d, d_d]
        perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        table = full.permute(perm).reshape(math.prod(self.vocab_modes), math.prod(self.dim_modes))
        return table[: self.num_embeddings, : self.embedding_dim]

    def ranks(self) -> list[int]:
        return list(self.tt_ranks[1:-1])
