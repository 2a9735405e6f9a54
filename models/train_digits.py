"""Train the bundled ``digits_cnn`` and write its data and weights into ``models/data/``.

    python models/train_digits.py [--epochs 10] [--seed 0]

Takes scikit-learn's bundled copy of the UCI ML hand-written digits (needs scikit-learn, which is
not a runtime dependency of edgecompress), fixes a stratified 80/20 train/held-out split with the
seed, writes ``digits.npz`` (uint8 8x8 images, labels, held-out mask), trains the CNN on the train
split (Adam, cosine schedule, +-2 pixel random shifts) and writes ``digits_cnn.safetensors``.
Same seed and same torch build -> same weights (torch's CPU kernels are deterministic here).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.models import digits

log = logging.getLogger("train_digits")


def make_split(seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = bunch.images.astype(np.uint8), bunch.target.astype(np.uint8)
    index = np.arange(len(labels))
    _, test_index = train_test_split(index, test_size=0.2, random_state=seed, stratify=labels)
    test = np.zeros(len(labels), dtype=bool)
    test[test_index] = True
    digits.DATA_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(digits.DATA_FILE, images=images, labels=labels, test=test)
    log.info("wrote %s: %d train, %d held-out", digits.DATA_FILE, (~test).sum(), test.sum())


def shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation by up to ``pixels`` in each direction (the background value pads)."""
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    n, size = x.shape[0], x.shape[-1]
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(n)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(epochs: int, seed: int, batch: int = 64, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = digits.load_digits("train")
    x_test, y_test = digits.load_digits("test")
    model = digits.DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        start, order = time.perf_counter(), torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(shift(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d: loss %.4f, held-out accuracy %.4f (%.1fs)", epoch + 1, loss.item(),
                 evaluate(model, x_test, y_test), time.perf_counter() - start)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-split", action="store_true", help="reuse the existing digits.npz")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.use_deterministic_algorithms(True)
    if not (args.keep_split and digits.DATA_FILE.is_file()):
        make_split(args.seed)
    model = train(args.epochs, args.seed)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes a dict's keys in no fixed order, and the file should be byte-reproducible
    save_file(state, str(digits.WEIGHTS_FILE), metadata={"made_by": f"train_digits.py --epochs {args.epochs} --seed {args.seed}"})
    x_test, y_test = digits.load_digits("test")
    log.info("wrote %s; held-out accuracy %.4f", digits.WEIGHTS_FILE, evaluate(model, x_test, y_test))


if __name__ == "__main__":
    main()
