"""The Trainer's wandb integration (offline run) receives the analysis keys and histograms."""

from __future__ import annotations

import pytest

wandb = pytest.importorskip("wandb")
pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager  # noqa: E402
from grail.trainer.analysis.integrations import ModelAnalysisCallback  # noqa: E402
from tests.conftest import tiny_qwen2  # noqa: E402

from ._hf import Recorder, lm_dataset, training_args  # noqa: E402

pytestmark = pytest.mark.slow


def test_offline_wandb_run_gets_scalars_and_histograms(tmp_path, monkeypatch):
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
