"""Knowledge distillation: the student moves towards the teacher, labels are optional, bad input is refused."""

import copy

import pytest
import torch
import torch.nn as nn

from edgecompress.errors import ConfigError
from edgecompress.finetune import FinetuneConfig, check_loss, distill, distill_, distillation_loss, output_kind, tensor_loader


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
    assert len(history["epochs"]) == 1 and history["loss_kind"] == "kl"


def test_loss_is_zero_for_identical_logits_without_labels():
    logits = torch.randn(4, 10)
    assert float(distillation_loss(logits, logits, None, FinetuneConfig())) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("epochs", -1, "epochs"), ("lr", 0, "learning rate"), ("temperature", 0, "temperature"), ("alpha", 1.5, "alpha"),
    ("minutes", 0, "time budget"), ("loss", "hinge", "unknown distillation loss"), ("feature_weight", -1, "feature")])
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**{field: value})


def test_empty_loader_and_bad_batches_are_refused():
    teacher, student = _teacher_and_student()
    with pytest.raises(ConfigError, match="no batches"):
        distill_(student, teacher, [], FinetuneConfig(epochs=1))
    with pytest.raises(ConfigError, match="must be x"):
        distill_(student, teacher, [(torch.randn(2, 16),) * 3], FinetuneConfig(epochs=1))


def test_the_loss_is_chosen_from_the_output():
    torch.manual_seed(0)
    logits = torch.randn(32, 10)
    assert output_kind(logits)[0] == "kl"
    assert output_kind(logits.softmax(-1))[0] == "kl" and output_kind(logits.log_softmax(-1))[0] == "kl"
    assert output_kind(torch.randn(32, 1))[0] == "mse"
    multilabel = (torch.rand(32, 6) > 0.5).float() * 0.9 + 0.05  # several labels on at once
    assert output_kind(multilabel)[0] == "bce"
    bins = torch.arange(360.0)
    peaks = torch.randint(20, 340, (32, 1)).float()
    binned = torch.exp(-((bins - peaks) / 3) ** 2) * 0.9  # CREPE-like: one blurred peak over 360 sigmoid bins
    kind, why = output_kind(binned)
    assert kind == "kl" and "binned regression" in why


def test_a_loss_that_cannot_apply_is_refused():
    with pytest.raises(ConfigError, match="bce needs probabilities"):
        check_loss("bce", torch.randn(4, 10))
    with pytest.raises(ConfigError, match="needs float scores"):
        check_loss("kl", torch.ones(4, 3, dtype=torch.int64))
    check_loss("mse", torch.randn(4, 1))


def test_the_best_held_out_epoch_is_kept_and_batchnorm_is_frozen():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student = copy.deepcopy(teacher)
    stats = teacher[1].running_mean.clone()
    scores = iter([0.9, 0.5, 0.4, 0.3])  # every epoch scores below the model before fine-tuning
    history = distill_(student, teacher, tensor_loader(torch.randn(64, 16) * 3, None, 16),
                       FinetuneConfig(epochs=3, lr=1e-2), evaluate=lambda _: next(scores))
    assert history["kept_epoch"] == 0 and "before fine-tuning" in history["note"]
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]  # stopped after 2 epochs without a better score
    assert torch.equal(student[1].running_mean, stats) and history["batchnorm"] == "frozen"
    assert torch.allclose(student[0].weight, teacher[0].weight)  # the kept state is the one before training


def test_an_epoch_that_scores_lower_is_undone_and_the_rate_halved():
    """Epoch 1 scores lower: the model goes back to epoch 0's weights before epoch 2, which runs at half the
    rate (the weights epoch 2 starts from are epoch 0's), and the history says so."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.add_(0.1 * torch.randn_like(student[0].weight))
    start = copy.deepcopy(student.state_dict())
    seen, scores = [], iter([0.5, 0.4, 0.9])

    def evaluate(model):
        seen.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    history = distill_(student, teacher, tensor_loader(torch.randn(64, 16), None, 16),
                       FinetuneConfig(epochs=2, lr=1e-2), evaluate=evaluate)
    assert [e.get("backed_off", False) for e in history["epochs"]] == [False, True, False]
    assert "epoch 1 scored lower: undone" in history["backed_off"] and history["kept_epoch"] == 2
    moved = [float((s["0.weight"] - start["0.weight"]).abs().max()) for s in seen[1:]]
    assert moved[0] > 0 and moved[1] > 0  # both epochs trained, epoch 2 from epoch 0's weights at half the rate


def test_the_feature_term_reads_each_factorized_layer():
    from edgecompress.factorize import FactorizeConfig, factorize

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    student, _ = factorize(teacher, FactorizeConfig(method="svd", rank=8, min_outputs=0))
    history = distill_(student, teacher, tensor_loader(torch.randn(64, 64), None, 16), FinetuneConfig(epochs=1))
    assert history["epochs"][0]["feature"] > 0 and history["feature_weight"] == 0.1
