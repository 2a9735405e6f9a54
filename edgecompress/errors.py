"""The one error hierarchy of edgecompress.

Every error a user can cause (bad input, a missing file, a provider that is not installed) is an
``EdgeCompressError``; its message says what was received, what was expected and how to fix it.
The CLI turns these into one line on stderr and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgeCompressError(Exception):
    """Base class for errors meant for the user. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(EdgeCompressError, ValueError):
    """A configuration value is out of range or inconsistent (a usage error)."""

    exit_code = 2


class UnknownNameError(EdgeCompressError, KeyError):
    """A name (model, method, provider) that is not registered."""

    exit_code = 2

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        super().__init__(f"unknown {kind} {name!r}: {hint}known: {', '.join(known)}")
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class LoadError(EdgeCompressError):
    """A model factory, weights file or ONNX file could not be loaded."""


class ExportError(EdgeCompressError):
    """torch -> ONNX export, simplification or the ONNX checker failed."""


class ParityError(EdgeCompressError):
    """The exported model does not match PyTorch within the tolerance."""


class ProviderUnavailableError(EdgeCompressError):
    """An onnxruntime execution provider was asked for that is not installed."""

    exit_code = 2
