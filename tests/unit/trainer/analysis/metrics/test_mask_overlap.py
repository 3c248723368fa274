"""MaskOverlapMetrics against numpy set arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.core.stats import CPU_CHUNK
from grail.trainer.analysis.metrics.mask_overlap import MaskOverlapMetrics, pack_bits, unpack_bits


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, CPU_CHUNK + 3])
def test_pack_unpack_round_trip_and_size(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(packed, n), mask)


def test_jaccard_matches_numpy_over_several_intervals():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 500), torch.nn.Linear(500, 3))  # > 1 chunk
    computer = MaskOverlapMetrics()
    gen = torch.Generator().manual_seed(1)
    previous = None
    for interval in range(4):
        old = ParameterSnapshot(model)
        changed = []
        with torch.no_grad():
            for p in model.parameters():
                m = torch.rand(p.shape, generator=gen) < (0.2 + 0.2 * interval)
                p.add_(m.float() * 1e-2)
                if interval == 2:
                    p.view(-1)[0] = float("nan")  # a NaN delta counts as changed
                first = np.arange(m.numel()) == 0
                changed.append(m.numpy().reshape(-1) | (first & (interval == 2)))
        out = computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
        current = np.concatenate(changed)
        if previous is None:
            assert all(np.isnan(v) for v in out.values()) and len(out) == 2
        else:
            inter, union = (current & previous).sum(), (current | previous).sum()
            assert out["param_change/mask_overlap"] == inter / union
            assert out["param_change/mask_overlap_prev_ratio"] == inter / previous.sum()
        previous = current
        if interval == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.view(-1)[0] = 0.0
    kept = sum(t.numel() for t in computer._previous.values())
    assert kept == sum(-(-p.numel() // 8) for p in model.parameters())  # one bit per entry


def test_manager_wires_it_and_architecture_change_starts_over():
    model = torch.nn.Linear(8, 8)
    manager = ModelAnalysisManager.create(
        AnalysisConfig(
            interval=1, sparse_quality_enabled=False, param_change_track_mask_overlap=True
        )
    )
    for step in range(4):
        with torch.no_grad():
            model.weight.add_(1e-3)
            if step % 2:
                model.bias.add_(1e-3)  # changed sets alternate: weight, weight + bias, ...
        out = manager.on_optimizer_step(model)
        if step >= 2:
            assert out["param_change/mask_overlap"] == 64 / 72
    manager.reset()
    assert manager.on_optimizer_step(model) == {}  # first snapshot after a reset
    assert np.isnan(manager.on_optimizer_step(model)["param_change/mask_overlap"])


def _overlap_manager(interval: int = 2) -> ModelAnalysisManager:
    return ModelAnalysisManager.create(
        AnalysisConfig(
            interval=interval, sparse_quality_enabled=False, param_change_track_mask_overlap=True
        )
    )


def _sparse_update(model: torch.nn.Module, step: int) -> None:
    """A seeded update that changes a different random 5% of the entries at every step."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.rand(p.shape, generator=gen) < 0.05).float() * 1e-2)


def _run(manager, model, steps):
    out = {}
    for step in steps:
        _sparse_update(model, step)
        metrics = manager.on_optimizer_step(model, step=step)
        if metrics:
            out[step] = metrics
    return out


def _jaccard_reference(model_at: dict[int, dict[str, np.ndarray]], step: int, interval: int):
    def changed(a, b):
        return np.concatenate([(model_at[a][n] != model_at[b][n]).reshape(-1) for n in model_at[a]])

    cur = changed(step, step - interval)
    prev = changed(step - interval, step - 2 * interval)
    inter = float((cur & prev).sum())
    return inter / float((cur | prev).sum()), inter / float(prev.sum())


