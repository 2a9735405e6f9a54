"""The bundled default model: a small CNN trained on real handwritten digits, with its data.

``digits_cnn`` classifies the UCI ML hand-written digits (the 1,797 8x8 images scikit-learn ships,
E. Alpaydin and C. Kaynak, CC BY 4.0), upsampled bilinearly to 32x32 so that its 64- and
128-channel 3x3 convolutions cost enough for factorization to be measurably faster on a CPU. The
images, their labels and a fixed train/held-out split live in ``data/digits.npz``; the trained
weights in ``data/digits_cnn.safetensors``, made by ``models/train_digits.py`` (seeded). The zoo
factory loads those weights, so every command that names ``digits_cnn`` gets the trained model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.models.registry import register_model

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DATA_FILE = DATA_DIR / "digits.npz"
WEIGHTS_FILE = DATA_DIR / "digits_cnn.safetensors"
SIZE = 32  # the 8x8 images are upsampled to SIZE x SIZE
SPLITS = ("train", "test")


class DigitsCNN(nn.Module):
    """conv 1->64 @32 -> pool -> conv 64->128 @16 -> pool -> conv 128->128 @8 -> global pool -> FC 128->10.
    BatchNorm after every conv (folded into it before factorizing and export)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.MaxPool2d(2),
            *block(128, 128),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def digits_samples(count: int, seed: int, held_out: bool) -> torch.Tensor:
    """``count`` real digits, drawn (seeded) from the held-out split or the training split."""
    images, _ = load_digits("test" if held_out else "train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


@register_model(input_shape=(1, 1, SIZE, SIZE), samples=digits_samples)
def digits_cnn() -> nn.Module:
    """Small CNN for handwritten digits (UCI 8x8, upsampled to 32x32); trained weights bundled."""
    model = DigitsCNN()
    if WEIGHTS_FILE.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(WEIGHTS_FILE)))
    else:  # only while the training script has not been run yet
        log.warning("%s is missing: digits_cnn is untrained (run models/train_digits.py)", WEIGHTS_FILE)
    return model


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8/float 8x8 images with values 0..16 -> float32 [N, 1, 32, 32] in [-1, 1], upsampled bilinearly."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def load_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped images of ``split`` ('train' or 'test', the held-out set) as (inputs, labels)."""
    if split not in SPLITS:
        from edgecompress.errors import ConfigError

        raise ConfigError(f"unknown digits split {split!r}: use 'train' or 'test'")
    with np.load(DATA_FILE) as data:
        mask = data["test"] if split == "test" else ~data["test"]
        images, labels = data["images"][mask], data["labels"][mask]
    return preprocess(images), torch.as_tensor(labels.astype(np.int64))


def write_split(path: str | Path, split: str = "test", with_train: bool = False) -> Path:
    """Write ``split`` as a ``--data`` file (``input``, ``labels``; with ``with_train`` also the train
    split as ``train_inputs``/``train_labels``)."""
    from edgecompress import io

    x, y = load_digits(split)
    arrays = {"input": x.numpy(), "labels": y.numpy()}
    if with_train:
        x_train, y_train = load_digits("train")
        arrays.update(train_inputs=x_train.numpy(), train_labels=y_train.numpy())
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return Path(path)
