"""The HTML reports: figures present when their data is, self-contained, readable words, renders."""

from __future__ import annotations

import base64
import copy
import re
import struct
import sys

import pytest

pytest.importorskip("matplotlib")

from grail.trainer.analysis.cli import main
from grail.trainer.analysis.offline.diff import DiffOptions, run_diff
from grail.trainer.analysis.report.html import render_diff_report, render_run_report
from grail.trainer.analysis.report.plots import require_matplotlib
from grail.trainer.analysis.report.text import (
    diff_summary,
    metric_rows,
    pct,
    unchanged_sentence,
)

from ..checkpoints import save_pair
from .browser import check_renders, needs_chromium

IMG = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """A real diff without low-rank or principal keys (each test adds what it needs)."""
    root = tmp_path_factory.mktemp("pair")
    _, _, bdir, tdir = save_pair(root, shard=True)
    doc = run_diff(DiffOptions(str(bdir), str(tdir), low_rank=False, principal=False,
                               progress=False))
    assert not any(k.startswith(("lowrank/", "principal/")) for k in doc["metrics"])
    return doc


def _with(result, **metrics):
    doc = copy.deepcopy(result)
    doc["metrics"].update(metrics)
    return doc


SPARSE = {
    "sparse/kl_at_keep_0.1": 0.002, "sparse/kl_at_keep_0.1_random": 0.02,
    "sparse/kept_ratio_at_keep_0.1": 0.1, "sparse/top1_agree_at_keep_0.1": 0.97,
    "sparse/kl_at_keep_0.5": 1e-4, "sparse/kl_at_keep_0.5_random": 1.2e-4,
    "sparse/kept_ratio_at_keep_0.5": 0.5, "sparse/tokens": 40.0,
}
LOWRANK = {
    "lowrank/energy_at_r1": 0.3, "lowrank/energy_at_r8": 0.7, "lowrank/energy_at_r64": 1.0,
    "lowrank/component/q_proj/energy_at_r1": 0.5, "lowrank/component/q_proj/energy_at_r8": 0.9,
    "lowrank/stable_rank": 3.2, "lowrank/param_ratio_at_r1": 0.05,
    "lowrank/param_ratio_at_r8": 0.4,
}
PRINCIPAL = {
    "principal/energy_in_top1": 0.02, "principal/energy_in_top1_random": 0.001,
    "principal/energy_in_top8": 0.1, "principal/energy_in_top8_random": 0.06,
    "principal/component/q_proj/energy_in_top1": 0.05,
    "principal/component/q_proj/energy_in_top1_random": 0.001,
    "principal/subspace_overlap_top8": 0.99,
}
LOWRANK_QUALITY = {
    "lowrank/kl_at_r1": 0.05, "lowrank/kl_at_r8": 0.004,
    "sparse/kl_at_budget_r1": 0.01, "sparse/kl_at_budget_r8": 0.001,
}


@pytest.mark.parametrize(
    ("extra", "per_layer", "images"),
    [
        ({}, True, 3),  # threshold curve, two heatmaps
        ({}, False, 1),
        (SPARSE, True, 4),  # + KL vs kept fraction
        (LOWRANK, False, 2),  # + energy curves
        (PRINCIPAL, False, 2),  # + principal energy against k
        ({**SPARSE, **LOWRANK, **LOWRANK_QUALITY, **PRINCIPAL}, True, 6),
    ],
)
def test_figures_follow_the_available_metrics(result, extra, per_layer, images):
    doc = _with(result, **extra)
    doc["arguments"]["per_layer"] = per_layer
    html = render_diff_report(doc)
    assert html.count("<img") == images
    payloads = IMG.findall(html)
    assert len(payloads) == images
    for b64 in payloads:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 200 and height > 150


def test_report_is_self_contained_and_escaped(result):
    doc = copy.deepcopy(result)
    doc["inputs"]["base"]["path"] = "<b>odd & path</b>"
    doc["notes"] = ["a note with <angle> brackets"]
    html = render_diff_report(doc)
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", html)
    assert "&lt;b&gt;odd &amp; path&lt;/b&gt;" in html and "<b>odd" not in html
    assert "a note with &lt;angle&gt; brackets" in html
    assert html.count("<tr>") > len(doc["metrics"])  # every metric listed


def test_summary_words(result):
    assert "the sparsity is rounding" in unchanged_sentence(0.03, 0.92, "float32")
    assert "stored in bf16" in unchanged_sentence(0.9, 0.9, "bfloat16")
    assert "the update itself is sparse" in unchanged_sentence(0.8, 0.85, "float32")
    assert "the update is dense" in unchanged_sentence(0.01, 0.05, "float32")
    assert (pct(0.25), pct(2e-5), pct(1.0)) == ("25.0%", "0.002%", "100.0%")
    rows = {q: (v, s) for q, v, s in diff_summary(_with(result, **SPARSE, **LOWRANK))}
    exact = result["metrics"]["param_change/exact_unchanged_ratio"]
    assert rows["Unchanged entries"][0].startswith(pct(exact))
    assert "float32" in rows["Compared"][1] and "27 tensors" in rows["Compared"][0]
    assert "10x closer than a random mask" in rows["Keep the largest 10.0% of changes"][1]
    assert "about as close as a random mask" in rows["Keep the largest 50.0% of changes"][1]
    assert "rank 1 keeps 30.0%, rank 64 keeps 100.0%" in rows["Low-rank energy"][1]
    assert rows["Largest layer"][0] in ("layer_0", "layer_1")
    lora = {q: s for q, _, s in metric_rows({**LOWRANK_QUALITY}, None)}
    assert "a magnitude mask of the same parameter budget does 5x better" in lora["LoRA rank 1"]


