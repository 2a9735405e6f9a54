"""torch -> ONNX: BatchNorm folding, the export itself, and readable node names.

Exporter choice (kept here, in ``_export``): the TorchScript-based exporter (``dynamo=False``).
In torch 2.13 it is deprecated but it is mature, exports our models in tens of milliseconds (the
dynamo exporter takes seconds per model and needs onnxscript), constant-folds eval BatchNorm, and
records each node's module scope, which ``name_nodes`` turns into ``module.path/method/k`` names.
Swapping exporters means changing ``_export`` alone; the parity check guards either choice.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence

import onnx
import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgecompress.errors import ExportError

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv into that Conv (in place).

    The graph is found by torch.fx; a model fx cannot trace is left as it is (the ONNX exporter still
    folds BatchNorm, but factorization then works on the unfolded conv). Returns how many were folded.
    """
    model.eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many kinds of errors on dynamic control flow
        log.warning("BatchNorm not folded before factorizing: torch.fx cannot trace the model (%s)", exc)
        return 0
    calls = defaultdict(int)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _BNS):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if not isinstance(conv, _CONVS) or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        model.set_submodule(src.target, fuse_conv_bn_eval(conv, bn))
        model.set_submodule(node.target, nn.Identity())
        folded += 1
    return folded


def export_onnx(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    opset: int = 17,
    dynamic_batch: bool = False,
    input_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) on example ``inputs``; nodes named after their modules."""
    model.eval()
    input_names = list(input_names or _default_input_names(inputs))
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "output"]} if dynamic_batch else None
    proto = _export(model, tuple(inputs), opset, input_names, dynamic_axes)
    name_nodes(proto, model)
    return proto


def _default_input_names(inputs: Sequence[torch.Tensor]) -> list[str]:
    base = "input_ids" if inputs and not inputs[0].is_floating_point() else "input"
    return [base] if len(inputs) == 1 else [f"{base}_{i}" for i in range(len(inputs))]


def _export(model, inputs, opset, input_names, dynamic_axes) -> onnx.ModelProto:
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, inputs, buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=input_names, output_names=["output"], dynamic_axes=dynamic_axes,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return onnx.load_from_string(buffer.getvalue())


def name_nodes(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Rename nodes to ``module.path/Op``, and nodes inside a factorized layer to
    ``module.path/method/k`` (k counts that layer's nodes in graph order)."""
    from edgecompress.factorize.base import FactorizedLayer

    paths = {name for name, _ in model.named_modules() if name}
    methods = {name: m.method for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    counters: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        path = _module_path(node.name, paths)
        owner = next((p for p in _ancestors(path) if p in methods), None)
        if owner is not None:
            new = f"{owner}/{methods[owner]}/{counters[owner]}"
            counters[owner] += 1
        else:
            base = f"{path}/{node.op_type}" if path else node.op_type
            new = base if counters[base] == 0 else f"{base}_{counters[base]}"
            counters[base] += 1
        node.name = new


def _module_path(node_name: str, paths: set[str]) -> str:
    # TorchScript scope names look like "/layer2/layer2.0/downsample/downsample.0/Conv": each part is a
    # module name qualified from the root or from some enclosing module; take the deepest that exists.
    current = ""
    for part in node_name.split("/")[1:-1]:
        for prefix in [*_ancestors(current), ""]:
            candidate = f"{prefix}.{part}" if prefix else part
            if candidate in paths:
                current = candidate
                break
    return current


def _ancestors(path: str):
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        yield ".".join(parts[:i])
