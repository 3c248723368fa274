"""TensorBoardSink: scalars and histograms read back from the event file."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.integrations import MetricSink, TensorBoardSink


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_scalars_and_histogram_round_trip(tmp_path):
    sink = TensorBoardSink(tmp_path / "run", prefix="analysis/")
    assert isinstance(sink, MetricSink)
    values = np.array([0.5, -1.0, 2.0, np.nan, np.inf, 3.0])
    sink.log({"param_change/norm_l2": 0.25, "sparse/kl_at_1e-06": np.float32(1.5)}, step=10)
    sink.log({"param_change/norm_l2": 0.125, "sparse/kl_at_1e-06": math.nan}, step=20,
             histograms={"gradient/abs_grad": torch.tensor(values), "empty": [math.nan]})
    sink.log({}, step=25)

    # Flushed after each measurement: readable before close().
    events = read_events(tmp_path / "run")
    norm = events.Scalars("analysis/param_change/norm_l2")
    assert [(e.step, e.value) for e in norm] == [(10, 0.25), (20, 0.125)]
    kl = events.Scalars("analysis/sparse/kl_at_1e-06")
    assert [e.step for e in kl] == [10, 20] and kl[0].value == 1.5 and math.isnan(kl[1].value)

    hist = events.Histograms("analysis/gradient/abs_grad")
    assert [h.step for h in hist] == [20]
    h = hist[0].histogram_value
    finite = values[np.isfinite(values)]
    assert h.num == finite.size  # NaN and Inf dropped
    assert (h.min, h.max) == (finite.min(), finite.max())
    assert h.sum == pytest.approx(finite.sum())
    assert h.sum_squares == pytest.approx((finite**2).sum())
    assert "analysis/empty" not in events.Tags()["histograms"]  # nothing finite: skipped

    sink.close()
    sink.close()  # idempotent
    sink.log({"k": 1.0}, step=30)  # dropped, never raised into training (see below)


def test_the_analysis_of_a_training_loop(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    analyzer = ModelAnalysisManager.create(AnalysisConfig(
        interval=3, sparse_quality_enabled=False, gradient_enabled=True, histogram_samples=32,
        fused_kernels=False))
    logged = {}
    with TensorBoardSink(tmp_path) as sink:
        for step in range(1, 10):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            metrics = analyzer.on_optimizer_step(model, optimizer=opt)
            opt.zero_grad()
            sink.log(metrics, step, histograms=analyzer.last_histograms)
            if metrics:
                logged[step] = metrics
    events = read_events(tmp_path)
    assert sorted(logged) == [6, 9]
    assert set(events.Tags()["scalars"]) == set(logged[6])
    for key in ("param_change/norm_l2", "gradient/norm_l2"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(s, pytest.approx(logged[s][key], rel=1e-6)) for s in (6, 9)]
    assert [h.histogram_value.num for h in events.Histograms("gradient/abs_grad")] == [32, 32]


def test_a_failing_writer_is_logged_once_and_training_goes_on(tmp_path, caplog):
    sink = TensorBoardSink(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    sink.writer.add_scalar = broken
    with caplog.at_level(logging.WARNING, "grail.trainer.analysis.integrations.tensorboard"):
        sink.log({"a": 1.0}, step=1)
        sink.log({"a": 2.0}, step=2)
        sink.log({"b": "not a number"}, step=3)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("disk full" in m for m in messages) == 1
    assert sum("not a number" in m for m in messages) == 1
    sink.close()


def test_missing_tensorboard_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from grail.trainer.analysis.integrations import TensorBoardSink\n"
        "try:\n"
        f"    TensorBoardSink({str(tmp_path)!r})\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "grail-analysis[tensorboard]" in out.stdout


def test_a_closed_tensorboard_sink_drops_metrics_with_one_warning(tmp_path, caplog):
    sink = TensorBoardSink(tmp_path / "tb")
    sink.close()
    caplog.set_level(logging.WARNING)
    sink.log({"a": 1.0}, step=1)
    sink.log({"a": 2.0}, step=2)
    said = [r for r in caplog.records if "is closed" in r.getMessage()]
    assert len(said) == 1 and "step 1" in said[0].getMessage()
