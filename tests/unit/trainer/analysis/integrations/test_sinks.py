"""JsonlSink / read_jsonl / WandbSink / MetricSink, and the lazy integrations package."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from grail.trainer.analysis.integrations import JsonlSink, MetricSink, WandbSink, read_jsonl


def test_jsonl_round_trip_appends_and_skips_empty(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    sink = JsonlSink(path)
    sink.log({"a/x": 1.5, "a/y": np.float32(0.25)}, step=10)
    sink.log({}, step=11)
    sink.log({"a/x": math.nan, "a/z": math.inf}, step=12)
    sink.close()
    sink.close()  # idempotent
    with JsonlSink(path) as again:  # an existing file is appended to
        again.log({"a/x": -3.0}, step=20)

    lines = path.read_text().splitlines()
    assert len(lines) == 3
    raw = [json.loads(line) for line in lines]  # strict JSON: no NaN/Infinity tokens
    assert raw[1]["metrics"] == {"a/x": None, "a/z": None}
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [10, 12, 20]
    assert records[0]["metrics"] == {"a/x": 1.5, "a/y": 0.25}
    assert math.isnan(records[1]["metrics"]["a/x"]) and math.isnan(records[1]["metrics"]["a/z"])
    assert records[2]["metrics"] == {"a/x": -3.0}
    times = [r["time"] for r in records]
    assert times == sorted(times) and all(t > 1e9 for t in times)


def test_jsonl_flushes_every_line(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.log({"k": 1.0}, step=1)
    # Another reader sees the line before close(): a crash now would not lose it.
    assert [r["metrics"] for r in read_jsonl(path)] == [{"k": 1.0}]
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.log({"k": 2.0}, step=2)


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path):
    path = tmp_path / "m.jsonl"
    with JsonlSink(path) as sink:
        sink.log({"k": 1.0}, step=1)
        sink.log({"k": 2.0}, step=2)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - 7])  # the process died while writing line 2
    assert [r["step"] for r in read_jsonl(path)] == [1]
    with JsonlSink(path) as sink:  # reopening drops the partial line
        sink.log({"k": 3.0}, step=3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    assert len(path.read_text().splitlines()) == 2


def test_partial_only_line_is_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "ti')
    assert read_jsonl(path) == []
    with JsonlSink(path) as sink:
        sink.log({"k": 1.0}, step=5)
    assert [r["step"] for r in read_jsonl(path)] == [5]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "time": 0, "metrics": {}}\nnot json\n'
                    '{"step": 2, "time": 0, "metrics": {}}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


class _FakeRun:
    def __init__(self):
        self.calls = []

    def log(self, payload, step=None):
        self.calls.append((payload, step))


def test_wandb_sink_logs_prefixed_floats_histograms_and_step():
    wandb = pytest.importorskip("wandb")
    run = _FakeRun()
    sink = WandbSink(run, prefix="analysis/")
    sink.log({"param_change/norm_l2": np.float64(2.5)}, step=7)
    sink.log({}, step=8)  # nothing to log: no call
    values = np.arange(10.0)
    sink.log({"x": 1}, step=9, histograms={"gradient/hist": values})
    sink.close()
    assert len(run.calls) == 2
    payload, step = run.calls[0]
    assert step == 7 and payload == {"analysis/param_change/norm_l2": 2.5}
    assert type(payload["analysis/param_change/norm_l2"]) is float
    payload, step = run.calls[1]
    assert step == 9 and payload["analysis/x"] == 1.0
    hist = payload["analysis/gradient/hist"]
    assert isinstance(hist, wandb.Histogram)
    assert sum(hist.histogram) == len(values)


def test_wandb_sink_without_run_says_what_to_do(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(RuntimeError, match=r"wandb\.init"):
        WandbSink().log({"a": 1.0}, step=1)


def test_wandb_sink_names_the_extra_when_wandb_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"grail-analysis\[wandb\]"):
        WandbSink()


def test_sinks_satisfy_the_protocol(tmp_path):
    class Mine:
        def log(self, metrics, step):
            pass

        def close(self):
            pass

    with JsonlSink(tmp_path / "m.jsonl") as sink:
        assert isinstance(sink, MetricSink)
    assert isinstance(Mine(), MetricSink)
    assert not isinstance(object(), MetricSink)


@pytest.mark.slow
def test_importing_the_packages_loads_no_heavy_library():
    code = (
        "import sys, grail.trainer.analysis, grail.trainer.analysis.integrations as i\n"
        "i.JsonlSink, i.read_jsonl, i.MetricSink, i.WandbSink\n"
        "heavy = [m for m in ('transformers', 'wandb', 'trl', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'ModelAnalysisCallback' in dir(i)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
