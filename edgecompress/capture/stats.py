"""Second moments of a layer's inputs and outputs on calibration data, streamed batch by batch.

What the data-aware decompositions need (``docs/factorize.md``, "Data-aware factorization"):
- ``channel``: the uncentred input covariance ``E[x x^T]`` over channels (a conv: over every pixel of every
  sample; a Linear: over every row), ``[I, I]``. Tucker-2 and CP whiten their input mode with it, spatial
  SVD whitens its vertical patches with ``channel (x) I_kh`` (taps taken as uncorrelated: the stated
  approximation).
- ``output``: ``E[y y^T]`` of the dense layer's output before the bias, ``[O, O]``. For channel SVD and a
  Linear that is exactly ``W C W^T`` with ``C`` the im2col covariance, without ever forming ``C`` (which for
  a 1024-channel conv with a 64-tap kernel would be 65536 x 65536).
  Where the layer is a Linear or a 1x1 conv with more outputs than inputs, ``dense_channel`` (the dense
  inputs' ``E[x x^T]``, ``[I, I]``) stands in for it: ``E[y y^T] = W dense_channel W^T`` exactly, and its
  eigenvectors come from an ``[I, I]`` problem (PP-OCRv4's 120 -> 6625 head: 133 s of ``eigh`` before).
- ``tokens``: how often each id was looked up, for an Embedding.
The inputs come from the compressed model where a capture gives them (the layer will see those), the
outputs from the dense model (what the layer must reproduce).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from edgecompress.capture.downstream import Downstream

MAX_OUTPUT_GRAM = 8192  # larger outputs (a vocabulary-sized head) keep the weight-only factors


@dataclasses.dataclass
class LayerInputs:
    """A layer's input batches: in the dense model and in the model compressed so far (``current``), for
    the fitting samples and for the held-out ones. In independent mode ``current`` is ``dense``."""

    dense: list[torch.Tensor]
    current: list[torch.Tensor]
    held_dense: list[torch.Tensor]
    held_current: list[torch.Tensor]
    targets: list[torch.Tensor] | None = None  # the dense layer's outputs on ``dense`` (see ``with_targets``)
    held_targets: list[torch.Tensor] | None = None
    downstream: Downstream | None = None  # what the layer's output goes through (``capture.downstream``)

    @property
    def samples(self) -> int:
        return sum(len(x) for x in self.dense)

    @torch.no_grad()
    def with_targets(self, layer: nn.Module) -> LayerInputs:
        """Compute the dense layer's outputs once: statistics, refit and errors all read them."""
        self.targets = [layer(x) for x in self.dense]
        self.held_targets = [layer(x) for x in self.held_dense]
        return self


