"""drift/* in the reports: curves of the whole fine-tune in the run report, KL to the base in
both summaries."""

from __future__ import annotations

import pytest

from grail.trainer.analysis.report.html import render_diff_report, render_run_report
from grail.trainer.analysis.report.text import drift_rows, run_summary

pytest.importorskip("matplotlib")


def _records() -> list[dict]:
    out = []
    for i, step in enumerate((100, 200, 300)):
        out.append({"step": step, "time": 0.0, "metrics": {
            "param_change/relative_norm": 0.01,
            "sparse/kl_at_keep_0.1": 1e-4,
            "drift/relative_norm": 0.01 * (i + 1),
            "drift/norm_l2": 1.0 + i,
            "drift/exact_unchanged_ratio": 0.0,
            "drift/kl_base_now": 1e-3 * (i + 1),
            "drift/kl_now_base": 1.1e-3 * (i + 1),
            "drift/top1_agree": 0.9,
            "drift/sparse/kl_at_keep_0.01": 1e-3,
            "drift/sparse/kl_at_keep_0.01_random": 2e-3,
            "drift/lowrank/energy_at_r8": 0.5,
        }})
    return out


def test_run_report_plots_the_drift_families_and_reads_the_trend():
    html = render_run_report(_records(), "run.jsonl")
    assert "Drift from the base model" in html  # the drift family's section and its caption
    for key in ("drift/kl_base_now", "drift/relative_norm", "drift/sparse/kl_at_keep_0.01",
                "drift/lowrank/energy_at_r8"):
        assert key in html, key  # curves, or a row of a series constant over the run
    assert "at every step" in html  # drift/sparse and drift/lowrank are constant here
    rows = {q: (v, s) for q, v, s in run_summary(_records())}
    assert rows["KL to the base trend"][0] == "0.001 -> 0.003"
    assert "many small windows" in rows["KL to the base trend"][1]
    assert rows["KL to the base (last)"][0] == "0.003 (base || now), 0.0033 (now || base)"


def test_diff_summary_reads_the_kl_to_the_base():
    rows = {q: v for q, v, _ in drift_rows(_records()[0]["metrics"])}
    assert rows == {"Distance from the base": "1.0% relative L2",
                    "KL to the base": "0.001 (base || now), 0.0011 (now || base)"}
    doc = {"metrics": _records()[0]["metrics"], "compared": {"tensors": 1, "dtypes": {}}}
    assert "KL to the base" in render_diff_report(doc)
