"""Calibration and evaluation inputs for int8 quantization: reading them, checking them, holding some out.

Calibration data is a ``.npz`` (input name -> array of N samples) or a folder of ``.npy`` files (either
``<input name>.npy`` holding N samples, or, for a one-input model, one file per sample). Every sample is
checked against the ONNX model's inputs (names, fixed dimensions, int/float kind) before anything runs.
Without a file, a zoo model may calibrate on its own seeded sample inputs, and random inputs are used
only when asked for. Evaluation samples never overlap the calibration ones: they are cut from the end of
the user's data, or drawn with another seed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edgecompress.errors import ConfigError, LoadError

log = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]
EVAL_SEED_OFFSET = 1000  # evaluation inputs are drawn with seed + this, never the calibration seed


@dataclasses.dataclass(frozen=True)
class InputInfo:
    name: str
    shape: tuple[int | None, ...]  # None for a symbolic dimension
    dtype: np.dtype


@dataclasses.dataclass
class Inputs:
    """Calibration and held-out evaluation samples, with where they came from (for the report)."""

    calibration: list[Sample]
    evaluation: list[Sample]
    source: str
    held_out: bool
    notes: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> dict:
        return {"source": self.source, "calibration_samples": len(self.calibration),
                "evaluation_samples": len(self.evaluation), "held_out": self.held_out, "notes": list(self.notes)}


def model_inputs(model: onnx.ModelProto) -> list[InputInfo]:
    """The graph inputs that are not initializers, with fixed dims as ints and symbolic ones as None."""
    inits = {i.name for i in model.graph.initializer}
    infos = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim)
        infos.append(InputInfo(value.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))))
    return infos


def load_samples(path: str | Path, model: onnx.ModelProto) -> list[Sample]:
    """Read calibration data at ``path`` and split it into samples that fit ``model``'s inputs."""
    return load_samples_for(path, model_inputs(model))


def load_samples_for(path: str | Path, infos: list[InputInfo]) -> list[Sample]:
    """Read calibration data at ``path`` and split it into samples that fit the inputs ``infos``."""
    path = Path(path)
    if path.is_dir():
        arrays = _read_folder(path, infos)
    elif path.is_file():
        try:
            data = np.load(path, allow_pickle=False)
            if hasattr(data, "files"):  # .npz: an archive to close
                with data:
                    arrays = {k: data[k] for k in data.files}
            else:  # .npy: one array, for a one-input model
                arrays = {infos[0].name: data}
        except (ValueError, OSError) as exc:
            raise LoadError(f"calibration file {str(path)!r} is not a .npz/.npy file: {str(exc).splitlines()[0]}") from None
    else:
        raise LoadError(f"calibration data {str(path)!r} does not exist")
    if not arrays:
        raise ConfigError(f"calibration data {str(path)!r} is empty: it holds no arrays")
    return split_samples(arrays, infos, str(path))


def _read_folder(path: Path, infos: list[InputInfo]) -> dict[str, np.ndarray] | list[np.ndarray]:
    files = sorted(path.glob("*.npy"))
    if not files:
        raise ConfigError(f"calibration folder {str(path)!r} is empty: it holds no .npy files")
    names = {i.name for i in infos}
    if all(f.stem in names for f in files):
        return {f.stem: np.load(f, allow_pickle=False) for f in files}
    if len(infos) != 1:
        raise ConfigError(f"calibration folder {str(path)!r}: name the files after the model inputs "
                          f"({', '.join(sorted(names))}.npy), each holding N samples")
    # one-input model: one file per sample
    return {infos[0].name: np.stack([_fit_one(np.load(f, allow_pickle=False), infos[0]) for f in files])}


def _fit_one(array: np.ndarray, info: InputInfo) -> np.ndarray:
    # a per-sample file may leave out a batch dimension of 1
    return array[None] if array.ndim == len(info.shape) - 1 else array


