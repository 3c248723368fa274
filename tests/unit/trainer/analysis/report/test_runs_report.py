"""The run report and ``grail-analysis plot`` with one run or several: the headline first,
constant series folded instead of plotted, runs overlaid with absent keys shown as absent, the
data in the page equal to the logs."""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("matplotlib")

from grail.trainer.analysis.cli import main
from grail.trainer.analysis.integrations.sinks import JsonlSink, read_jsonl
from grail.trainer.analysis.report.headline import entries, headline_label
from grail.trainer.analysis.report.runs import render_run_report, render_runs_report
from grail.trainer.analysis.report.series import (
    Run,
    fold_text,
    is_constant,
    layer_grid,
    line_panels,
)
from grail.trainer.analysis.report.text import pct

from .browser import check_renders, needs_chromium

P = "param_change/"


def _records(steps, missing=(), scale=1.0):
    """A plausible log: varying sizes and KLs, constant counts, per-layer keys."""
    out = []
    for i, step in enumerate(steps):
        m = {
            P + "relative_norm": scale * 1e-2 / (i + 1),
            P + "norm_l2": scale * 3.0 / (i + 1),
            P + "exact_unchanged_ratio": 0.02 + 0.001 * i,
            P + "bf16_unchanged_ratio": 0.6 + 0.01 * i,
            P + "nonfinite_count": 0.0,
            P + "num_params": 1000.0,
            P + "layer_0/mean_abs_delta": 1e-4 * (i + 1),
            P + "layer_1/mean_abs_delta": 2e-4 * (i + 1),
            "sparse/kl_at_keep_0.01": 0.05 * (i + 1) * scale,
            "sparse/kl_at_keep_0.01_random": 0.2 * (i + 1),
            "sparse/kl_at_keep_0.1": 0.01 * (i + 1) * scale,
            "sparse/kl_at_keep_0.1_random": 0.08 * (i + 1),
            "sparse/kept_ratio_at_keep_0.1": 0.1,
            "sparse/tokens": 64.0,
            "gradient/norm_l2": 1.0 + math.sin(i),
            "drift/kl_base_now": 0.001 * (i + 1),
        }
        for key in missing:
            m.pop(key)
        out.append({"step": step, "time": 0.0, "metrics": m})
    return out


def _data(html):
    start = '<script type="application/json" id="grail-runs">'  # as the reference documents it
    assert html.count(start) == 1, "no data block"
    return json.loads(html.split(start, 1)[1].split("</script>", 1)[0])


def _drawn(html):
    """The keys drawn in each figure (``data-keys``), by section."""
    out = {}
    for sec in re.findall(r"<section id='([^']+)'>(.*?)</section>", html, re.S):
        out[sec[0]] = [k for f in re.findall(r"data-keys='([^']*)'", sec[1])
                       for k in json.loads(f.replace("&quot;", '"'))]
    return out


def test_headline_comes_first_and_constant_series_are_not_plotted():
    html = render_run_report(_records((10, 20, 30)), "run.jsonl")
    sections = re.findall(r"<section id='([^']+)'>", html)
    assert sections == ["headline", "summary", "family-param_change", "family-sparse",
                        "family-drift", "family-gradient", "last"]
    drawn = _drawn(html)
    assert drawn["headline"] == [
        P + "relative_norm", P + "exact_unchanged_ratio", P + "bf16_unchanged_ratio",
        "sparse/kl_at_keep_0.1", "sparse/kl_at_keep_0.1_random", "drift/kl_base_now"]
    everything = [k for keys in drawn.values() for k in keys]
    for key, text in ((P + "nonfinite_count", "0 at every step (3 measurements)"),
                      (P + "num_params", "1,000 at every step (3 measurements)"),
                      ("sparse/kept_ratio_at_keep_0.1", "0.1 at every step (3 measurements)"),
                      ("sparse/tokens", "64 at every step (3 measurements)")):
        assert key not in everything
        assert f"<td>{key}</td><td class='v'>{text}</td>" in html
    assert P + "norm_l2" in drawn["family-param_change"]
    assert "sparse/kl_at_keep_0.01_random" in drawn["family-sparse"]
    # the headline's cards hold the last values, in the order of the panel
    head = html[:html.index("id='summary'")]
    assert re.findall(r"<div class='t'>([^<]+)</div>", head) == [
        "Update size", "Unchanged entries", "KL: largest 10% vs random 10%", "KL to base"]
    assert "0.3% relative L2" in head and "0.03 largest 10%, 0.24 random" in head
    assert html.count("<img") == 1 + 1 + 1 + 1 + 1 + 1  # headline, 4 families, layer heatmap


