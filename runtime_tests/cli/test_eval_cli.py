"""``--eval FILE.py:FUNCTION``: the user's task metric scores every variant of ``run`` and each fine-tuning
epoch; a wrong path, name or return value gets one line."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from edgecompress.errors import ConfigError
from edgecompress.user_eval import load_eval

METRIC = textwrap.dedent('''
    """Digits accuracy of an ONNX file on the first 120 test digits, through onnxruntime."""
    from edgecompress.data import run_onnx
    from edgecompress.models import digits

    def accuracy(path):
        x, y = digits.load_digits("test")
        out = run_onnx(path, x[:120].numpy())
        return float((out.argmax(1) == y[:120].numpy()).mean())

    def broken(path):
        raise RuntimeError("no such split")

    def text(path):
        return "good"

    def nan(path):
        return float("nan")

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def metric(tmp_path):
    path = tmp_path / "metric.py"
    path.write_text(METRIC)
    return path


def test_run_scores_every_variant_and_recommends_by_the_score(cli, tmp_path, metric):
    out = tmp_path / "o"
    result = cli("run", "-o", out, "--methods", "svd", "--ratio", "8", "--no-int8", "--no-plan", "--bench-runs", "3",
                 "--threads", "1", "--eval", f"{metric}:accuracy")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    scores = {v["name"]: v["score"] for v in data["variants"]}
    assert set(scores) == {"dense", "svd-x8"} and scores["dense"] >= 0.95
    assert 0 <= scores["svd-x8"] <= 1
    assert data["recommended"]["quality"] == scores[data["recommended"]["variant"]]
    assert "score (accuracy)" in (out / "report.md").read_text()


def test_fine_tuning_epochs_are_scored_by_the_users_function(cli, tmp_path, metric):
    out = tmp_path / "o"
    result = cli("run", "-o", out, "--methods", "svd", "--ratio", "8", "--no-int8", "--no-plan", "--bench-runs", "2",
                 "--threads", "1", "--finetune-epochs", "1", "--eval", f"{metric}:accuracy")
    assert result.exit_code == 0, result.output
    (variant,) = [v for v in json.loads((out / "report.json").read_text())["variants"] if v["name"] == "svd-x8"]
    epochs = variant["finetune"]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(0 <= e["score"] <= 1 for e in epochs)  # accuracies on 120 digits, not the held-out loss
    best = max(epochs, key=lambda e: e["score"])  # the first of equal scores: a tie is not better
    assert variant["finetune"]["kept_epoch"] == best["epoch"]
    assert "score (accuracy, --eval)" in (out / "report.md").read_text()


@pytest.mark.parametrize("spec,message", [
    ("metric.py", "--eval takes FILE.py:FUNCTION"),
    ("missing.py:accuracy", "does not exist"),
    ("{metric}:nosuch", "has no function 'nosuch'"),
    ("{metric}:NOT_A_FUNCTION", "is not a function"),
])
def test_a_wrong_eval_is_one_line_before_any_work(cli, tmp_path, metric, spec, message):
    out = tmp_path / "o"
    result = cli("run", "-o", out, "--no-int8", "--eval", spec.format(metric=metric))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_an_eval_file_that_does_not_import_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_here\n")
    with pytest.raises(ConfigError, match="failed to import: ModuleNotFoundError"):
        load_eval(f"{bad}:accuracy")


@pytest.mark.parametrize("name,message", [
    ("broken", "failed on m.onnx: RuntimeError: no such split"),
    ("text", "must return a number"),
    ("nan", "the score must be finite"),
])
def test_a_bad_score_is_one_line(metric, name, message):
    fn = load_eval(f"{metric}:{name}")
    with pytest.raises(ConfigError, match=message):
        fn("m.onnx")


def test_a_planned_variant_is_stepped_back_until_the_users_metric_holds(cli, tmp_path, metric):
    """params=12x on digits scores 43% by the user's metric; with --max-drop 0 the plan steps layers back
    towards dense, measuring each step, until it scores what dense scores, and says the target is missed."""
    out = tmp_path / "o"
    result = cli("run", "-o", out, "--methods", "svd", "--ratio", "8", "--target", "params=12x", "--max-drop", "0",
                 "--no-int8", "--bench-runs", "2", "--threads", "1", "--eval", f"{metric}:accuracy")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    dense = next(v for v in data["variants"] if v["name"] == "dense")
    plan = next(v for v in data["variants"] if v["name"] == "auto-params12x")["plan"]
    scores = [c["score"] for c in plan["eval"]["checks"]]
    assert plan["eval"]["metric"] == "accuracy (--eval)" and plan["eval"]["floor"] == pytest.approx(dense["score"], abs=1e-6)
    checks, floor = plan["eval"]["checks"], plan["eval"]["floor"]
    chosen = next(c for c in checks if c.get("chosen"))
    assert len(scores) >= 2 and scores[0] < floor <= chosen["score"] == plan["eval"]["measured"]
    # the most compressing choice that held, with more parameters than the first
    assert chosen["params"] == min(c["params"] for c in checks if c["score"] >= floor) > checks[0]["params"]
    assert not plan["met"] and "accuracy (--eval)" in plan["note"] and "params 12x" in plan["note"]


@pytest.mark.parametrize("onnx_input", [False, True], ids=["pytorch", "onnx"])
def test_plan_and_export_step_a_plan_back_by_the_users_metric_for_either_input(cli, tmp_path, metric, onnx_input):
    """--eval on export and plan, for a PyTorch model and for an ONNX file: the same checks, each on the whole
    model with the chosen chains in place (exported, or spliced into the file), until it scores at dense."""
    from edgecompress.models import digits

    dense, calib = tmp_path / "digits.onnx", tmp_path / "calib.npz"
    assert cli("export", "digits_cnn", "-o", dense).exit_code == 0
    np.savez(calib, images=digits.load_digits("train")[0][:73].numpy())
    model = dense if onnx_input else "digits_cnn"
    out, report = tmp_path / "planned.onnx", tmp_path / "r.json"
    bound = ("--target", "params=12x", "--eval", f"{metric}:accuracy", "--max-drop", "0", "--calib", calib)
    result = cli("export", model, *bound, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    plan = json.loads(report.read_text())["plan"]
    scores = [c["score"] for c in plan["eval"]["checks"]]
    assert plan["eval"]["floor"] == pytest.approx(load_eval(f"{metric}:accuracy")(dense), abs=1e-6)
    chosen = next(c for c in plan["eval"]["checks"] if c.get("chosen"))
    assert len(scores) >= 2 and scores[0] < plan["eval"]["floor"] <= chosen["score"] and not plan["met"]
    shown = cli("plan", model, *bound, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["plan"]["eval"]["checks"] == plan["eval"]["checks"]


@pytest.mark.parametrize("args, message", [
    (["--method", "svd", "--eval", "m.py:f"], "--eval bounds a --target plan"),
    (["--target", "params=2x", "--max-drop", "0.1"], "--max-drop is the drop of your metric"),
])
def test_eval_without_a_plan_is_one_line(cli, tmp_path, args, message):
    out = tmp_path / "x.onnx"
    result = cli("export", "digits_cnn", "-o", out, *args)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
