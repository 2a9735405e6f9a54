"""Google's Magika file-type detector as the magika 0.5.1 wheel ships it (Apache-2.0; ``standard_v1``, a tf2onnx
export of a Keras model: the bytes one-hot encoded, a Dense over each byte, a Dense over each 4 bytes' features,
a max pool, LayerNorms, a 113-way softmax; its Dense layers are Tensordot ``Reshape -> MatMul -> Reshape``
computed from ``Shape`` nodes, with a dynamic batch) and its task: name the type of a file.

The files are synthesized here, 17 kinds: source code (Python, JavaScript, C, shell), text formats (JSON, CSV,
HTML, XML, Markdown) and binary ones written with the standard library and PIL (PNG, JPEG, GIF, BMP, ZIP,
gzip, WAV, PDF). Features are Magika's v1: the first, middle and last 512 bytes of the whitespace-stripped
content, padded with 256 (``features``, after ``magika.Magika._extract_features_from_seekable``). The metric
is accuracy against the kind each file was written as; the dense model names all of them right.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import wave
import zipfile
from collections.abc import Callable

import numpy as np

WHEEL = ("magika", "0.5.1")
SIZE, BLOCK, PAD = 512, 4096, 256  # beg/mid/end size, the block read at each end, the padding token


def magika_onnx():
    """Path of Magika's ONNX file (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*WHEEL, "magika/models/standard_v1/model.onnx")


def labels() -> list[str]:
    """The model's 113 output classes, in order."""
    from edgecompress.models.wheels import wheel_member

    config = json.loads(wheel_member(*WHEEL, "magika/models/standard_v1/model_config.json").read_text())
    return config["train_dataset_info"]["target_labels_info"]["target_labels_space"]


