"""DeepSpeed ZeRO partitions read from parameter attributes, in one process (no DeepSpeed needed):
geometry and padding of a ZeRO-3 partition, engine and optimizer unwrapping, and the low-rank
patch of a flat partition whose first and last rows are partial. The two-rank runs against
DeepSpeed itself are in ``test_deepspeed.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from grail.trainer.analysis.core import zero
from grail.trainer.analysis.core.distributed import (
    ShardInfo,
    local_grad,
    local_tensor,
    shard_info,
    unsupported_engine,
    unwrap_model,
)
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.low_rank import LowRankMetrics
from grail.trainer.analysis.ops.spectrum import matrix_spectrum


def zero3_param(shape: tuple[int, ...], partition: torch.Tensor) -> nn.Parameter:
    """A stand-in for a ZeRO-3 parameter: an empty placeholder with DeepSpeed's attributes."""
    p = nn.Parameter(torch.empty(0))
    p.ds_tensor = partition
    p.ds_tensor.ds_numel = partition.numel()
    p.ds_shape = torch.Size(shape)
    return p


@pytest.mark.parametrize(("rank", "offset", "valid"), [(0, 0, 4), (1, 4, 3)])
def test_zero3_partition_excludes_padding_and_is_a_view(monkeypatch, rank, offset, valid):
    """7 entries on 2 ranks: partitions of 4, the second padded by one entry."""
    monkeypatch.setattr(zero, "_group_rank_size", lambda p: (rank, 2))
    part = torch.arange(4.0) + 10 * rank
    p = zero3_param((7,), part)
    local = local_tensor(p)
    assert zero.is_partitioned(p) and local.numel() == valid
    assert torch.equal(local, part[:valid])
    local.add_(1.0)  # writes reach the partition (the analysis patches in place)
    assert part[0] == 10 * rank + 1
    assert shard_info(p) == ShardInfo((7,), offset, True, True, 4)
    assert shard_info(p).global_numel == 7


def test_zero3_rank_without_entries_holds_an_empty_piece(monkeypatch):
    monkeypatch.setattr(zero, "_group_rank_size", lambda p: (1, 2))
    p = zero3_param((1,), torch.zeros(1))  # one entry on two ranks: rank 1 holds padding only
    assert local_tensor(p).numel() == 0
    assert shard_info(p).offset == 1


def test_plain_parameters_are_not_partitioned():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    assert not zero.is_partitioned(model.weight)
    assert zero.gradient_piece(model.weight) is None
    grad, info, numel = local_grad(model.weight)
    assert torch.equal(grad, torch.ones(2, 3)) and info.owner and numel == 6
    assert local_grad(model.bias).grad is None
    assert unsupported_engine(model) is None
    zero.release(model)  # no-op


def test_engine_and_optimizer_wrappers_are_unwrapped():
    class DeepSpeedEngine(nn.Module):  # matched by name: DeepSpeed is never imported
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = nn.Linear(2, 2)
    assert unwrap_model(DeepSpeedEngine(inner)) is inner
    stage3 = type("Stage3", (), {"fp32_partitioned_groups_flat": []})()
    wrapper = type("Wrapper", (), {"optimizer": type("Mid", (), {"optimizer": stage3})()})()
    assert zero.zero_optimizer(wrapper) is stage3
    assert zero.zero_optimizer(torch.optim.SGD(inner.parameters(), lr=0.1)) is None


def test_nvme_offload_and_hierarchical_partitioning_are_refused():
    class Location:
        def __str__(self) -> str:
            return "OffloadDeviceEnum.nvme"

    p = zero3_param((4,), torch.zeros(4))
    p.ds_tensor.final_location = Location()
    model = nn.Module()
    model.w = p
    assert "NVMe" in unsupported_engine(model)
    del p.ds_tensor.final_location
    assert unsupported_engine(model) is None
    p.ds_zero_param_process_group = object()  # ZeRO++ hpZ: forwards gather secondary copies
    assert "hierarchical" in unsupported_engine(model)


def test_partitions_over_a_subgroup_are_refused(monkeypatch):
    """MiCS (or model parallelism): each partition exists once per group, not once."""
    import torch.distributed as dist

    p = zero3_param((4,), torch.zeros(2))
    model = nn.Module()
    model.w = p
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(zero, "_group_rank_size", lambda p: (0, 2))
    assert "2 of 4 ranks" in unsupported_engine(model)
    monkeypatch.setattr(zero, "_group_rank_size", lambda p: (0, 4))
    assert unsupported_engine(model) is None


@pytest.mark.parametrize(("offset", "numel"), [(0, 20), (7, 13), (13, 20), (33, 2), (40, 0)])
def test_low_rank_truncation_of_a_flat_piece(offset, numel):
    """A ZeRO-3 partition of a 5 x 8 matrix starting mid-row: the patched values equal the
    float64 numpy truncation ``W_old + (U_r S_r V_r^T)`` cut to the piece's flat range."""
    gen = torch.Generator().manual_seed(3)
    w_old = torch.randn(5, 8, generator=gen)
    update = torch.randn(5, 2, generator=gen) @ torch.randn(2, 8, generator=gen)
    update += 0.01 * torch.randn(5, 8, generator=gen)
    spectrum = matrix_spectrum(update, 2, keep_factors=True)
    flat_old = w_old.reshape(-1)[offset : offset + numel].clone()
    old = ParameterSnapshot(None)
    old.data["w"] = flat_old
    old.shards["w"] = ShardInfo((5, 8), offset, True, True, 20)
    old.param_dtypes["w"] = torch.float32
    new = ParameterSnapshot(None)
    new.data["w"] = (w_old + update).reshape(-1)[offset : offset + numel].clone()
    new.shards["w"], new.param_dtypes["w"] = old.shards["w"], torch.float32
    values = LowRankMetrics._truncations(old.compute_delta(new), {"w": spectrum}, 1)
    got = values["w"](new.data["w"])
    u, s, vt = np.linalg.svd(update.double().numpy())
    want = (w_old.double().numpy() + s[0] * np.outer(u[:, 0], vt[0])).reshape(-1)
    np.testing.assert_allclose(got.numpy(), want[offset : offset + numel], rtol=0, atol=1e-5)