def split_samples(arrays: dict[str, np.ndarray], infos: list[InputInfo], where: str = "calibration data") -> list[Sample]:
    """``{name: array of N samples}`` -> N feeds, each checked against the model inputs."""
    names = {i.name for i in infos}
    if len(infos) == 1 and len(arrays) == 1:  # a one-input model takes the single array whatever its key
        arrays = {infos[0].name: next(iter(arrays.values()))}
    missing, extra = names - set(arrays), set(arrays) - names
    if missing or extra:
        raise ConfigError(f"{where}: input names do not match the model: missing {sorted(missing) or '-'}, "
                          f"unexpected {sorted(extra) or '-'}; the model's inputs are {sorted(names)}")
    per_input = {i.name: _as_samples(np.asarray(arrays[i.name]), i, where) for i in infos}
    for name, samples in per_input.items():
        bad = sum(int((~np.isfinite(s)).sum()) for s in samples if s.dtype.kind == "f")
        if bad:
            raise ConfigError(f"{where}: input {name!r} holds {bad} NaN or Inf values; every value must be finite")
    counts = {name: len(s) for name, s in per_input.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{where}: inputs hold different sample counts {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise ConfigError(f"{where} is empty: it holds 0 samples")
    return [{name: s[k] for name, s in per_input.items()} for k in range(count)]


def _as_samples(array: np.ndarray, info: InputInfo, where: str) -> list[np.ndarray]:
    if array.size == 0:
        return []
    if (array.dtype.kind in "iub") != (info.dtype.kind in "iub"):
        raise ConfigError(f"{where}: input {info.name!r} holds {array.dtype}, the model takes {info.dtype}")
    array = array.astype(info.dtype, copy=False)
    rank = len(info.shape)
    if array.ndim == rank + 1 and _fits(array.shape[1:], info.shape):
        return list(array)  # N full feeds
    batch = info.shape[0] if rank else None
    if array.ndim == rank and _fits(array.shape[1:], info.shape[1:]):
        step = batch or 1
        if array.shape[0] % step:
            raise ConfigError(f"{where}: input {info.name!r} has {array.shape[0]} rows, not a multiple of the batch {step}")
        return [array[k:k + step] for k in range(0, array.shape[0], step)]
    want = "x".join("?" if d is None else str(d) for d in info.shape)
    raise ConfigError(f"{where}: input {info.name!r} has shape {tuple(array.shape)}, expected N samples of {want} "
                      f"(an array of shape N x {want}, or rows stacked along the batch dimension)")


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def random_samples(model: onnx.ModelProto, count: int, seed: int) -> list[Sample]:
    """Seeded random feeds: standard normal floats; integer inputs as ids below the embedding's size."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for info in model_inputs(model):
            shape = tuple(d or 1 for d in info.shape)
            if info.dtype.kind in "iu":  # ids below the embedding's size; 0/1 (a mask) when no table reads them
                feed[info.name] = rng.integers(0, _vocab_size(model, info.name) or 2, shape).astype(info.dtype)
            else:
                feed[info.name] = rng.standard_normal(shape).astype(info.dtype)
        feeds.append(feed)
    return feeds


def _vocab_size(model: onnx.ModelProto, name: str) -> int | None:
    """The rows of the embedding table that the integer input ``name`` indexes, or None when none does."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    vocab = next((p.value for p in model.metadata_props if p.key == f"edgecompress.vocab.{name}"), None)
    return int(vocab) if vocab else None


def zoo_samples(name: str, model: onnx.ModelProto, count: int, seed: int, held_out: bool = False) -> list[Sample]:
    """The zoo entry's own sample inputs, fed to the ONNX input names: real data where the entry ships
    some (calibration from its training split, evaluation from its held-out split), else seeded
    ``loading.sample_inputs``."""
    from edgecompress.models import get_spec

    from edgecompress.loading import load_model, sample_inputs

    infos = model_inputs(model)
    if len(infos) != 1:
        raise ConfigError(f"zoo model {name!r} gives one input, but the ONNX model takes {len(infos)}")
    spec = get_spec(name)
    if spec.samples is not None:
        tensors = [x.unsqueeze(0) for x in spec.samples(count, seed, held_out)]
    else:
        loaded = load_model(name)
        tensors = sample_inputs(loaded.module, loaded.input_spec, count, seed)
    arrays = {infos[0].name: np.stack([t.numpy() for t in tensors])}
    return split_samples(arrays, infos, f"zoo model {name!r} sample inputs")


def hold_out(samples: list[Sample], calib_count: int, eval_count: int) -> tuple[list[Sample], list[Sample]]:
    """Split user data: evaluation samples from the end, calibration from the start, never shared."""
    if len(samples) < 2:
        return samples, []
    spare = len(samples) - calib_count
    held = min(eval_count, spare) if spare >= 1 else max(1, min(eval_count, len(samples) // 4))
    return samples[:-held][:calib_count], samples[-held:]
