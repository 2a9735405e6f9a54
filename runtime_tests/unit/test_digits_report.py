"""The report renderers on a hand-made report: Pareto front, Markdown and self-contained HTML."""

import json
import re

import pytest

from edgecompress.report import ROW_KEYS, Report, Variant, pareto_front, write_report


def _variant(name, method, p50, accuracy, **kw):
    return Variant(name=name, method=method, latency_ms={"1": {"p50": p50, "p90": p50 * 1.2}}, accuracy=accuracy,
                   agreement=1.0, size_bytes=int(1e6 * p50), params=1000, macs=10**6, **kw)


@pytest.fixture
def report():
    variants = [
        _variant("dense", "dense", 1.0, 0.99, compression=1.0),
        _variant("tucker-x2", "tucker", 0.6, 0.985, ratio=2.0, compression=2.2, sqnr_db=18.0,
                 layers=[{"name": "conv|2", "type": "Conv2d", "method": "tucker", "ranks": [24, 24], "params_before": 100,
                          "params_after": 40, "macs_before": 1000, "macs_after": 400, "rel_error": 0.2}]),
        _variant("cp-x2", "cp", 0.7, 0.97, ratio=2.0, compression=2.0, sqnr_db=15.0),  # dominated by tucker-x2
        _variant("tucker-x4", "tucker", 0.4, 0.30, ratio=4.0, compression=4.1, sqnr_db=1.0, int8=True),
        Variant(name="tt-x2", method="tt", ratio=2.0, status="failed", error="factorize: <b>boom</b>"),
    ]
    return Report("toy", [1, 3, 8, 8], {"threads": [1], "provider": "cpu", "bench_runs": 5},
                  {"source": "test", "samples": 10, "labels": True}, variants)


def test_pareto_front_keeps_only_undominated_variants(report):
    assert pareto_front(report) == ["dense", "tucker-x2", "tucker-x4"]


def test_files_are_written_with_the_schema(report, tmp_path):
    paths = write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [v["name"] for v in data["variants"]] == ["dense", "tucker-x2", "cp-x2", "tucker-x4", "tt-x2"]
    assert all(set(ROW_KEYS) <= set(v) for v in data["variants"])
    assert data["pareto"] == ["dense", "tucker-x2", "tucker-x4"]
    md = paths["md"].read_text()
    assert "| tt-x2 | tt | 2 |" in md and "failed: factorize: <b>boom</b>" in md
    assert "## Layers of tucker-x2" in md and "conv\\|2" in md  # pipes escaped inside cells


def test_html_escapes_text_and_embeds_plots(report, tmp_path):
    html = write_report(report, tmp_path)["html"].read_text()
    assert "&lt;b&gt;boom&lt;/b&gt;" in html and "<b>boom</b>" not in html
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">', html)) == 2
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<script" not in html
    assert '<tr class="failed">' in html and '<tr class="front">' in html


def test_no_plots_without_latencies(report, tmp_path):
    for v in report.variants:
        v.latency_ms = {}
    html = write_report(report, tmp_path)["html"].read_text()
    assert "data:image/png" not in html and pareto_front(report) == []
