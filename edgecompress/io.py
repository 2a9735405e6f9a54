"""Files in and out: output written atomically (complete or absent, never half-written), and the
.npz data files that several commands read."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgecompress.errors import EdgeCompressError, LoadError


def ensure_writable(path: str | os.PathLike) -> Path:
    """Create ``path``'s folder if needed and fail early, with the fix, if it cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeCompressError(f"cannot create folder {str(parent)!r} for {str(path)!r}: {exc.strerror}") from None
    if path.is_dir():
        raise EdgeCompressError(f"output path {str(path)!r} is a folder: give a file name")
    if not os.access(parent, os.W_OK):
        raise EdgeCompressError(f"cannot write to {str(parent)!r}: choose a writable output path")
    _probe(parent)  # root passes os.access everywhere; /proc, /sys and read-only mounts still refuse files
    return path


def _probe(folder: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgecompress-probe-", dir=folder)
    except OSError as exc:
        raise EdgeCompressError(f"cannot write to {str(folder)!r} ({exc.strerror}): choose a writable output path") from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def new_folder(path: str | os.PathLike) -> Iterator[Path]:
    """``path``, a folder the work inside writes into: removed again when the work fails before writing
    anything there, so a bad input leaves no empty output folder behind (one that was there stays)."""
    path = Path(path)
    existed = path.exists()
    try:
        yield path
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = ensure_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise EdgeCompressError(f"cannot write {str(path)!r} ({exc.strerror}): choose a writable output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    """JSON text of a report: numpy values, dataclasses and paths included."""
    return json.dumps(obj, indent=2, default=_json_default)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, to_json(obj) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, dataclasses and paths end up in reports
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, Any]:
    """The arrays of an .npz file by name (never unpickling objects), with one-line errors."""
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise LoadError(f"{what} {os.fspath(path)!r} does not exist") from None
    except Exception as exc:  # zipfile, numpy and OS errors all mean the same to the user
        raise LoadError(f"{what} {os.fspath(path)!r} is not a readable .npz file: {type(exc).__name__}") from None


@contextlib.contextmanager
def inside(folder: str | Path):
    """Run the block with ``folder`` as the working directory (for tools that drop temp files into it)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
