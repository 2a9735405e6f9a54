"""Knowledge distillation: the student moves towards the teacher, labels are optional, bad input is refused."""

import copy

import pytest
import torch
import torch.nn as nn

from edgecompress.errors import ConfigError
from edgecompress.finetune import FinetuneConfig, distill, distill_, distillation_loss, tensor_loader


def _teacher_and_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return teacher, student


def _gap(a, b, x):
    with torch.no_grad():
        return float((a(x) - b(x)).pow(2).mean())


@pytest.mark.parametrize("labelled", [True, False])
def test_distillation_brings_student_closer_to_teacher(labelled):
    teacher, student = _teacher_and_student()
    x = torch.randn(256, 16)
    y = teacher(x).argmax(1).detach() if labelled else None
    before = _gap(student, teacher, x)
    tuned, history = distill(student, teacher, tensor_loader(x, y, 32), FinetuneConfig(epochs=5, lr=3e-3, alpha=0.7))
    assert len(history["loss"]) == 5 and history["loss"][-1] < history["loss"][0]
    assert _gap(tuned, teacher, x) < 0.5 * before
    assert _gap(student, teacher, x) == pytest.approx(before)  # the original is untouched
    assert not tuned.training


def test_loader_of_plain_tensors_is_accepted():
    teacher, student = _teacher_and_student()
    batches = [torch.randn(8, 16) for _ in range(4)]
    history = distill_(student, teacher, batches, FinetuneConfig(epochs=1))
    assert history["epochs"] == 1


def test_loss_is_zero_for_identical_logits_without_labels():
    logits = torch.randn(4, 10)
    assert float(distillation_loss(logits, logits, None, FinetuneConfig())) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("epochs", -1, "epochs"), ("lr", 0, "learning rate"), ("temperature", 0, "temperature"), ("alpha", 1.5, "alpha")])
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**{field: value})


def test_empty_loader_and_bad_batches_are_refused():
    teacher, student = _teacher_and_student()
    with pytest.raises(ConfigError, match="no batches"):
        distill_(student, teacher, [], FinetuneConfig(epochs=1))
    with pytest.raises(ConfigError, match="must be x"):
        distill_(student, teacher, [(torch.randn(2, 16),) * 3], FinetuneConfig(epochs=1))