@dataclasses.dataclass
class LayerStats:
    count: int  # vectors summed (pixels x samples, or rows)
    samples: int
    channel: torch.Tensor | None = None  # [I, I] float64, a mean
    output: torch.Tensor | None = None  # [O, O] float64, a mean
    tokens: torch.Tensor | None = None  # [V] float64 counts
    dense_channel: torch.Tensor | None = None  # [I, I] float64, a mean: in place of ``output`` (see above)
    damping: float = 0.01
    notes: list[str] = dataclasses.field(default_factory=list)

    def channel_damped(self) -> torch.Tensor:
        """``channel + damping * mean variance * I``: invertible however few the samples."""
        c = self.channel
        mu = float(c.diagonal().mean()) or 1.0
        return c + self.damping * mu * torch.eye(c.shape[0], dtype=c.dtype)

    def whitener(self, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, L^-1)`` per group, ``[g, i, i]`` each, with ``L L^T`` the damped channel covariance of that
        group's input channels (symmetric square root, from ``eigh``: stable where Cholesky is not)."""
        c = self.channel_damped()
        i = c.shape[0] // groups
        blocks = torch.stack([c[k * i:(k + 1) * i, k * i:(k + 1) * i] for k in range(groups)])
        values, vectors = torch.linalg.eigh(blocks)
        root = values.clamp_min(values.max(-1, keepdim=True).values * 1e-12).sqrt()
        return vectors * root[:, None, :] @ vectors.transpose(1, 2), vectors / root[:, None, :] @ vectors.transpose(1, 2)

    def output_root(self) -> torch.Tensor:
        """``R [1, i, i]`` with ``R R^T = dense_channel + damping * mean input variance * I``: the output
        covariance is ``(W R)(W R)^T``, what ``output_damped`` forms where ``output`` is kept."""
        mu = float(self.channel.diagonal().mean()) if self.channel is not None else 1.0
        c = self.dense_channel + self.damping * mu * torch.eye(self.dense_channel.shape[0], dtype=torch.float64)
        values, vectors = torch.linalg.eigh(c)
        return (vectors * values.clamp_min(0).sqrt()[None, :] @ vectors.T)[None]

    def output_damped(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Per group ``[g, o, o]``: ``E[y y^T] + damping * mean input variance * W W^T``, the output covariance
        under the damped input covariance (``W (C + d mu I) W^T``); ``weight`` as ``[g, o, n]``."""
        o = self.output.shape[0] // groups
        blocks = torch.stack([self.output[k * o:(k + 1) * o, k * o:(k + 1) * o] for k in range(groups)])
        mu = float(self.channel.diagonal().mean()) if self.channel is not None else 1.0
        w = weight.double()
        return blocks + self.damping * mu * (w @ w.transpose(1, 2))


def _rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """``[N, C, *spatial]`` -> ``[N * pixels, C]`` for a conv; ``[..., F]`` -> ``[rows, F]`` otherwise."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]) if conv else x.reshape(-1, x.shape[-1])


def _bias_free(layer: nn.Module, y: torch.Tensor, conv: bool) -> torch.Tensor:
    if layer.bias is None:
        return y
    return y - (layer.bias.reshape(-1, *([1] * (y.dim() - 2))) if conv else layer.bias)


def _factored_output(layer: nn.Module, conv: bool) -> bool:
    """Whether ``E[y y^T]`` is ``W E[x x^T] W^T`` over the layer's own input vectors and has more rows than
    they do (a Linear, or an unpadded ungrouped 1x1 conv, widening)."""
    if not conv:
        return layer.out_features > layer.in_features
    unpadded = layer.padding in ("valid", 0) or (not isinstance(layer.padding, str) and not any(layer.padding))
    return (all(k == 1 for k in layer.kernel_size) and layer.groups == 1 and unpadded
            and layer.padding_mode == "zeros" and layer.out_channels > layer.in_channels)


@torch.no_grad()
def layer_stats(layer: nn.Module, inputs: LayerInputs, damping: float = 0.01) -> LayerStats:
    """The statistics of ``layer`` (Conv1d/Conv2d, Linear or Embedding) over the fitting batches."""
    if isinstance(layer, nn.Embedding):
        tokens = torch.zeros(layer.num_embeddings, dtype=torch.float64)
        for ids in inputs.current:
            tokens += torch.bincount(ids.reshape(-1).clamp(0, layer.num_embeddings - 1),
                                     minlength=layer.num_embeddings).double()
        return LayerStats(int(tokens.sum()), inputs.samples, tokens=tokens, damping=damping)
    conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
    channel, output, dense_channel, count, out_count = None, None, None, 0, 0
    out_features = layer.out_channels if conv else layer.out_features
    factored = _factored_output(layer, conv)
    if factored:  # the dense inputs stand in for the dense outputs (see the module docstring)
        targets = inputs.dense
    else:
        targets = inputs.targets if inputs.targets is not None else [layer(x) for x in inputs.dense]
    for x_current, y_dense in zip(inputs.current, targets):
        rows = _rows(x_current, conv)
        product = (rows.T @ rows).double()  # float32 product of one batch, summed in float64
        channel = product if channel is None else channel.add_(product)
        count += len(rows)
        if factored:  # ``y_dense`` is the dense input here
            x = _rows(y_dense, conv)
            product = (x.T @ x).double()
            dense_channel = product if dense_channel is None else dense_channel.add_(product)
            out_count += len(x)
        elif out_features <= MAX_OUTPUT_GRAM:
            y = _rows(_bias_free(layer, y_dense, conv), conv)
            product = (y.T @ y).double()
            output = product if output is None else output.add_(product)
            out_count += len(y)
    stats = LayerStats(count, inputs.samples, channel / max(count, 1), None if output is None else output / max(out_count, 1),
                       damping=damping, dense_channel=None if dense_channel is None else dense_channel / max(out_count, 1))
    if output is None and dense_channel is None:
        stats.notes.append(f"{out_features} outputs: too many for an output covariance; the output side is weight-only")
    width = layer.in_channels * math.prod(layer.kernel_size) // layer.groups if conv else layer.in_features
    if count < width:
        stats.notes.append(f"{count} input vectors for a {width}-wide input: the covariance is rank-deficient, "
                           f"damped by {damping:g} of the mean variance (more calibration samples would help)")
    return stats
