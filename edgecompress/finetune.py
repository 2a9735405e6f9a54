"""Fine-tuning a factorized model back towards its dense original: distillation fitted to the output.

``distill_(student, teacher, loader, config)`` trains ``student`` (the factorized model) to match the dense
``teacher``. The output term fits what the model outputs (``output_kind``, or ``config.loss``):
- logits or log-probabilities: KL divergence at temperature T, scaled by T^2 (Hinton et al. 2015);
- probabilities from a sigmoid (multi-label, or binned regression like CREPE's 360 pitch bins): binary
  cross-entropy against the teacher's probabilities. A mean squared error over 360 outputs that are nearly all
  near zero is small whether or not the peak is in the right place: CREPE tiny fine-tuned that way read a
  loss of 0.0014 at 53% pitch accuracy;
- plain regression: the squared error, normalised by the teacher's output variance.
With labels, ``1 - alpha`` of the output term is cross-entropy on them (classifiers). A feature term
(FitNets; the layer-wise reconstruction of the low-rank literature) adds, for each factorized layer, the
squared error between its output and the dense layer's on the same batch, normalised by the dense output's
variance, weighted by ``feature_weight``. BatchNorm keeps its statistics (eval mode) unless
``train_batchnorm``. With ``evaluate`` (a held-out score of the student, higher is better) each epoch is scored,
the best epoch is kept (the one before fine-tuning included), an epoch that scores lower is undone and the
epochs after it run at half the rate (``BACKOFF``), and training stops after ``patience`` epochs
without a better score or when ``minutes`` are spent. The loader is any iterable of batches: a tensor ``x``,
a pair ``(x, y)`` or a 1-tuple ``(x,)``.
"""

from __future__ import annotations

import copy
import math
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