def test_headline_label_and_entries():
    keep = {"sparse/kl_at_keep_0.01", "sparse/kl_at_keep_0.5", "sparse/kl_at_keep_0.05"}
    assert headline_label([keep]) == "keep_0.05"  # closest to 10% on a log scale
    assert headline_label([{"sparse/kl_at_keep_0.01"}, keep]) == "keep_0.01"  # in most runs
    thresholds = {"sparse/kl_at_0e+00", "sparse/kl_at_1e-04", "sparse/kl_at_1e-06",
                  "sparse/kl_at_budget_r8", "drift/sparse/kl_at_keep_0.1"}
    assert headline_label([thresholds]) == "1e-06"
    assert headline_label([{"sparse/kl_at_0e+00"}]) == "0e+00"
    assert headline_label([{P + "norm_l2"}]) is None
    assert [e.title for e in entries([{P + "norm_l2", "drift/kl_now_base"}])] == ["KL to base"]
    assert entries([set()]) == []


def test_series_helpers():
    assert is_constant([(1, math.nan), (2, math.nan)]) and not is_constant([(1, 0.0), (2, 1.0)])
    assert not is_constant([(1, math.nan), (2, 0.0)]) and not is_constant([])
    assert fold_text([(5, 0.25)]) == "0.25 at its only measurement (step 5)"
    one = Run("a", "a.jsonl", _records((10, 20)))
    (panel,) = line_panels([one], ["sparse/kl_at_keep_0.01", "sparse/kl_at_keep_0.01_random",
                                   "sparse/kl_at_keep_0.1", "sparse/kl_at_keep_0.1_random"])
    assert panel.title == "sparse/kl" and panel.logy and panel.absent == []
    assert [(ln.label, ln.color, ln.style) for ln in panel.lines] == [
        ("keep_0.01", 0, "solid"), ("keep_0.01 random", 0, "dashed"),
        ("keep_0.1", 1, "solid"), ("keep_0.1 random", 1, "dashed")]
    two = Run("b", "b.jsonl", _records((30,), missing=("sparse/kl_at_keep_0.1_random",)))
    panels = line_panels([one, two], ["sparse/kl_at_keep_0.1", "sparse/kl_at_keep_0.1_random"])
    assert [p.title for p in panels] == ["sparse/kl_at_keep_0.1"]
    assert [(ln.label, ln.color, ln.style) for ln in panels[0].lines] == [
        ("a", 0, "solid"), ("b", 1, "solid"), ("a random", 0, "dashed")]
    (gradient,) = line_panels([one, Run("c", "c", [{"step": 1, "metrics": {"x/y": 1.0}}])],
                              ["gradient/norm_l2"])
    assert gradient.absent == ["c"] and [ln.label for ln in gradient.lines] == ["a"]
    layers, steps, values = layer_grid(one, "param_change")
    assert (layers, steps, values) == (["layer_0", "layer_1"], [10, 20],
                                       [[1e-4, 2e-4], [2e-4, 4e-4]])
    assert layer_grid(one, "gradient") is None
    deep = Run("d", "d", [{"step": 1, "metrics": {
        f"drift/{g}/mean_abs_delta": float(i) for i, g in enumerate(
            ["layer_10", "layer_2", "encoder.block.layer_1", "decoder.block.layer_0"])}}])
    layers, _, values = layer_grid(deep, "drift")
    assert layers == ["layer_2", "layer_10", "decoder.block.layer_0", "encoder.block.layer_1"]
    assert values == [[1.0], [0.0], [3.0], [2.0]]


def _write(path, records):
    sink = JsonlSink(path)
    for rec in records:
        sink.log(rec["metrics"], step=rec["step"])
    sink.close()


