"""Google's speech embedding as openwakeword 0.4.0 ships it (Apache-2.0; a tf2onnx export of a Keras model:
NHWC convs, dynamic batch) and inputs for it: windows of 76 mel frames x 32 bins, made by the wheel's own
``melspectrogram.onnx`` from audio synthesized here (1-2 voiced harmonic glides with vibrato, an envelope and
noise, 16 kHz), scaled as openwakeword does (``mel / 10 + 2``). No speech data set is needed. The metric is
the cosine similarity of a window's 96-value embedding with the dense model's.
"""

from __future__ import annotations

import math

import numpy as np

WHEEL = ("openwakeword", "0.4.0")
SAMPLE_RATE = 16000
FRAMES, BINS = 76, 32  # one embedding window


def embedding_onnx():
    """Path of the speech embedding ONNX file (downloaded once, see ``wheels``)."""
    from edgecompress.models.wheels import wheel_member

    return wheel_member(*WHEEL, "openwakeword/resources/models/embedding_model.onnx")


def _clip(rng: np.random.Generator, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    signal = np.zeros_like(t)
    for _ in range(int(rng.integers(1, 3))):
        f0 = math.exp(rng.uniform(math.log(80), math.log(400)))
        f = f0 * np.exp(rng.uniform(-0.4, 0.4) * t / t[-1]) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
        phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
        start, length = rng.uniform(0, 0.3), rng.uniform(0.3, 0.7)
        envelope = np.clip(np.sin(np.pi * np.clip((t - start) / length, 0, 1)), 0, 1)
        for h in range(1, 20):
            if h * f0 * 1.5 < SAMPLE_RATE / 2:
                signal += envelope * rng.uniform(0, 1) / h * np.sin(h * phase)
    signal += rng.standard_normal(len(t)) * signal.std() * 10 ** (-rng.uniform(10, 40) / 20)
    return (signal / np.abs(signal).max() * rng.uniform(3000, 20000)).astype(np.float32)  # int16-scaled


def mel_windows(count: int, seed: int = 0) -> np.ndarray:
    """``count`` windows [N, 76, 32, 1] of synthesized audio's mel frames, as the embedding model takes them."""
    import onnxruntime as ort

    from edgecompress.models.wheels import wheel_member

    mel = ort.InferenceSession(str(wheel_member(*WHEEL, "openwakeword/resources/models/melspectrogram.onnx")),
                               providers=["CPUExecutionProvider"])
    rng, out = np.random.default_rng(seed), []
    while len(out) < count:
        frames = mel.run(None, {"input": _clip(rng)[None]})[0][0, 0] / 10 + 2  # [time, 32]
        out += [frames[s:s + FRAMES] for s in range(0, len(frames) - FRAMES + 1, 24)]
    return np.stack(out[:count])[..., None].astype(np.float32)


def cosine(out: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Per sample, the cosine similarity of two batches of embeddings."""
    a, b = out.reshape(len(out), -1), dense.reshape(len(dense), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-30)