def test_resumed_manager_matches_the_uninterrupted_one_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    weights: dict[int, dict[str, np.ndarray]] = {}
    reference = _overlap_manager()
    ref = {}
    for step in range(1, 13):
        _sparse_update(model, step)
        weights[step] = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
        metrics = reference.on_optimizer_step(model, step=step)
        if metrics:
            ref[step] = metrics
        if step == 6:  # a checkpoint at a measurement step
            saved = reference.state_dict()
            saved_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert "snapshot" not in saved and list(saved["computers"]) == ["1:mask_overlap"]
    for step in (8, 10, 12):  # the reference itself matches numpy set arithmetic
        jac, prev_ratio = _jaccard_reference(weights, step, 2)
        assert ref[step]["param_change/mask_overlap"] == pytest.approx(jac, rel=1e-12)
        assert ref[step]["param_change/mask_overlap_prev_ratio"] == pytest.approx(prev_ratio)
        assert 0.0 < jac < 0.5  # a sparse, changing set: far from the trivial 1.0

    resumed_model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.copy_(saved_weights[n])  # as loaded from the checkpoint
    resumed = _overlap_manager()
    resumed.load_state_dict(saved, model=resumed_model)
    assert resumed.step_count == 6 and resumed.old_snapshot is not None
    got = _run(resumed, resumed_model, range(7, 13))
    assert sorted(got) == [8, 10, 12]
    for step in got:
        assert got[step] == ref[step]  # every key, bit for bit, mask_overlap included


def test_resume_from_a_snapshot_state_at_any_step_and_without_a_baseline():
    torch.manual_seed(0)
    model = torch.nn.Linear(30, 20)
    reference = _overlap_manager()
    ref = _run(reference, model, range(1, 8))
    saved = reference.state_dict(include_snapshot=True)  # step 7: not a measurement step
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref.update(_run(reference, model, range(8, 11)))

    twin = torch.nn.Linear(30, 20)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(weights[n])
    resumed = _overlap_manager()
    resumed.load_state_dict(saved)  # the snapshot is the baseline: no model needed
    got = _run(resumed, twin, range(8, 11))
    assert got[8] == ref[8] and got[10] == ref[10]
    assert not np.isnan(got[8]["param_change/mask_overlap"])

    # Without a snapshot and without the weights of a measurement step there is no exact
    # baseline: the carried set is dropped instead of being compared with a later interval.
    no_baseline = _overlap_manager()
    no_baseline.load_state_dict(reference.state_dict())  # step 10, no model given
    assert no_baseline.computers[1].state_dict() == {}
    assert no_baseline.on_optimizer_step(model, step=12) == {}  # re-baselines
    _sparse_update(model, 14)
    assert np.isnan(no_baseline.on_optimizer_step(model, step=14)["param_change/mask_overlap"])


def test_state_dict_errors_say_what_to_do():
    manager = _overlap_manager()
    with pytest.raises(ValueError, match="step_count"):
        manager.load_state_dict({"config": manager.config.to_dict()})
    with pytest.raises(ValueError, match="step_count"):
        manager.load_state_dict([("step_count", 3)])
    with pytest.raises(ValueError, match="same computers in the same order"):
        manager.load_state_dict({"step_count": 4, "computers": {"0:mask_overlap": {}}})
    computer = MaskOverlapMetrics()
    with pytest.raises(ValueError, match="uint8"):
        computer.load_state_dict({"names": ["w"], "previous": {"w": torch.zeros(3)}})
    with pytest.raises(ValueError, match="load_state_dict"):  # the base default refuses data
        manager.computers[0].load_state_dict({"x": 1})
    # A rejected state leaves no half-loaded computer behind.
    model = torch.nn.Linear(4, 4)
    _run(manager, model, range(1, 5))
    bad = manager.state_dict()
    bad["computers"]["1:mask_overlap"] = {"names": ["weight"], "previous": {"weight": 1}}
    with pytest.raises(ValueError, match="uint8"):
        manager.load_state_dict(bad)
    assert all(c.state_dict() == {} for c in manager.computers)


def test_a_restored_set_that_does_not_fit_gives_nan_and_starts_over():
    model = torch.nn.Linear(16, 4, bias=False)
    computer = MaskOverlapMetrics()
    short = torch.zeros(3, dtype=torch.uint8)
    computer.load_state_dict({"names": ["weight"], "previous": {"weight": short}})
    old = ParameterSnapshot(model)
    _sparse_update(model, 1)
    out = computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
    assert np.isnan(out["param_change/mask_overlap"])  # 3 bytes do not hold 64 entries
    old = ParameterSnapshot(model)
    _sparse_update(model, 2)
    out = computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
    assert not np.isnan(out["param_change/mask_overlap"])  # started over from the last set
