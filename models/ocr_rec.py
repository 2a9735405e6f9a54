"""rapidocr's text recogniser (PP-OCRv4 rec, rapidocr-onnxruntime 1.3.24, Apache-2.0; PaddlePaddle's ONNX
export, opset 12): a PP-LCNetV3 backbone, an SVTR neck (attention: MatMul, Softmax, LayerNorm as primitive
ops) and a 120 -> 6625 CTC head over Chinese and ASCII characters. Its character table is the file's own
``character`` metadata. The task: read a rendered line of random letters and digits; the metric is the
character accuracy, ``1 - edit distance / length``, of the CTC-decoded output (greedy: the best class per
step, repeats merged, blanks dropped). Lines are rendered here with PIL and preprocessed as rapidocr does
(``orientation.preprocess_line`` at 48 x ``WIDTH``).
"""

from __future__ import annotations

import numpy as np

OCR_REC = ("rapidocr-onnxruntime", "1.3.24", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
HEIGHT, WIDTH = 48, 320
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def ocr_rec_onnx():
    """Path of the PP-OCRv4 recogniser (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*OCR_REC)


def characters(path) -> list[str]:
    """The recogniser's classes: CTC blank, its ``character`` metadata one per line, then a space."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    table = next(p.value for p in model.metadata_props if p.key == "character").split("\n")
    return ["", *table, " "]


def _line(rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFont

    words = ["".join(rng.choice(list(_LETTERS), int(rng.integers(2, 8)))) for _ in range(int(rng.integers(1, 4)))]
    text = " ".join(words)
    font = ImageFont.load_default(size=int(rng.integers(20, 36)))
    box = ImageDraw.Draw(Image.new("L", (8, 8))).textbbox((0, 0), text, font=font)
    image = Image.new("L", (box[2] + 16, box[3] + 12), int(rng.integers(215, 256)))
    ImageDraw.Draw(image).text((8, 4), text, fill=int(rng.integers(0, 70)), font=font)
    return image, text


def preprocess(image) -> np.ndarray:
    from edgecompress.models.orientation import preprocess_line

    return preprocess_line(image, HEIGHT, WIDTH)


def render_text_lines(count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered lines of 1-3 random words: inputs ``[N, 3, 48, WIDTH]`` and their texts."""
    rng = np.random.default_rng(seed)
    pairs = [_line(rng) for _ in range(count)]
    return np.stack([preprocess(image) for image, _ in pairs]), [text for _, text in pairs]


def ctc_decode(probs: np.ndarray, table: list[str]) -> list[str]:
    """Greedy CTC: ``probs [N, steps, classes]`` -> one string per line."""
    texts = []
    for best in np.asarray(probs).argmax(-1):
        keep = np.r_[True, best[1:] != best[:-1]] & (best != 0)
        texts.append("".join(table[k] if k < len(table) else "" for k in best[keep]))
    return texts


def _edits(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def character_accuracy(read: list[str], texts: list[str]) -> float:
    """``1 - total edit distance / total length`` (can fall below 0 for a model that invents text)."""
    return 1.0 - sum(_edits(r, t) for r, t in zip(read, texts)) / max(1, sum(len(t) for t in texts))
