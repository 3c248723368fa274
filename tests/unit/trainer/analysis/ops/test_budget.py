"""Exact top-k budget masks: the kept set and count against a numpy reference, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from grail.trainer.analysis.core.snapshot import ParameterDelta, ParameterSnapshot
from grail.trainer.analysis.ops.budget import exact_budget_drops, subset_delta
from grail.trainer.analysis.patching.swaps import SelectPatch


def make(
    updates: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, dyadic: bool = False
) -> tuple[nn.Module, ParameterDelta, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A module holding one parameter per update; returns (model, delta, W_old, W_new).

    ``dyadic`` draws W_old from multiples of 1/4 so that small dyadic updates are exact.
    """
    model = nn.Module()
    g = torch.Generator().manual_seed(0)
    for name, u in updates.items():
        w = torch.randn(u.shape, generator=g)
        if dyadic:
            w = torch.randint(-8, 8, u.shape, generator=g) / 4
        model.register_parameter(name, nn.Parameter(w.to(dtype)))
    old = ParameterSnapshot(model)
    w_old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, u in updates.items():
            getattr(model, name).copy_(w_old[name].float().add(u).to(dtype))
    w_new = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, old.compute_delta(ParameterSnapshot.live(model)), w_old, w_new


def reference_keep(deltas: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Keep the k largest |d| in (name order, flat position) order among equals."""
    flat = [(abs(float(v)), i, j, n) for i, (n, d) in enumerate(deltas.items())
            for j, v in enumerate(d.reshape(-1))]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    keep = {n: np.zeros(d.size, dtype=bool) for n, d in deltas.items()}
    for _, _, j, n in flat[:k]:
        keep[n][j] = True
    return keep


def check_patch(
    model, delta, drop, w_old, w_new, want: dict[str, np.ndarray], fused: bool = False
) -> int:
    with SelectPatch(delta, drop, fused=fused) as patch:
        for name in delta.names:
            p = getattr(model, name).detach().reshape(-1)
            expect = torch.where(torch.from_numpy(want[name]), w_new[name].reshape(-1),
                                 w_old[name].reshape(-1))
            assert torch.equal(p, expect), name
    for name in delta.names:
        assert torch.equal(getattr(model, name).detach(), w_new[name])
        assert torch.equal(delta.old.data[name], w_old[name])
    return patch.dropped_count()


@pytest.mark.parametrize("k", [1, 7, 100, 411, 412, 10_000])
def test_keeps_exactly_the_k_largest_entries(k: int) -> None:
    g = torch.Generator().manual_seed(1)
    updates = {"a": torch.randn(12, 10, generator=g), "b": torch.randn(7, 20, generator=g) * 3,
               "c": torch.randn(152, generator=g) * 0.1}
    model, delta, w_old, w_new = make(updates)
    deltas = {n: (w_new[n].double() - w_old[n].double()).numpy() for n in updates}
    total = sum(d.size for d in deltas.values())
    want = reference_keep(deltas, min(k, total))
    dropped = check_patch(model, delta, exact_budget_drops(delta, [k])[0], w_old, w_new, want)
    assert total - dropped == min(k, total)


def test_ties_at_the_threshold_are_kept_in_name_then_position_order(kernel_path) -> None:
    # |d| in {4, 2 (ten ties spread over two tensors), 1}: k=6 keeps the 4s and 3 of the ties
    a = torch.tensor([[1.0, 2.0, -2.0], [4.0, 2.0, 1.0]])
    b = torch.tensor([2.0, -4.0, 2.0, 2.0, -2.0, 1.0, 2.0, -2.0])
    model, delta, w_old, w_new = make({"a": a, "b": b}, dyadic=True)
    assert torch.equal(delta.deltas["a"], a) and torch.equal(delta.deltas["b"], b)
    deltas = {"a": a.numpy(), "b": b.numpy()}
    fused = kernel_path == "fused"
    for k in (2, 3, 5, 6, 9, 12, 13):
        want = reference_keep(deltas, k)
        drop = exact_budget_drops(delta, [k])[0]
        assert 14 - check_patch(model, delta, drop, w_old, w_new, want, fused) == k


@pytest.mark.parametrize(("k", "compiled"), [(2, {"a", "b"}), (3, {"b"}), (5, {"a", "b"}),
                                             (6, {"a"}), (12, {"a"}), (13, {"a", "b"})])
def test_the_compiled_swap_takes_every_tensor_but_the_one_that_splits_its_ties(
    kernel_path, k, compiled
) -> None:
    """A budget is a magnitude threshold on each tensor whose ties are all kept or all dropped:
    the compiled swap moves those; the tensor holding the last kept tie goes through the
    chunks. Both give the reference's mask, through a switch to another budget and back."""
    a = torch.tensor([[1.0, 2.0, -2.0], [4.0, 2.0, 1.0]])  # |d| = 2: 3 ties in a, 8 in b
    b = torch.tensor([2.0, -4.0, 2.0, 2.0, -2.0, 1.0, 2.0, -2.0, 2.0, 2.0])
    model, delta, w_old, w_new = make({"a": a, "b": b}, dyadic=True)
    deltas = {"a": a.numpy(), "b": b.numpy()}
    fused = kernel_path == "fused"
    drop, other = exact_budget_drops(delta, [k, 1])
    with SelectPatch(delta, drop, fused=fused) as patch:
        assert {r.name for r in patch._done if r.fused} == (compiled if fused else set())
        patch.switch(other)
        patch.switch(drop, count_dropped=True)
        want = reference_keep(deltas, k)
        for n in ("a", "b"):
            expect = torch.where(torch.from_numpy(want[n]), w_new[n].reshape(-1),
                                 w_old[n].reshape(-1))
            assert torch.equal(getattr(model, n).detach().reshape(-1), expect), n
        assert 16 - patch.dropped_count() == k
    assert torch.equal(model.a.detach(), w_new["a"]) and torch.equal(model.b.detach(), w_new["b"])
    assert torch.equal(delta.old.data["b"], w_old["b"])


def test_only_the_slice_that_splits_the_ties_goes_through_the_chunks(kernel_path) -> None:
    """Compiled swaps run in slices of a tensor: with slices of 4 entries, only the slice
    holding the last kept tie is swapped chunk by chunk."""
    from grail.trainer.analysis import kernels

    b = torch.tensor([2.0, -4.0, 2.0, 2.0, -2.0, 1.0, 2.0, -2.0, 2.0, 2.0, 1.0, 2.0])
    model, delta, w_old, w_new = make({"b": b}, dyadic=True)
    fused = kernel_path == "fused"
    for k, eager_slice in ((3, 0), (6, 1), (8, 2)):  # the last kept tie at 2, 4, 8
        want = reference_keep({"b": b.numpy()}, k)
        drop = exact_budget_drops(delta, [k])[0]
        with kernels.settings.override(split_numel=4), SelectPatch(delta, drop, fused=fused) as p:
            if fused:
                assert {r.start // 4 for r in p._done if not r.fused} == {eager_slice}
                assert sum(r.fused for r in p._done) == 2
            expect = torch.where(torch.from_numpy(want["b"]), w_new["b"], w_old["b"])
            assert torch.equal(model.b.detach(), expect)
            assert 12 - p.dropped_count() == k
        assert torch.equal(model.b.detach(), w_new["b"])
        assert torch.equal(delta.old.data["b"], w_old["b"])


def test_several_budgets_at_once_and_edge_budgets() -> None:
    g = torch.Generator().manual_seed(2)
    updates = {"a": torch.randn(30, 8, generator=g), "b": torch.randn(50, generator=g)}
    model, delta, w_old, w_new = make(updates)
    deltas = {n: (w_new[n].double() - w_old[n].double()).numpy() for n in updates}
    budgets = [0, 5, 60, 290, 1000]
    for k, drop in zip(budgets, exact_budget_drops(delta, budgets), strict=True):
        want = reference_keep(deltas, min(k, 290))
        assert 290 - check_patch(model, delta, drop, w_old, w_new, want) == min(k, 290)


def test_budget_beyond_the_changed_entries_keeps_zeros_by_position() -> None:
    """When k exceeds the number of changed entries, unchanged entries fill the count."""
    a = torch.zeros(4, 5)
    a[1, 2], a[3, 0] = 0.5, -0.25
    b = torch.zeros(6)
    b[4] = 1.0
    model, delta, w_old, w_new = make({"a": a, "b": b})
    deltas = {n: (w_new[n].double() - w_old[n].double()).numpy() for n in ("a", "b")}
    assert sum(int((d != 0).sum()) for d in deltas.values()) == 3
    for k in (3, 4, 11):
        want = reference_keep(deltas, k)
        dropped = check_patch(model, delta, exact_budget_drops(delta, [k])[0], w_old, w_new, want)
        assert 26 - dropped == k


def test_bf16_parameters_and_subset_view(kernel_path) -> None:
    g = torch.Generator().manual_seed(3)
    updates = {"a": torch.randn(16, 16, generator=g), "b": torch.randn(16, 16, generator=g),
               "c": torch.randn(8, generator=g)}
    model, delta, w_old, w_new = make(updates, dtype=torch.bfloat16)
    view = subset_delta(delta, ["a", "c"])
    assert view.names == ["a", "c"] and delta.names == ["a", "b", "c"]
    deltas = {n: (w_new[n].double() - w_old[n].double()).numpy() for n in ("a", "c")}
    # bf16 deltas have many exact ties: the count must still be exact
    want = reference_keep(deltas, 50)
    drop = exact_budget_drops(view, [50])[0]
    with SelectPatch(view, drop, fused=kernel_path == "fused") as patch:
        assert torch.equal(model.b.detach(), w_new["b"])  # outside the subset: full update
        for n in ("a", "c"):
            expect = torch.where(torch.from_numpy(want[n]), w_new[n].reshape(-1),
                                 w_old[n].reshape(-1))
            assert torch.equal(getattr(model, n).detach().reshape(-1), expect)
    assert 264 - patch.dropped_count() == 50
    for n in updates:
        assert torch.equal(getattr(model, n).detach(), w_new[n])
