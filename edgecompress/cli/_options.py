"""Options shared by several commands (model loading), and small printing helpers."""

from __future__ import annotations

import functools

import click
from rich.console import Console

from edgecompress.loading import DTYPES

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def model_options(func):
    """MODEL argument plus --weights, --input-shape, --input-dtype."""

    @click.option("--input-dtype", type=click.Choice(list(DTYPES)), default=None,
                  help="Input dtype; int64 inputs are token ids. Default: the zoo entry's.")
    @click.option("--input-shape", default=None, metavar="SHAPE",
                  help="Input shape such as 1x3x224x224; for an ONNX file with several inputs name=SHAPE,name=SHAPE. "
                       "Default: the zoo entry's; for an ONNX file its fixed dims (a dynamic batch as 1).")
    @click.option("--weights", type=click.Path(dir_okay=False), default=None,
                  help="State dict to load: .safetensors, or .pt/.pth (loaded with weights_only=True).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"
