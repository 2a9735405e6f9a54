"""The user's own task metric, ``--eval FILE.py:FUNCTION``: a function that takes the path of an ONNX file and
returns a score, higher is better (accuracy, mAP, minus WER...).

It is loaded once, before any work, so that a wrong path or name fails in one line; each call is checked for a
finite number. ``run`` scores every variant with it (the report's ``score`` column, what the recommendation
and the Pareto front then use), and fine-tuning scores each epoch with it (the student written to a temporary
ONNX file), keeping the best.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

from edgecompress.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class UserEval:
    spec: str  # FILE.py:FUNCTION, as given
    fn: Callable[[str], float]

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2]

    def __call__(self, onnx_path: str | Path) -> float:
        try:
            value = self.fn(str(onnx_path))
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"--eval {self.spec} failed on {Path(onnx_path).name}: {type(exc).__name__}: {first}") from None
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--eval {self.spec} must return a number (higher is better), "
                              f"it returned {type(value).__name__}") from None
        if not math.isfinite(score):
            raise ConfigError(f"--eval {self.spec} returned {score} on {Path(onnx_path).name}: the score must be finite")
        return score


@functools.lru_cache(maxsize=8)
def load_eval(spec: str) -> UserEval:
    """``FILE.py:FUNCTION`` -> the callable, or a one-line ConfigError saying what is wrong with it. Imported
    once per spec: ``run`` checks it before any work and then scores with it, the file's top level runs once."""
    path, colon, name = spec.rpartition(":")
    if not colon or not path or not name:
        raise ConfigError(f"--eval takes FILE.py:FUNCTION (a function of an ONNX path returning a score), got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--eval file {path!r} does not exist")
    module_name = f"edgecompress_user_eval_{abs(hash(file.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"--eval file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.path.insert(0, str(file.resolve().parent))  # its own helpers beside it import as usual
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"--eval file {path!r} failed to import: {type(exc).__name__}: {first}") from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"--eval file {path!r} has no function {name!r}")
    if not callable(fn):
        raise ConfigError(f"--eval {spec}: {name!r} is not a function")
    return UserEval(spec, fn)
