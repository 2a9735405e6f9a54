"""``edgecompress run``: the default model end to end, a failed variant reported, bad input refused."""

import json

import numpy as np
import pytest

from edgecompress.models import digits


def test_default_model_run_writes_reports_and_reports_failures(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("run", "-o", out, "--methods", "tucker,bogus", "--ratio", "2", "--no-int8", "--bench-runs", "3")
    assert result.exit_code == 0, result.output
    # the planned variant (default: params at the largest ratio) may use bogus too, so it fails with it
    assert "digits_cnn: 2 of 4 variants built" in result.output
    assert "bogus-x2 failed" in result.output and "unknown method 'bogus'" in result.output
    data = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["dense", "tucker-x2", "bogus-x2", "auto-params2x"]
    assert data["variants"][3]["status"] == "failed"
    pick = data["recommended"]  # the fastest variant within one point of dense accuracy
    assert pick["variant"] in ("dense", "tucker-x2") and "recommended: " in result.stdout
    assert data["variants"][0]["accuracy"] >= 0.95
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_data_file_without_labels_gives_agreement_only(cli, tmp_path):
    x, _ = digits.load_digits("test")
    np.savez(tmp_path / "unlabelled.npz", input=x[:40].numpy())
    out = tmp_path / "o"
    result = cli("run", "-o", out, "--data", tmp_path / "unlabelled.npz", "--methods", "tucker", "--ratio", "4",
                 "--no-int8", "--bench-runs", "2", "--threads", "1,2")
    assert result.exit_code == 0, result.output
    rows = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert rows["dense"]["accuracy"] is None and rows["dense"]["agreement"] == 1.0
    assert rows["tucker-x4"]["agreement"] > 0.5 and rows["tucker-x4"]["sqnr_db"] is not None
    assert set(rows["tucker-x4"]["latency_ms"]) == {"1", "2"}


def test_written_digits_split_is_a_valid_data_file(cli, tmp_path):
    path = digits.write_split(tmp_path / "digits.npz", "test", with_train=True)
    result = cli("run", "digits_cnn", "-o", tmp_path / "o", "--data", path, "--methods", "tucker", "--ratio", "2",
                 "--no-int8", "--bench-runs", "2")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["data"]["samples"] == 360 and data["data"]["train_samples"] == 1437


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1"], "every ratio must be above 1"),
    (["--threads", "one"], "bad --threads 'one'"),
    (["--threads", "0"], "threads must be positive"),
    (["--finetune-epochs", "-1"], "--finetune-epochs must be a whole number"),
    (["--methods", ","], "give at least one method"),
    (["--provider", "nosuch"], "unknown provider 'nosuch'"),
])
def test_bad_options_are_usage_errors(cli, tmp_path, args, message):
    result = cli("run", "-o", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_bad_data_file_is_refused_before_any_work(cli, tmp_path):
    np.savez(tmp_path / "wrong.npz", input=np.zeros((4, 3, 8, 8), np.float32))
    result = cli("run", "-o", tmp_path / "o", "--data", tmp_path / "wrong.npz")
    assert result.exit_code == 2 and "inputs have shape [4, 3, 8, 8], the model takes [N, 1, 32, 32]" in result.output
    result = cli("run", "-o", tmp_path / "o", "--data", tmp_path / "missing.npz")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert not (tmp_path / "o").exists()  # not even the empty folder


def test_calib_is_what_the_factors_are_fitted_to_and_int8_calibrated_on(cli, tmp_path):
    x, _ = digits.load_digits("train")
    np.savez(tmp_path / "calib.npz", any_key=x[:40].numpy())  # one input: the single array, whatever its key
    out = tmp_path / "o"
    result = cli("run", "-o", out, "--calib", tmp_path / "calib.npz", "--methods", "svd", "--ratio", "4",
                 "--no-plan", "--bench-runs", "2", "--threads", "1")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert f"factors fitted to 35 calibration samples from {tmp_path / 'calib.npz'}" in " ".join(data["notes"])
    assert "note: factors fitted to 35 calibration samples" in result.output  # the run's notes printed too
    rows = {v["name"]: v for v in data["variants"]}
    fitted = [layer for layer in rows["svd-x4"]["layers"] if layer["method"] != "dense"]
    assert fitted and all(layer["output_error"] is not None for layer in fitted)
    assert rows["svd-x4"]["accuracy"] >= 0.985 and rows["svd-x4-int8"]["accuracy"] >= 0.98


def test_calib_that_does_not_fit_the_model_is_refused_before_any_work(cli, tmp_path):
    np.savez(tmp_path / "wrong.npz", input=np.zeros((8, 3, 8, 8), np.float32))
    for calib, code, message in ((tmp_path / "wrong.npz", 2, "expected N samples of"),
                                 (tmp_path / "missing.npz", 1, "does not exist")):
        result = cli("run", "-o", tmp_path / "o", "--calib", calib)
        assert result.exit_code == code and message in result.output, result.output
        assert not (tmp_path / "o").exists()


def test_unknown_model_suggests_names(cli, tmp_path):
    result = cli("run", "digits_cn", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "did you mean 'digits_cnn'" in result.output


def test_a_run_without_data_says_its_agreement_is_on_random_inputs(tmp_path):
    import torch.nn as nn

    from edgecompress.pipeline import RunConfig, run

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    config = RunConfig(methods=("svd",), ratios=(2.0,), int8=False, threads=(1,), bench_runs=1, bench_warmup=0,
                       targets=(), min_params=1024)
    report = run(model, tmp_path / "out", config, input_shape=(1, 64))
    assert report.data["source"] == "random samples"
    assert any(note.startswith("no --data: agreement and SQNR are measured on seeded random inputs")
               for note in report.notes)
    with_data = run("digits_cnn", tmp_path / "digits", RunConfig(methods=("svd",), ratios=(4.0,), int8=False,
                                                                 threads=(1,), bench_runs=1, bench_warmup=0, targets=()))
    assert not any(note.startswith("no --data") for note in with_data.notes)  # the zoo entry's own data