def test_run_report(tmp_path):
    records = [
        {"step": s, "time": 0.0, "metrics": {
            "param_change/relative_norm": 1e-3 / (i + 1),
            "param_change/exact_unchanged_ratio": 0.9, "param_change/bf16_unchanged_ratio": 0.9,
            "param_change/layer_0/mean_abs_delta": 1e-5 * (i + 1),
            "gradient/norm_l2": 2.0 + i,
        }}
        for i, s in enumerate((50, 100, 150))
    ]
    html = render_run_report(records, "<run>.jsonl")
    assert html.count("<img") == 4  # headline, param_change, its layer heatmap, gradient
    assert "shrinking" in html and "&lt;run&gt;.jsonl" in html


def _sections(html):
    return re.findall(r"<section id='([^']+)'>", html)


def test_diff_report_opens_with_the_headline_then_families_in_order(result):
    html = render_diff_report(_with(result, **SPARSE, **LOWRANK, **LOWRANK_QUALITY))
    assert _sections(html) == ["headline", "summary", "family-param_change", "family-sparse",
                               "family-lowrank"]
    head = html[html.index("id='headline'"):html.index("id='summary'")]
    m = result["metrics"]
    assert re.findall(r"<div class='t'>([^<]+)</div>", head) == [
        "Update size", "Unchanged entries", "KL: largest 10% vs random 10%"]
    assert f"{pct(m['param_change/relative_norm'])} relative L2" in head
    assert (f"{pct(m['param_change/exact_unchanged_ratio'])} stored, "
            f"{pct(m['param_change/bf16_unchanged_ratio'])} bf16 view") in head
    assert "0.002 largest 10%, 0.02 random" in head and "10x closer than a random mask" in head
    assert "KL to base" not in head
    for family in ("param_change", "sparse", "lowrank"):
        part = html[html.index(f"id='family-{family}'"):]
        assert part.index("How to read this:") < part.index("</section>")
    drifted = render_diff_report(_with(result, **{"drift/kl_base_now": 0.03}))
    head = drifted[drifted.index("id='headline'"):drifted.index("id='summary'")]
    assert "KL to base" in head and "0.03 KL(base || now)" in head
    assert "family-drift" in _sections(drifted)


def test_diff_report_of_identical_checkpoints_says_no_entry_moved(tmp_path):
    _, _, bdir, _ = save_pair(tmp_path)
    doc = run_diff(DiffOptions(str(bdir), str(bdir), low_rank=False, principal=False,
                               progress=False))
    html = render_diff_report(_with(doc, **{"sparse/kl_at_keep_0.1": 0.0,
                                            "sparse/kl_at_keep_0.1_random": 0.0,
                                            "sparse/kept_ratio_at_keep_0.1": 0.0}))
    assert "No entry moved: the weights are identical in the analysed parameters" in html
    assert "Nothing to keep: no entry moved." in html and "No layer moved" in html
    assert "the update itself is sparse" not in html and "infx" not in html


def test_diff_report_reads_the_mask_against_the_base(result):
    html = render_diff_report(_with(result, **SPARSE, **{
        "drift/kl_now_base": 0.0025, "drift/kl_base_now": 0.003, "drift/top1_agree": 0.95}))
    head = html[html.index("id='headline'"):html.index("id='summary'")]
    assert "Partway from the base to the tuned model (KL 0.002 nats/token, recovering 20.0% of " \
        "the base&#x27;s 0.0025)" in head
    summary = html[html.index("id='summary'"):]
    assert "Close to the tuned model" not in summary and "Partway from the base" in summary
    assert "Practically the tuned model (KL 0.0001 nats/token, recovering 96.0%" in summary


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"grail-analysis\[plot\]"):
        require_matplotlib()
    (tmp_path / "run.jsonl").write_text('{"step": 1, "time": 0, "metrics": {"a/b": 1}}\n')
    for argv in (["diff", "x", "y", "--out", str(tmp_path / "o")],
                 ["plot", str(tmp_path / "run.jsonl"), "--out", str(tmp_path / "o")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'grail-analysis[plot]'" in err


@pytest.mark.slow
@needs_chromium
def test_report_renders_in_headless_chromium_without_console_errors(result, tmp_path):
    html = render_diff_report(_with(result, **SPARSE, **LOWRANK, **LOWRANK_QUALITY))
    assert html.count("<img") == 5
    dom = check_renders(html, tmp_path)
    assert "Checkpoint diff" in dom
