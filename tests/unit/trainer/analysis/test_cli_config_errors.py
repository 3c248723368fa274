"""``grail-analysis diff`` with option values the config rejects: one line on stderr, exit 1.

The config is built before any checkpoint is opened, so the checkpoint paths need not exist.
"""

from __future__ import annotations

import pytest

from grail.trainer.analysis.cli import main


def _diff_error(tmp_path, capsys, *options: str) -> str:
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    rc = main(["diff", base, tuned, "--out", str(tmp_path / "out"), *options])
    captured = capsys.readouterr()
    assert rc == 1, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("grail-analysis: error: AnalysisConfig."), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_keep_ratios_with_the_same_key_label(tmp_path, capsys):
    line = _diff_error(tmp_path, capsys, "--keep-ratios", "0.1", "0.1000000001")
    assert "sparse_quality_keep_ratios" in line
    assert "0.1 and 0.1000000001" in line and "'keep_0.1'" in line


def test_thresholds_with_the_same_key_label(tmp_path, capsys):
    line = _diff_error(tmp_path, capsys, "--thresholds", "1.5e-6", "2e-6")
    assert "param_change_thresholds" in line and "1.5e-06 and 2e-06" in line


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--keep-ratios", "0.1", "0.1"], "0.1 is given twice"),
        (["--keep-ratios", "1.5"], "(got 1.5)"),
        (["--thresholds=-1e-6"], "(got -1e-06)"),
        (["--ranks", "0"], "(got 0)"),
    ],
)
def test_other_invalid_values(tmp_path, capsys, options, fragment):
    line = _diff_error(tmp_path, capsys, *options)
    assert fragment in line
    flag = options[0].split("=")[0]
    assert line.endswith(f"(set by {flag})"), line  # the option the user typed


def test_a_long_list_is_cut_in_the_error_line(tmp_path, capsys):
    ratios = [f"{i / 1000:g}" for i in range(1, 1000)] + ["0.1000000001"]
    line = _diff_error(tmp_path, capsys, "--keep-ratios", *ratios)
    assert "(1000 values)" in line and "0.1 and 0.1000000001" in line
    assert len(line) < 600, len(line)
