"""rapidocr's text detector (PP-OCRv4 det, rapidocr-onnxruntime 1.3.24, Apache-2.0; PaddlePaddle's ONNX export,
opset 12): a DBNet, PP-LCNetV3 backbone with an FPN neck (Resize, ConvTranspose) and a sigmoid head that gives
each pixel the probability of being inside a text line. Its weights are Constant nodes and its HardSwish is
spelled out (``x * Clip(x + 3, 0, 6) / 6``).

The task: find the words on a rendered page. Pages are the orientation task's (``orientation._page``: lines
of random words), upright, resized to ``SIZE`` x ``SIZE`` and normalised as rapidocr does (ImageNet mean and
std). The metric is the agreement with the dense model: the intersection over union of the text masks
(probability above DBNet's 0.3) on each page, averaged. ``word_recall`` is the task's own check: the share of
rendered words whose centre lies inside the mask (the dense model: 94% at 320).
"""

from __future__ import annotations

import numpy as np

OCR_DET = ("rapidocr-onnxruntime", "1.3.24", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")
SIZE = 320  # a multiple of 32, as DBNet needs
THRESHOLD = 0.3  # rapidocr's Det.thresh
_MEAN, _STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def ocr_det_onnx():
    """Path of the PP-OCRv4 text detector (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*OCR_DET)


def render_det_pages(count: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """``count`` rendered pages: inputs ``[N, 3, SIZE, SIZE]`` and, per page, its words' centres in input
    pixels (``[words, 2]`` as x, y)."""
    from PIL import Image

    from edgecompress.models.orientation import _page

    rng = np.random.default_rng(seed)
    images, centres = [], []
    for _ in range(count):
        page, boxes = _words(_page(rng))
        w, h = page.size
        x = np.asarray(page.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255.0
        images.append(((x - _MEAN) / _STD).transpose(2, 0, 1).astype(np.float32))
        centres.append(np.array([((b[0] + b[2]) / 2 * SIZE / w, (b[1] + b[3]) / 2 * SIZE / h) for b in boxes]))
    return np.stack(images), centres


def _words(page):
    """The page and the boxes of its words: runs of ink on each text line, split at gaps wider than a
    third of the line's height."""
    ink = np.asarray(page) < 150
    rows = np.flatnonzero(ink.any(1))
    breaks = np.flatnonzero(np.diff(rows) > 2)
    boxes = []
    for top, bottom in zip(np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]]):
        cols = np.flatnonzero(ink[top:bottom + 1].any(0))
        gap = max(2, (bottom - top + 1) // 3)
        splits = np.flatnonzero(np.diff(cols) > gap)
        for left, right in zip(np.r_[cols[0], cols[splits + 1]], np.r_[cols[splits], cols[-1]]):
            boxes.append((int(left), int(top), int(right), int(bottom)))
    return page, boxes


def masks(probs: np.ndarray) -> np.ndarray:
    """DBNet's text masks: ``[N, 1, H, W]`` probabilities -> ``[N, H, W]`` booleans."""
    return np.asarray(probs)[:, 0] > THRESHOLD


def mask_agreement(probs: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-page IoU of the text masks of ``probs`` and of the dense model's ``reference``."""
    a, b = masks(probs), masks(reference)
    union = (a | b).sum((1, 2))
    return float(np.mean(np.where(union > 0, (a & b).sum((1, 2)) / np.maximum(union, 1), 1.0)))


def word_recall(probs: np.ndarray, centres: list[np.ndarray]) -> float:
    """The share of words whose centre pixel is inside the text mask."""
    found = total = 0
    for mask, points in zip(masks(probs), centres):
        if len(points):
            xs = np.clip(points[:, 0].astype(int), 0, mask.shape[1] - 1)
            ys = np.clip(points[:, 1].astype(int), 0, mask.shape[0] - 1)
            found += int(mask[ys, xs].sum())
            total += len(points)
    return found / max(total, 1)
