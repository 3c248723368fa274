"""The Trainer's wandb integration (offline run) receives the analysis keys and histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")
pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from grail.trainer.analysis import (  # noqa: E402
    AnalysisConfig,
    MetricComputer,
    MetricResult,
    ModelAnalysisManager,
)
from grail.trainer.analysis.integrations import ModelAnalysisCallback  # noqa: E402
from tests.conftest import tiny_qwen2  # noqa: E402

from ._hf import Recorder, lm_dataset, training_args  # noqa: E402

pytestmark = pytest.mark.slow


def _spy_on_wandb(tmp_path, monkeypatch) -> list[dict]:
    """Offline wandb runs under ``tmp_path``; returns the list every ``run.log`` payload joins."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[dict] = []
    run_class = wandb.sdk.wandb_run.Run
    real_log = run_class.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    # wandb.init rebinds the module-level wandb.log to run.log, so spy on the run class.
    monkeypatch.setattr(run_class, "log", spy)
    return logged


def test_offline_wandb_run_gets_scalars_and_histograms(tmp_path, monkeypatch):
    logged = _spy_on_wandb(tmp_path, monkeypatch)
    manager = ModelAnalysisManager.create(
        AnalysisConfig(interval=2, sparse_quality_enabled=False)
    ).add_metric(Recorder(histograms=True))
    trainer = Trainer(
        model=tiny_qwen2(),
        args=training_args(str(tmp_path), max_steps=4, report_to=["wandb"]),
        train_dataset=lm_dataset(),
        callbacks=[ModelAnalysisCallback(manager)],
    )
    try:
        trainer.train()
        run_dir = wandb.run.dir
    finally:
        wandb.finish()
    assert str(tmp_path) in run_dir  # an offline run was really written

    scalars = [d for d in logged if "train/analysis/param_change/norm_l2" in d]
    assert [d["train/global_step"] for d in scalars] == [4]
    expected = manager.last_metrics["param_change/norm_l2"]
    assert scalars[0]["train/analysis/param_change/norm_l2"] == pytest.approx(expected)
    hists = [d for d in logged if "train/analysis/rec/hist" in d]
    assert [d["train/global_step"] for d in hists] == [4]
    hist = hists[0]["train/analysis/rec/hist"]
    assert isinstance(hist, wandb.Histogram) and sum(hist.histogram) == 8
    # The trainer's own loss reached wandb on every step.
    assert sorted(d["train/global_step"] for d in logged if "train/loss" in d) == [1, 2, 3, 4]


class _NonFinite(MetricComputer):
    """Returns NaN/Inf scalars and histograms that wandb.Histogram cannot take as they are."""

    name = "odd"

    def __init__(self) -> None:
        big = np.random.default_rng(0).standard_normal(10**6)
        big[:10] = np.inf
        self.histograms = {
            "odd/h_nan": np.array([0.5, np.nan, 1.5]),
            "odd/h_inf": np.array([np.inf, -np.inf, 1.0, 2.0]),
            "odd/h_all_nan": np.full(4, np.nan),
            "odd/h_empty": np.array([]),
            "odd/h_big": big,
        }

    def compute(self, delta=None, **kwargs):
        metrics = {"odd/nan": math.nan, "odd/inf": math.inf, "odd/neg_inf": -math.inf}
        return MetricResult(metrics, self.histograms)


def test_non_finite_values_reach_wandb_without_stopping_training(tmp_path, monkeypatch):
    logged = _spy_on_wandb(tmp_path, monkeypatch)
    manager = ModelAnalysisManager.create(
        AnalysisConfig(interval=1, sparse_quality_enabled=False)
    ).add_metric(_NonFinite())
    trainer = Trainer(
        model=tiny_qwen2(),
        args=training_args(str(tmp_path), max_steps=3, report_to=["wandb"]),
        train_dataset=lm_dataset(),
        callbacks=[ModelAnalysisCallback(manager)],
    )
    try:
        trainer.train()  # used to raise "autodetected range of [nan, nan] is not finite"
    finally:
        wandb.finish()
    assert trainer.state.global_step == 3
    scalars = [d for d in logged if "train/analysis/odd/nan" in d]
    assert [d["train/global_step"] for d in scalars] == [2, 3]
    assert math.isnan(scalars[0]["train/analysis/odd/nan"])
    assert scalars[0]["train/analysis/odd/inf"] == math.inf
    hists = [d for d in logged if "train/analysis/odd/h_big" in d]
    assert [d["train/global_step"] for d in hists] == [2, 3]
    counts = {k.removeprefix("train/analysis/"): sum(v.histogram) for k, v in hists[0].items()
              if isinstance(v, wandb.Histogram)}
    assert counts == {"odd/h_nan": 2, "odd/h_inf": 2, "odd/h_big": 10**6 - 10}  # empty ones skipped
