"""AccelerateSink: through a real Accelerator's trackers, read back from TensorBoard."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.integrations import AccelerateSink, MetricSink

LOGGER = "grail.trainer.analysis.integrations.accelerate"


class FakeTracker(GeneralTracker):
    """Records what reaches it; ``tracker`` stands for the backend object (a wandb run, ...)."""

    name = "fake"  # accelerate checks for the class attribute; instances set their own
    requires_logging_directory = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.scalars: list[tuple[int | None, dict]] = []
        self.backend_calls: list[tuple[dict, int | None]] = []

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):  # accelerator.log -> here; wandb's run.log too
        if any(not isinstance(v, (int, float)) for v in values.values()):
            self.backend_calls.append((dict(values), step))
        else:
            self.scalars.append((step, dict(values)))


def events_of(directory) -> EventAccumulator:
    files = list(directory.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_tensorboard_tracker_gets_scalars_and_histograms_at_their_steps(tmp_path):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    sink = AccelerateSink(accelerator, prefix="analysis/")
    assert isinstance(sink, MetricSink)

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    analyzer = ModelAnalysisManager.create(AnalysisConfig(
        interval=2, sparse_quality_enabled=False, gradient_enabled=True, histogram_samples=16,
        fused_kernels=False))
    logged = {}
    for step in range(1, 7):
        accelerator.backward(model(torch.randn(4, 8)).square().mean())
        opt.step()
        metrics = analyzer.on_optimizer_step(model, optimizer=opt)
        opt.zero_grad()
        accelerator.log({"loss": 0.5}, step=step)  # the user's own curve, untouched
        sink.log(metrics, step, histograms=analyzer.last_histograms)
        if metrics:
            logged[step] = metrics
    sink.close()
    accelerator.end_training()

    events = events_of(tmp_path)
    assert sorted(logged) == [4, 6]
    tags = set(events.Tags()["scalars"])
    assert tags == {"loss"} | {f"analysis/{k}" for k in logged[4]}
    for key in ("param_change/norm_l2", "gradient/norm_l2", "gradient/nonfinite_count"):
        got = [(e.step, e.value) for e in events.Scalars(f"analysis/{key}")]
        assert got == [(s, pytest.approx(logged[s][key], rel=1e-6)) for s in (4, 6)]
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 7))
    # Histograms only at the measurement steps, with every sampled value.
    hist = events.Histograms("analysis/gradient/abs_grad")
    assert [(h.step, h.histogram_value.num) for h in hist] == [(4, 16), (6, 16)]


def test_histograms_go_to_trackers_that_support_them(tmp_path, caplog):
    wandb = pytest.importorskip("wandb")
    wandb_like, other = FakeTracker("wandb"), FakeTracker("custom")
    accelerator = Accelerator(cpu=True, log_with=[wandb_like, other])
    accelerator.init_trackers("run")
    sink = AccelerateSink(accelerator)
    values = np.array([1.0, np.nan, 2.0, 4.0])
    with caplog.at_level(logging.INFO, LOGGER):
        sink.log({"a": 1.0, "b": np.float32(0.5)}, step=3,
                 histograms={"h": values, "none": [np.inf]})
        sink.log({"a": 2.0}, step=5, histograms={"h": values})
    for tracker in (wandb_like, other):
        assert tracker.scalars == [(3, {"a": 1.0, "b": 0.5}), (5, {"a": 2.0})]
        assert all(type(v) is float for _, s in tracker.scalars for v in s.values())
    assert [step for _, step in wandb_like.backend_calls] == [3, 5]
    payload = wandb_like.backend_calls[0][0]
    assert set(payload) == {"h"} and isinstance(payload["h"], wandb.Histogram)
    assert sum(payload["h"].histogram) == 3  # the finite values only
    assert other.backend_calls == []
    told = [r.getMessage() for r in caplog.records if "'custom'" in r.getMessage()]
    assert len(told) == 1  # said once, at info level


def test_no_trackers_or_a_failing_tracker_never_raise(caplog):
    class Broken(FakeTracker):
        def log(self, values, step=None, **kwargs):
            raise ConnectionError("tracker server unreachable")

    accelerator = Accelerator(cpu=True)
    sink = AccelerateSink(accelerator)
    with caplog.at_level(logging.WARNING, LOGGER):
        sink.log({"a": 1.0}, step=1)
        sink.log({"a": 1.0}, step=2)
    assert sum("init_trackers" in r.getMessage() for r in caplog.records) == 1

    caplog.clear()
    accelerator = Accelerator(cpu=True, log_with=[Broken("custom")])
    accelerator.init_trackers("run")
    sink = AccelerateSink(accelerator)
    with caplog.at_level(logging.WARNING, LOGGER):
        sink.log({"a": 1.0, "text": "n/a"}, step=1)
        sink.log({"a": math.nan}, step=2)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("not a number" in m for m in messages) == 1


def test_processes_other_than_the_main_one_drop_metrics_without_a_warning(caplog):
    class OtherRank:  # accelerate starts trackers on the main process only
        trackers = ()
        is_main_process = False

        def log(self, values, step=None):
            raise AssertionError("nothing to log to")

    with caplog.at_level(logging.WARNING, LOGGER):
        AccelerateSink(OtherRank()).log({"a": 1.0}, step=1)
    assert not caplog.records


def test_not_an_accelerator_fails_at_construction():
    with pytest.raises(TypeError, match=r"accelerate\.Accelerator"):
        AccelerateSink("tensorboard")