LOSSES = ("kl", "bce", "mse")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """``alpha`` weighs the distillation loss against the label loss (1.0: soft targets only); ``loss``: the
    output term (None: from the output, ``output_kind``); ``minutes``: a time budget besides ``epochs``."""

    epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 0.0
    temperature: float = 2.0  # CREPE tiny, 3 epochs: T=2 99.25%, T=4 96.25-99.0%, T=1 98.75% (tucker 2x)
    alpha: float = 0.5
    seed: int = 0
    loss: str | None = None
    feature_weight: float = 0.1  # CREPE tiny, 3 epochs, kl: the same within noise; bce: +1.75 to +9.5 points
    train_batchnorm: bool = False
    minutes: float | None = None
    patience: int = 2

    def __post_init__(self):
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise ConfigError(f"fine-tuning epochs must be a whole number >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"fine-tuning learning rate must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha (weight of the distillation loss) must be in [0, 1], got {self.alpha}")
        if self.loss is not None and self.loss not in LOSSES:
            raise ConfigError(f"unknown distillation loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if not self.feature_weight >= 0:
            raise ConfigError(f"the feature term's weight must be 0 or more, got {self.feature_weight}")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"a fine-tuning time budget must be positive minutes, got {self.minutes}")
        if self.patience < 1:
            raise ConfigError(f"patience must be at least 1 epoch, got {self.patience}")


def output_kind(outputs: torch.Tensor) -> tuple[str, str]:
    """The distillation loss that fits ``outputs`` (the teacher's, on a batch) and why."""
    if not outputs.is_floating_point():
        return "mse", "integer outputs"
    low, high = float(outputs.min()), float(outputs.max())
    rows = outputs.reshape(-1, outputs.shape[-1]) if outputs.ndim > 1 else outputs.reshape(1, -1)
    if 0.0 <= low and high <= 1.0:
        if outputs.ndim > 1 and torch.allclose(rows.sum(-1), torch.ones(len(rows)), atol=1e-3):
            return "kl", "probabilities that sum to 1 (a softmax)"
        if outputs.ndim > 1 and outputs.shape[-1] >= 16 and _one_peak(rows) >= 0.8:
            return "kl", ("sigmoid probabilities over bins with one peak (binned regression): KL over the bins "
                          "(CREPE tiny, tucker 2x, 3 epochs: 99.25% pitch accuracy, 97.5% with bce)")
        return "bce", "probabilities in [0, 1] that do not sum to 1 (sigmoids, multi-label)"
    if high <= 0.0 and outputs.ndim > 1 and torch.allclose(rows.logsumexp(-1), torch.zeros(len(rows)), atol=1e-3):
        return "kl", "log-probabilities"
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return "kl", "scores per class (logits)"
    return "mse", "regression outputs"


def _one_peak(rows: torch.Tensor) -> float:
    """The share of rows whose outputs above half their maximum sit in one run of neighbouring bins."""
    high = rows >= rows.max(-1, keepdim=True).values / 2
    runs = (high[:, 1:] & ~high[:, :-1]).sum(-1) + high[:, 0].long()
    return float((runs == 1).float().mean())


def check_loss(loss: str, outputs: torch.Tensor) -> None:
    """Refuse a loss that cannot apply to ``outputs``, with the reason."""
    if loss in ("kl", "bce") and not outputs.is_floating_point():
        raise ConfigError(f"--distill-loss {loss} needs float scores; the model outputs {outputs.dtype}: use mse")
    if loss == "bce" and (float(outputs.min()) < 0 or float(outputs.max()) > 1):
        raise ConfigError(f"--distill-loss bce needs probabilities in [0, 1]; the model's outputs range "
                          f"{float(outputs.min()):.3g} to {float(outputs.max()):.3g}: use kl (logits) or mse")
    if loss == "kl" and outputs.ndim < 2:
        raise ConfigError("--distill-loss kl needs a score per class (a last dim of 2 or more): use mse or bce")


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None,
                      config: FinetuneConfig, kind: str = "kl") -> torch.Tensor:
    """The output term of ``kind`` (module docstring); with labels, ``alpha`` of it plus ``1 - alpha`` of the
    cross-entropy on them."""
    if kind == "bce":
        eps = 1e-6
        soft = F.binary_cross_entropy(student_out.clamp(eps, 1 - eps), teacher_out.clamp(0, 1))
    elif kind == "mse":
        soft = F.mse_loss(student_out, teacher_out) / teacher_out.var().clamp_min(1e-12)
    else:
        t = config.temperature
        s = student_out.reshape(-1, student_out.shape[-1])
        k = teacher_out.reshape(-1, teacher_out.shape[-1])
        if float(k.min()) >= 0:  # probabilities: their logs are the logits up to a constant
            s, k = s.clamp_min(1e-12).log(), k.clamp_min(1e-12).log()
        soft = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(k / t, dim=-1), reduction="batchmean",
                        log_target=True) * t * t
    if labels is None or config.alpha == 1:
        return soft
    return config.alpha * soft + (1 - config.alpha) * F.cross_entropy(student_out.reshape(-1, student_out.shape[-1]),
                                                                      labels.reshape(-1))


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise ConfigError(f"a fine-tuning batch must be x, (x,) or (x, y); got {type(batch).__name__}"
                      f"{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


class _Features:
    """The outputs of the student's factorized layers and of the teacher's dense layers at the same paths."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        from edgecompress.factorize.base import FactorizedLayer

        self.names = [n for n, m in student.named_modules() if isinstance(m, FactorizedLayer)]
        self.student, self.teacher = {}, {}
        self.hooks = []
        for name in self.names:
            for model, store in ((student, self.student), (teacher, self.teacher)):
                hook = lambda _m, _i, out, n=name, s=store: s.__setitem__(n, out)  # noqa: E731
                self.hooks.append(model.get_submodule(name).register_forward_hook(hook))

    def loss(self) -> torch.Tensor | None:
        terms = [F.mse_loss(self.student[n], self.teacher[n].detach()) / self.teacher[n].detach().var().clamp_min(1e-12)
                 for n in self.names if n in self.student and n in self.teacher]
        return torch.stack(terms).mean() if terms else None

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _train_mode(student: nn.Module, train_batchnorm: bool) -> None:
    student.train()
    if not train_batchnorm:  # frozen statistics: a few epochs on a few hundred samples would only add noise
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def distill_(student: nn.Module, teacher: nn.Module, loader: Iterable, config: FinetuneConfig = FinetuneConfig(),
             progress: Callable[[int, float], None] | None = None,
             evaluate: Callable[[nn.Module], float] | None = None,
             held_out: torch.Tensor | None = None) -> dict[str, Any]:
    """Train ``student`` in place against ``teacher`` (left untouched) on ``loader``'s batches (module
    docstring). Each epoch is scored by ``evaluate(student)``, else on ``held_out`` inputs (``held_out_score``).
    Returns the history: the loss used and why, per epoch the loss terms and the held-out score, the epoch
    kept, seconds. ``progress(epoch, loss)`` after each epoch."""
    torch.manual_seed(config.seed)
    teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model to fine-tune has no trainable parameters")
    sample = []  # up to 64 samples, for the output's kind
    for batch in loader:
        sample.append(_split(batch)[0])
        if sum(len(b) for b in sample) >= 64:
            break
    if not sample:
        raise ConfigError("the fine-tuning data loader yielded no batches")
    with torch.no_grad():
        sample_out = teacher(torch.cat(sample))
    kind, why = (config.loss, "asked for") if config.loss else output_kind(sample_out)
    check_loss(kind, sample_out)
    if evaluate is None and held_out is not None:
        evaluate = held_out_score(teacher, held_out, kind, config)
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched, per_step = _schedule(opt, loader, config.epochs)
    features = _Features(student, teacher) if config.feature_weight > 0 else None
    start, epochs = time.perf_counter(), []
    best = (evaluate(student), 0, copy.deepcopy(student.state_dict())) if evaluate else None
    if best is not None:
        epochs.append({"epoch": 0, "score": round(best[0], 6)})
    try:
        for epoch in range(1, config.epochs + 1):
            record = _epoch(student, teacher, loader, opt, config, kind, features, start,
                            sched if per_step else None)
            if not per_step:
                sched.step()
            record["epoch"] = epoch
            if evaluate is not None:
                score = evaluate(student)
                record["score"] = round(score, 6)
                if score > best[0]:  # unrounded: a rounded tie must not count as better
                    best = (score, epoch, copy.deepcopy(student.state_dict()))
                elif epoch < config.epochs:  # back to the best, at half the step, for the epochs left
                    student.load_state_dict(best[2])
                    opt.state.clear()  # the moments of the undone steps go with them
                    sched.base_lrs = [lr * BACKOFF for lr in sched.base_lrs]
                    for group in opt.param_groups:
                        group["lr"] *= BACKOFF
                    record["backed_off"] = True
            epochs.append(record)
            log.info("fine-tune epoch %d/%d: %s", epoch, config.epochs, record)
            if progress:
                progress(epoch, record["loss"])
            if config.minutes is not None and time.perf_counter() - start > 60 * config.minutes:
                break
            if best is not None and epoch - best[1] >= config.patience:
                break
    finally:
        if features is not None:
            features.close()
    history = {"loss_kind": kind, "loss_reason": why, "feature_weight": config.feature_weight,
               "batchnorm": "trained" if config.train_batchnorm else "frozen", "epochs": epochs,
               "loss": [e["loss"] for e in epochs if "loss" in e]}
    undone = [e["epoch"] for e in epochs if e.get("backed_off")]
    if undone:
        history["backed_off"] = (f"epoch{'s' if len(undone) > 1 else ''} {', '.join(map(str, undone))} scored lower: "
                                 f"undone, and the rate cut to {BACKOFF:g}x for the epochs after")
    if best is not None:
        student.load_state_dict(best[2])
        history["kept_epoch"] = best[1]
        if best[1] < len(epochs) - 1:
            history["note"] = (f"kept epoch {best[1]} (held-out score {best[0]:.4g}): the later epochs scored lower"
                               if best[1] else "kept the model before fine-tuning: every epoch scored lower on held-out data")
    student.eval()
    history["seconds"] = round(time.perf_counter() - start, 3)
    return history


def held_out_score(teacher: nn.Module, x: torch.Tensor, kind: str, config: FinetuneConfig) -> Callable[[nn.Module], float]:
    """A student's score on held-out inputs ``x``, higher is better: top-1 agreement with the teacher for
    class scores; minus the output loss otherwise (on CREPE's 360 bins the exact top-1 bin agreed on 25% of
    tones where 83% were within 50 cents: too coarse to pick an epoch)."""
    with torch.no_grad():
        reference = teacher.eval()(x)
    classes = kind == "kl" and reference.ndim == 2 and reference.shape[-1] <= 1000 and float(reference.min()) < 0

    def score(student: nn.Module) -> float:
        with torch.no_grad():
            out = student.eval()(x)
            if classes:
                return float((out.argmax(-1) == reference.argmax(-1)).float().mean())
            return -float(distillation_loss(out, reference, None, config, kind))

    return score


# an epoch that scores lower than the best is undone, and the epochs left run at this fraction of the rate:
# CREPE full tucker 4x at 2e-3 lost its data-aware fit in the first epoch (held-out loss 0.75 -> 1.43)
BACKOFF = 0.5
WARMUP = 0.1  # of the steps: the learning rate rises linearly, then falls on a cosine to 0


def _schedule(opt, loader, epochs: int):
    """(scheduler, per step): a linear warm-up over the first ``WARMUP`` of the steps, then a cosine to 0,
    stepped every batch when the loader has a length; else a cosine stepped per epoch. From the data-aware
    factors the first full-rate steps undid them on CREPE full (tucker 4x: held-out loss 0.75 before,
    1.43 after epoch 1 at 2e-3 with the per-epoch cosine)."""
    try:
        total = max(1, epochs * len(loader))
    except TypeError:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)), False
    warm = max(1, int(WARMUP * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), True


def _epoch(student, teacher, loader, opt, config: FinetuneConfig, kind: str, features, start: float,
           sched=None) -> dict[str, float]:
    """One pass over ``loader`` (cut short by the time budget): mean loss terms per sample; ``sched``, when
    given, is stepped after every batch."""
    _train_mode(student, config.train_batchnorm)
    sums, count = {"loss": 0.0, "output": 0.0, "feature": 0.0}, 0
    for batch in loader:
        x, y = _split(batch)
        with torch.no_grad():
            target = teacher(x)
        output = distillation_loss(student(x), target, y, config, kind)
        feature = features.loss() if features is not None else None
        loss = output if feature is None else output + config.feature_weight * feature
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        n = len(x)
        sums["loss"] += float(loss.detach()) * n
        sums["output"] += float(output.detach()) * n
        sums["feature"] += float(feature.detach()) * n if feature is not None else 0.0
        count += n
        if config.minutes is not None and time.perf_counter() - start > 60 * config.minutes:
            break
    student.eval()
    return {k: round(v / max(count, 1), 6) for k, v in sums.items()}


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
