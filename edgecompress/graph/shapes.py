"""Shapes of an ONNX file's tensors: ``--input-shape`` for its inputs, the dims fixed for the analysis, inferred.

Exporters write dynamic batch and spatial dims (paddle2onnx: ``p2o.DynamicDimension.0``, torch.onnx:
``dynamic_axes``). The layers are analysed on a copy whose inputs are fixed: from ``--input-shape``
(``1x3x48x192`` for a one-input file, ``input=1x512,state=2x1x128`` for several), else a dynamic batch becomes 1
and any other dynamic dim must be given. Shapes are then inferred with onnxruntime's symbolic shape
inference, which follows ``Shape -> Gather -> Concat -> Reshape`` computations that ONNX's own inference
leaves unknown; ONNX's fills what it leaves open (a ``OneHot`` depth read from an initializer). On the test corpus with fixed inputs it reached every weight node's input in all 11 files,
ONNX's (with data propagation) missed some in 4 (bert, silero, two PaddleOCR files). ONNX's inference is the
fallback when the symbolic one raises (it asserts on PaddleOCR's classifier); the fixed copy's ``Shape``
computations are folded to constants first, so that either reaches the layers behind a computed Reshape.
"""

from __future__ import annotations

import logging
import tempfile

import onnx

from edgecompress import io
from edgecompress.errors import ConfigError

log = logging.getLogger(__name__)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """An input's dims: ints where fixed, the symbol (or '?') where dynamic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def parse_input_shapes(text: str | None, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` for an ONNX file: ``1x3x224x224`` (a one-input file) or ``name=1x3x224x224,...``,
    checked against the inputs' ranks and fixed dims."""
    if not text:
        return {}
    inputs = {v.name: v for v in graph_inputs(model)}
    if "=" not in text:
        if len(inputs) != 1:
            raise ConfigError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}): give "
                              "--input-shape name=SHAPE,name=SHAPE")
        parts = {next(iter(inputs)): text}
    else:
        parts = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    shapes = {}
    for name, shape in parts.items():
        if name not in inputs:
            raise ConfigError(f"--input-shape names input {name!r}; the model's inputs are {', '.join(inputs)}")
        try:
            values = tuple(int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--input-shape {shape!r} for {name!r} is not a shape such as 1x3x224x224") from None
        have = dims(inputs[name])
        if len(values) != len(have) or any(v <= 0 for v in values):
            raise ConfigError(f"--input-shape {shape!r} does not fit input {name!r}: it is {_text(have)}")
        clash = [k for k, (v, d) in enumerate(zip(values, have)) if isinstance(d, int) and v != d]
        if clash:
            raise ConfigError(f"--input-shape {shape!r} does not fit input {name!r} ({_text(have)}): dim {clash[0]} "
                              f"is fixed at {have[clash[0]]}")
        shapes[name] = values
    return shapes


def fixed(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs are all fixed: as ``shapes`` says, a dynamic batch as 1; any other
    dynamic dim left open is an error that says to give ``--input-shape``."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for value in graph_inputs(new):
        have = dims(value)
        want = shapes.get(value.name) or tuple(1 if k == 0 and not isinstance(d, int) else d for k, d in enumerate(have))
        open_dims = [k for k, d in enumerate(want) if not isinstance(d, int)]
        if open_dims:
            example = "x".join(str(d) if isinstance(d, int) else "?" for d in want)
            raise ConfigError(f"input {value.name!r} has dynamic dims ({_text(have)}): give --input-shape "
                              f"{value.name}={example} with a number for each ?")
        for dim, size in zip(value.type.tensor_type.shape.dim, want):
            dim.Clear()
            dim.dim_value = int(size)
    return new


def is_dynamic(model: onnx.ModelProto) -> bool:
    return any(not isinstance(d, int) for v in graph_inputs(model) for d in dims(v))


def infer(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Tensor name -> static shape, for the tensors whose every dim is known: onnxruntime's symbolic
    inference; where it raises, again on a copy whose ``Shape`` computations are folded to constants
    (onnxscript), and ONNX's inference on that copy for what is still unknown."""
    found = _symbolic(model)
    if found is None:
        model = _folded(model)
        found = _symbolic(model) or {}
    return {**_onnx_inferred(model), **found}


def _onnx_inferred(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """ONNX's own inference, with data propagation: it fills what the symbolic one leaves open, such as the
    depth of a ``OneHot`` read from an initializer (tf2onnx's Keras models, magika's among them)."""
    try:
        return _static(onnx.shape_inference.infer_shapes(model, data_prop=True))
    except Exception as exc:
        log.info("ONNX shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}


def _symbolic(model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:  # it raises on ops it does not know and on incomplete inference, and returns None below opset 7
        with tempfile.TemporaryDirectory(prefix="edgecompress-shapes-") as tmp, io.inside(tmp):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)  # it leaves a file in the cwd
    except Exception as exc:
        log.info("symbolic shape inference failed (%s)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return None if inferred is None else _static(inferred)


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnxscript import optimizer

    try:
        graph = ir.from_proto(model)
        optimizer.optimize(graph)  # its rewrites keep the tensor names the layers read
        return ir.to_proto(graph)
    except Exception as exc:  # the shapes are then inferred on the model as it is
        log.info("constant folding before shape inference failed: %s", exc)
        return model


def _static(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    found = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0 for d in t.shape.dim):
            found[value.name] = tuple(d.dim_value for d in t.shape.dim)
    return found


def _text(have: list[int | str]) -> str:
    return "x".join(str(d) for d in have)
