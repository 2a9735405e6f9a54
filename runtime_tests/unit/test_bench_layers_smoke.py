"""Smoke test of benchmarks/layers.py: the --quick path on one tiny conv, end to end (about 10 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgecompress.exporters import CHAIN_OPS
from edgecompress.factorize import methods

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "layers.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "layers.md"
    chosen = [m for m in ("svd", "tucker") if m in methods()]
    proc = _run("--quick", "--case", "conv16@8", "--methods", ",".join(chosen), "--ratios", "4", "--threads", "1",
                "--out", str(out))
    return proc, out, chosen


def test_quick_run_writes_markdown_with_command(quick_run):
    proc, out, chosen = quick_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# Layer benchmark")
    assert "Command: `python benchmarks/layers.py --quick --case conv16@8" in text
    assert "## Conv2d 3x3 16->16 @ 8x8" in text
    for method in chosen:
        assert f"| {method} | 4 |" in text


def test_quick_run_json_has_timings_and_ratios(quick_run):
    proc, out, chosen = quick_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    (case,) = data["cases"]
    assert case["dense"]["timing"]["1"]["median_ms"] > 0
    assert case["dense"]["params"] == 16 * 16 * 9 + 16
    ours = [v for v in case["variants"] if v["family"] == "edgecompress"]
    assert [v["method"] for v in ours] == chosen
    for v in ours:
        assert "skip" not in v, v.get("skip")
        assert v["param_ratio"] > 2.5 and v["mac_ratio"] > 2.5
        assert v["speedup"]["1"] > 0
        assert v["efficiency"]["1"] == pytest.approx(v["speedup"]["1"] / v["mac_ratio"])
        assert set(v["ops"]) <= CHAIN_OPS
        assert v["parity_max_abs"] < 1e-4


def test_quick_run_has_tltorch_peers(quick_run):
    pytest.importorskip("tltorch")
    proc, out, _ = quick_run
    data = json.loads(out.with_suffix(".json").read_text())
    peers = {v["method"]: v for v in data["cases"][0]["variants"] if v["family"] == "tltorch"}
    assert set(peers) == {"tltorch tucker", "tltorch cp", "tltorch tt"}
    for v in peers.values():
        assert "skip" not in v, v.get("skip")
        assert 3 < v["param_ratio"] < 6  # matched to about 4x
        assert v["speedup"]["1"] > 0


def test_bad_case_is_a_usage_error(tmp_path):
    proc = _run("--quick", "--case", "conv16", "--out", str(tmp_path / "x.md"))
    assert proc.returncode == 2
    assert "use conv<C>@<HW> or linear<in>x<out>r<rows>" in proc.stderr
    assert not (tmp_path / "x.md").exists()
