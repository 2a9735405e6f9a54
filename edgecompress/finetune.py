"""Fine-tuning a factorized model back towards its dense original: knowledge distillation.

``distill_(student, teacher, loader, config)`` trains ``student`` (the factorized model) to match
the dense ``teacher``'s softened outputs (Hinton et al. 2015: KL divergence at temperature T,
scaled by T^2) plus, when the loader yields labels, the usual cross-entropy on them. The loader is
any iterable of batches: a tensor ``x``, a pair ``(x, y)`` or a 1-tuple ``(x,)``. Truncating ranks
moves every layer a little; a few epochs of distillation win most of the accuracy back (every seed
paper fine-tunes after factorizing).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecompress.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """``alpha`` weighs the distillation loss against the label loss (1.0: soft targets only)."""

    epochs: int = 3
    lr: float = 5e-4
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise ConfigError(f"fine-tuning epochs must be a whole number >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"fine-tuning learning rate must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha (weight of the distillation loss) must be in [0, 1], got {self.alpha}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      config: FinetuneConfig) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels); soft part only without labels."""
    t = config.temperature
    s = student_logits.reshape(-1, student_logits.shape[-1])
    k = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    soft = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(k / t, dim=-1), reduction="batchmean",
                    log_target=True) * t * t
    if labels is None or config.alpha == 1:
        return soft
    return config.alpha * soft + (1 - config.alpha) * F.cross_entropy(s, labels.reshape(-1))


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise ConfigError(f"a fine-tuning batch must be x, (x,) or (x, y); got {type(batch).__name__}"
                      f"{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


def distill_(student: nn.Module, teacher: nn.Module, loader: Iterable, config: FinetuneConfig = FinetuneConfig(),
             progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``student`` in place against ``teacher`` (left untouched) on ``loader``'s batches.
    Returns the history: loss per epoch, seconds. ``progress(epoch, loss)`` after each epoch."""
    torch.manual_seed(config.seed)
    teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model to fine-tune has no trainable parameters")
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs))
    losses, start = [], time.perf_counter()
    for epoch in range(config.epochs):
        student.train()
        total, count = 0.0, 0
        for batch in loader:
            x, y = _split(batch)
            with torch.no_grad():
                target = teacher(x)
            loss = distillation_loss(student(x), target, y, config)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(x), count + len(x)
        if count == 0:
            raise ConfigError("the fine-tuning data loader yielded no batches")
        sched.step()
        losses.append(total / count)
        log.info("fine-tune epoch %d/%d: loss %.4f", epoch + 1, config.epochs, losses[-1])
        if progress:
            progress(epoch + 1, losses[-1])
    student.eval()
    return {"epochs": config.epochs, "loss": losses, "seconds": round(time.perf_counter() - start, 3)}


def distill(student: nn.Module, teacher: nn.Module, loader: Iterable, config: FinetuneConfig = FinetuneConfig(),
            progress: Callable[[int, float], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A fine-tuned copy of ``student`` and the history; ``student`` is left untouched."""
    new = copy.deepcopy(student)
    return new, distill_(new, teacher, loader, config, progress)


def tensor_loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 64, seed: int = 0):
    """A shuffling DataLoader over in-memory inputs (and labels), seeded."""
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(x) if y is None else TensorDataset(x, y)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