def _two_runs(tmp_path):
    a = _records((10, 20, 30, 40))
    a[1]["metrics"]["sparse/kl_at_keep_0.1"] = math.nan  # logged as null: a gap, not a zero
    b = _records((30, 60, 90), missing=("gradient/norm_l2",), scale=3.0)
    _write(tmp_path / "runs" / "fp32" / "analysis.jsonl", a)
    _write(tmp_path / "runs" / "bf16" / "analysis.jsonl", b)
    return [tmp_path / "runs" / d / "analysis.jsonl" for d in ("fp32", "bf16")]


def _check_data(data, paths, labels):
    assert [r["label"] for r in data["runs"]] == labels
    for run, path in zip(data["runs"], paths, strict=True):
        assert run["source"] == str(path)
        expected: dict = {}
        for rec in read_jsonl(path):
            for key, value in rec["metrics"].items():
                expected.setdefault(key, []).append(
                    [rec["step"], None if math.isnan(value) else value])
        drawn = {k: v for k, v in expected.items() if "/layer_" not in k}
        assert run["series"] == drawn
    assert "gradient/norm_l2" in data["runs"][0]["series"]
    assert "gradient/norm_l2" not in data["runs"][1]["series"]  # absent, not zeros
    assert data["runs"][0]["series"]["sparse/kl_at_keep_0.1"][1] == [20, None]


def test_plot_overlays_runs_and_the_page_holds_the_logged_data(tmp_path, capsys):
    paths = _two_runs(tmp_path)
    assert main(["plot", *map(str, paths), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().err == ""
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Training runs compared: fp32/analysis, bf16/analysis" in html
    _check_data(_data(html), paths, ["fp32/analysis", "bf16/analysis"])
    assert "gradient/norm_l2" in _drawn(html)["family-gradient"]
    head = html[:html.index("id='summary'")]
    assert f"fp32/analysis: {pct(1e-2 / 4)} relative L2" in head
    assert f"bf16/analysis: {pct(3e-2 / 3)} relative L2" in head
    # constant in both runs with the same value: one short row; per-run heatmaps
    assert "<td>param_change/num_params</td><td class='v'>1,000 at every step of every run" in html
    assert html.count("param_change/layer_*/mean_abs_delta") == 2
    assert main(["plot", *map(str, paths), "--out", str(tmp_path / "r"),
                 "--labels", "fp32", "bf16"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    _check_data(_data(html), paths, ["fp32", "bf16"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--labels", "a"], r"--labels has 1 labels for 2 run logs"),
        (["--labels", "a", "a"], r"--labels has 'a' twice"),
        (["--labels", "a", " "], r"--labels has an empty label"),
    ],
)
def test_plot_label_errors_are_one_line(tmp_path, capsys, extra, match):
    paths = _two_runs(tmp_path)
    assert main(["plot", *map(str, paths), "--out", str(tmp_path / "r"), *extra]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and re.search(match, err), err
    assert not (tmp_path / "r" / "report.html").exists()


def test_plot_names_the_bad_log_among_several(tmp_path, capsys):
    paths = _two_runs(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    for bad, match in ((tmp_path / "none.jsonl", "does not exist"),
                       (tmp_path / "empty.jsonl", "holds no measurements")):
        assert main(["plot", str(paths[0]), str(bad), "--out", str(tmp_path / "r")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(bad) in err and match in err


def test_render_runs_report_refuses_clashing_labels():
    run = Run("a", "a.jsonl", _records((1, 2)))
    with pytest.raises(ValueError, match="distinct"):
        render_runs_report([run, run])
    with pytest.raises(ValueError, match="at least one run"):
        render_runs_report([])


@pytest.mark.slow
@needs_chromium
def test_multi_run_report_renders_in_headless_chromium(tmp_path, capsys):
    paths = _two_runs(tmp_path)
    assert main(["plot", *map(str, paths), "--out", str(tmp_path / "r"),
                 "--labels", "fp32", "bf16"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    dom = check_renders(html, tmp_path)
    _check_data(_data(dom), paths, ["fp32", "bf16"])  # the data as the browser holds it
    assert "Training runs compared: fp32, bf16" in dom
