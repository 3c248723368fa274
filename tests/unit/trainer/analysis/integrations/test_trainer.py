"""ModelAnalysisCallback inside a real Hugging Face Trainer (CPU, tiny Qwen2, report_to none)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import Trainer

from grail.trainer.analysis import (
    AnalysisConfig,
    ModelAnalysisManager,
    measurement_steps,
)
from grail.trainer.analysis.integrations import ModelAnalysisCallback
from tests.conftest import tiny_qwen2

from ._hf import (
    Recorder,
    analysis_entries,
    lm_dataset,
    steps_with,
    training_args,
    weight_recorder,
)

pytestmark = pytest.mark.slow


def _train(tmp_path, interval=2, probe=None, callbacks=(), resume=None, manager=None, **args):
    rec = Recorder()
    manager = manager or ModelAnalysisManager.create(AnalysisConfig(interval=interval))
    manager.add_metric(rec)
    cb = ModelAnalysisCallback(manager, probe_inputs=probe)
    trainer = Trainer(
        model=tiny_qwen2(),
        args=training_args(str(tmp_path), **args),
        train_dataset=lm_dataset(),
        callbacks=[cb, *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb, rec


def _norm_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))


def test_metrics_logged_at_measurement_steps_and_own_logs_kept(tmp_path):
    weights = weight_recorder()
    trainer, _, rec = _train(tmp_path, interval=2, max_steps=7, callbacks=[weights])
    history = trainer.state.log_history
    entries = analysis_entries(history)
    assert sorted(entries) == measurement_steps(2, 7) == [4, 6]
    for metrics in entries.values():
        assert "param_change/norm_l2" in metrics
        assert "sparse/kl_at_1e-06" in metrics and "sparse/top1_agree_at_1e-06_random" in metrics
        assert metrics["sparse/tokens"] == 4 * 12  # the captured training batch
    # The trainer's own loss log survives on every step, also on measurement steps.
    assert steps_with(history, "loss") == list(range(1, 8))
    assert steps_with(history, "learning_rate") == list(range(1, 8))
    for step in (4, 6):  # analysis entry first, then the trainer's own entry of that step
        at = [("loss" in e, any(k.startswith("analysis/") for k in e))
              for e in history if e["step"] == step]
        assert at[:2] == [(False, True), (True, False)]

    # The computers ran on the trainer's step numbers, with gradients still present and the
    # unwrapped torch optimizer, on a batch that the trainer trained on.
    assert [c["step"] for c in rec.calls] == [4, 6]
    assert all(c["grads"] and isinstance(c["optimizer"], torch.optim.AdamW) for c in rec.calls)
    rows = {tuple(r) for r in lm_dataset()["input_ids"]}
    for call in rec.calls:
        assert {tuple(r) for r in call["inputs"]["input_ids"].tolist()} <= rows
    # The delta compares the weights after optimizer steps N and N - interval.
    w = weights.weights
    for step in (4, 6):
        ref = _norm_l2(w[step], w[step - 2])
        assert entries[step]["param_change/norm_l2"] == pytest.approx(ref, rel=1e-6)
        assert ref > 0


def test_probe_dict_is_used_for_forward_metrics(tmp_path):
    probe = {
        "input_ids": torch.randint(0, 128, (3, 5)),
        "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]]),
    }
    trainer, _, rec = _train(tmp_path, interval=1, max_steps=2, probe=probe)
    assert [c["step"] for c in rec.calls] == [2]
    assert torch.equal(rec.calls[0]["inputs"]["input_ids"], probe["input_ids"])
    assert analysis_entries(trainer.state.log_history)[2]["sparse/tokens"] == 12.0


def _overlap_manager() -> ModelAnalysisManager:
    return ModelAnalysisManager.create(
        AnalysisConfig(interval=2, param_change_track_mask_overlap=True)
    )


OVERLAP = ("param_change/mask_overlap", "param_change/mask_overlap_prev_ratio")


def test_resume_keeps_the_schedule_and_the_numbers(tmp_path):
    full, cb, _ = _train(tmp_path / "a", max_steps=8, save_strategy="steps", save_steps=1,
                         manager=_overlap_manager())
    reference = analysis_entries(full.state.log_history)
    assert sorted(reference) == [4, 6, 8]
    assert math.isnan(reference[4][OVERLAP[0]]) and not math.isnan(reference[6][OVERLAP[0]])
    for step in range(1, 9):  # the analysis state is saved with every checkpoint
        assert (tmp_path / "a" / f"checkpoint-{step}" / "grail_analysis_state_rank0.pt").is_file()
    # checkpoint-4 is a measurement step: the baseline comes from the loaded weights and the
    # previous changed set from the checkpoint, so the resumed run measures at 6 and 8 exactly
    # like the uninterrupted one - mask_overlap included.
    resumed, _, rec = _train(tmp_path / "b", max_steps=8, manager=_overlap_manager(),
                             resume=str(tmp_path / "a" / "checkpoint-4"))
    # log_history is restored from the checkpoint: entries up to step 4 come from the first run.
    got = {s: m for s, m in analysis_entries(resumed.state.log_history).items() if s > 4}
    assert [c["step"] for c in rec.calls] == [6, 8]
    assert sorted(got) == [6, 8]
    for step in (6, 8):
        for key in OVERLAP:
            assert got[step][key] == reference[step][key], (step, key)
    # checkpoint-5 is not: the manager re-baselines at 6 and measures at 8, where the carried
    # changed set (from the interval ending at 4) no longer precedes it: NaN, not a wrong value.
    # The manager of the first run is reused (its step count is 8): it must follow the trainer
    # back to step 5.
    again, _, rec5 = _train(tmp_path / "c", max_steps=8, manager=cb.analyzer,
                            resume=str(tmp_path / "a" / "checkpoint-5"))
    got5 = {s: m for s, m in analysis_entries(again.state.log_history).items() if s > 5}
    assert sorted(got5) == [8]
    assert [c["step"] for c in rec5.calls] == [8]
    assert all(math.isnan(got5[8][key]) for key in OVERLAP)
    for step, metrics in [*got.items(), *got5.items()]:
        for key in ("param_change/norm_l2", "param_change/changed_ratio_at_1e-06",
                    "sparse/kl_at_1e-06"):
            assert metrics[key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-12)


def test_gradient_accumulation_runs_once_per_optimizer_step(tmp_path):
    trainer, _, rec = _train(tmp_path, interval=1, max_steps=3, gradient_accumulation_steps=2)
    assert [c["step"] for c in rec.calls] == [2, 3]
    assert sorted(analysis_entries(trainer.state.log_history)) == [2, 3]
    assert steps_with(trainer.state.log_history, "loss") == [1, 2, 3]