def features(data: bytes) -> np.ndarray:
    """Magika v1's input for one file: float32 [1536], its beginning, middle and end bytes."""
    if len(data) < 2 * BLOCK + SIZE:
        beg = mid = end = data.strip()
    else:
        beg, end = data[:BLOCK].lstrip(), data[-BLOCK:].rstrip()
        start = BLOCK - len(beg) + (len(data) - (2 * BLOCK - len(beg) - len(end)) - SIZE) // 2
        mid = data[start:start + SIZE]
    if len(mid) >= SIZE:
        mid = mid[(len(mid) - SIZE) // 2:][:SIZE]
    short = SIZE - len(mid)
    ints = ([*beg[:SIZE]] + [PAD] * (SIZE - len(beg[:SIZE])) + [PAD] * (short // 2) + [*mid]
            + [PAD] * (short - short // 2) + [PAD] * (SIZE - len(end[-SIZE:])) + [*end[-SIZE:]])
    return np.array(ints, np.float32)


def synth_files(count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``count`` synthesized files, the kinds in turn: Magika's inputs [N, 1536] and each file's kind (its
    label among ``labels()``)."""
    r = random.Random(seed)
    kinds = list(KINDS)
    names = [kinds[k % len(kinds)] for k in range(count)]
    return np.stack([features(_bytes(KINDS[name](r))) for name in names]), names


def accuracy(scores: np.ndarray, kinds: list[str]) -> float:
    """Share of files whose top-scoring class is the kind they were written as."""
    names = labels()
    return float(np.mean([names[k] == kind for k, kind in zip(scores.argmax(1), kinds)]))


def _bytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content


_WORDS = "alpha beta gamma delta value count index name item total result buffer parse load save user data".split()


def _w(r: random.Random) -> str:
    return r.choice(_WORDS)


def _python(r):
    out = ["import os", "import sys", ""]
    for _ in range(r.randint(2, 6)):
        a, b = _w(r), _w(r)
        out += [f"def {a}_{b}({_w(r)}, {_w(r)}=None):", f'    """Return the {a} of {b}."""', f"    if {a} is None:",
                f"        return {r.randint(0, 99)}", f"    for {b} in range(len({a})):",
                f"        {a} += {b} * {r.randint(1, 9)}", f"    return {a}", ""]
    return "\n".join(out + ['if __name__ == "__main__":', f"    print({_w(r)}_{_w(r)}(sys.argv))"])


def _javascript(r):
    out = []
    for _ in range(r.randint(2, 6)):
        a, b = _w(r), _w(r)
        out += [f"function {a}{b.title()}({_w(r)}, {_w(r)}) {{", f"  const {a} = {r.randint(0, 99)};",
                f"  for (let i = 0; i < {b}.length; i++) {{", f"    {a} += {b}[i];", "  }", f"  return {a};", "}", ""]
    return "\n".join(out + [f"module.exports = {{ {_w(r)}: {_w(r)}{_w(r).title()} }};"])


def _c(r):
    out = ["#include <stdio.h>", "#include <stdlib.h>", ""]
    for _ in range(r.randint(2, 5)):
        out += [f"static int {_w(r)}_{_w(r)}(int *{_w(r)}, size_t n) {{", "    int s = 0;",
                "    for (size_t i = 0; i < n; i++) {", f"        s += {_w(r)}[i] * {r.randint(1, 9)};", "    }",
                "    return s;", "}", ""]
    return "\n".join(out + ["int main(int argc, char **argv) {", '    printf("%d\\n", argc);', "    return 0;", "}"])


def _shell(r):
    out = ["#!/bin/bash", "set -e", ""]
    for _ in range(r.randint(3, 8)):
        name = _w(r).upper()
        out += [f'{name}="{_w(r)}"', f'if [ -f "${name}" ]; then', f'  echo "{_w(r)} $1"', "fi"]
    return "\n".join(out)


def _record(r, depth=0):
    record = {}
    for _ in range(r.randint(2, 6)):
        x = r.random()
        record[_w(r)] = (_record(r, depth + 1) if x < 0.3 and depth < 2 else r.randint(0, 1000) if x < 0.6
                         else _w(r) if x < 0.8 else [r.random() for _ in range(3)])
    return record


def _json(r):
    return json.dumps([_record(r) for _ in range(r.randint(2, 8))], indent=r.choice([2, 4]))


def _csv(r):
    columns = [_w(r) for _ in range(r.randint(3, 7))]
    rows = [",".join(str(r.randint(0, 999)) if r.random() < 0.6 else _w(r) for _ in columns)
            for _ in range(r.randint(20, 80))]
    return "\n".join([",".join(columns), *rows])


def _html(r):
    body = "\n".join(f'    <p class="{_w(r)}">{" ".join(_w(r) for _ in range(12))}</p>' for _ in range(r.randint(3, 10)))
    return f"<!DOCTYPE html>\n<html>\n  <head>\n    <title>{_w(r)}</title>\n  </head>\n  <body>\n{body}\n  </body>\n</html>\n"


def _xml(r):
    items = "\n".join(f'  <{_w(r)} id="{r.randint(0, 99)}">{_w(r)}</{_w(r)}>' for _ in range(r.randint(5, 30)))
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<root>\n{items}\n</root>\n'


def _markdown(r):
    out = [f"# {_w(r).title()} {_w(r)}", ""]
    for _ in range(r.randint(2, 5)):
        out += [f"## {_w(r).title()}", "", " ".join(_w(r) for _ in range(30)), "", f"- {_w(r)} **{_w(r)}**",
                f"- `{_w(r)}()`", ""]
    return "\n".join(out)


def _image(kind: str, side: tuple[int, int] = (16, 64)) -> Callable[[random.Random], bytes]:
    def make(r):
        from PIL import Image

        pixels = np.random.default_rng(r.randrange(1 << 30)).integers(0, 255, (r.randint(*side), r.randint(*side), 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=kind)
        return buffer.getvalue()

    return make


def _zip(r):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(r.randint(1, 4)):
            archive.writestr(f"{_w(r)}{k}.txt", _python(r))
    return buffer.getvalue()


def _gzip(r):
    return gzip.compress(_csv(r).encode(), mtime=0)


def _wav(r):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.sin(np.arange(8000) * r.uniform(0.01, 0.2)) * 20000).astype("<i2").tobytes())
    return buffer.getvalue()


KINDS: dict[str, Callable[[random.Random], str | bytes]] = {
    "python": _python, "javascript": _javascript, "c": _c, "shell": _shell, "json": _json, "csv": _csv,
    "html": _html, "xml": _xml, "markdown": _markdown, "png": _image("PNG"), "jpeg": _image("JPEG"),
    "gif": _image("GIF"), "bmp": _image("BMP"), "zip": _zip, "gzip": _gzip, "wav": _wav,
    "pdf": _image("PDF", (32, 32)),
}
