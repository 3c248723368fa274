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
