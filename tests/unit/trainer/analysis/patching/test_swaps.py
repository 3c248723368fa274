"""Patching context managers: exact values inside, bit-exact restoration outside."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.core.stats import CPU_CHUNK, f32_floor
from grail.trainer.analysis.ops.masks import magnitude_drop, random_drop, random_keep_mask
from grail.trainer.analysis.patching import swaps as patching
from grail.trainer.analysis.patching.swaps import ModulePatch, SelectPatch, analysis_mode

from ..reference import assert_same_state, state


def _model(dtype=torch.float32, big=False):
    torch.manual_seed(0)
    width = 1100 if big else 16
    m = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 5)
    )
    return m.to(dtype)


@torch.no_grad()
def _update(model, scale=1e-3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen) * scale
        d[torch.rand(p.shape, generator=gen) < 0.3] = 0
        p.add_(d.to(p.dtype))


@pytest.fixture
def fused(kernel_path) -> bool:
    """Each test that takes it runs with the eager swap and with the compiled one."""
    return kernel_path == "fused"


def _expected(old, new, keep):
    return {n: torch.where(keep[n], new[n], old[n]) for n in new}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["magnitude", "random"])
@pytest.mark.parametrize("snapshot_dtype", [None, torch.float32, torch.bfloat16])
def test_select_patch_values_and_exact_restore(dtype, kind, snapshot_dtype, fused):
    big = dtype == torch.float32 and snapshot_dtype is None  # one case spans several chunks
    model = _model(dtype, big=big)
    if big:
        assert model[0].weight.numel() > CPU_CHUNK
    snap = ParameterSnapshot(model, dtype=snapshot_dtype)
    _update(model, scale=1e-2)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    old = {n: t.clone() for n, t in snap.data.items()}
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = 2e-3
    if kind == "magnitude":
        drop = magnitude_drop(t)
        keep = {n: (new[n].float() - old[n].float()).abs() > f32_floor(t) for n in new}
    else:
        drop = random_drop(0.4, seed=7)
        keep = {
            n: random_keep_mask(new[n].numel(), 0.4, 7, n, 0, "cpu").view(new[n].shape) for n in new
        }
    expect = _expected({n: old[n].to(dtype) for n in old}, new, keep)
    # the compiled swap takes same-dtype pairs it can move bit-exactly
    expect_fused = fused and snapshot_dtype in (None, dtype) and dtype != torch.float64
    with SelectPatch(delta, drop, fused=fused) as patch:
        assert {rec.fused for rec in patch._done} == {expect_fused}
        for n, p in model.named_parameters():
            assert torch.equal(p, expect[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.int8), new[n].view(torch.int8)), n  # bit-exact
        assert torch.equal(snap.data[n].view(torch.int8), old[n].view(torch.int8)), n


def test_select_patch_counts_dropped_entries(fused):
    model = _model()
    snap = ParameterSnapshot(model)
    _update(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    d = np.concatenate(
        [(p.detach() - snap.data[n]).numpy().reshape(-1) for n, p in model.named_parameters()]
    )
    with SelectPatch(delta, magnitude_drop(5e-4), fused=fused) as patch:
        pass
    assert patch.dropped_count() == int((np.abs(d) <= f32_floor(5e-4)).sum())
    assert patch.changed_count() == int((d != 0).sum())


def test_select_patch_restores_when_the_mask_function_fails_halfway():
    model = _model()
    snap = ParameterSnapshot(model)
    _update(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    before, snap_before = state(model), {n: t.clone() for n, t in snap.data.items()}
    inner = magnitude_drop(1e-3)
    calls = []

    def flaky(name, offset, bits, out):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("mask failed")
        return inner(name, offset, bits, out)

    with pytest.raises(RuntimeError, match="mask failed"), SelectPatch(delta, flaky):
        pass
    assert_same_state(before, state(model))
    for n in snap.data:
        assert torch.equal(snap.data[n], snap_before[n])


def test_forward_failure_inside_patch_restores_everything(fused):
    model = _model()
    snap = ParameterSnapshot(model)
    _update(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    before = state(model)

    def fail(module, args, output):
        raise RuntimeError("forward failed")

    handle = model[2].register_forward_hook(fail)
    with (
        pytest.raises(RuntimeError),
        analysis_mode(model),
        SelectPatch(delta, magnitude_drop(1e-3), fused=fused),
    ):
        model(torch.randn(2, 16))
    handle.remove()
    assert_same_state(before, state(model))


def test_analysis_mode_restores_flags_rng_and_grad_mode():
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)  # consumes the global RNG

    model = torch.nn.Sequential(torch.nn.Dropout(0.5), Noisy(), torch.nn.Linear(3, 3))
    model.train()
    model[2].eval()
    rng = torch.get_rng_state()
    with analysis_mode(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
        model(torch.ones(2, 3))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.is_grad_enabled()


def test_module_patch_writes_only_while_the_owner_runs_and_restores():
    model = _model()
    seen = {}
    w0 = model[0].weight.detach().clone()

    def spy(module, args):
        seen["inside"] = module.weight.detach().clone()

    model[0].register_forward_pre_hook(spy)  # runs after the patch hook (prepended)
    with ModulePatch(model, {"0.weight": lambda t: t * 2}) as patch:
        assert torch.equal(model[0].weight, w0)  # not yet
        model(torch.randn(1, 16))
        assert torch.equal(model[0].weight, w0)  # restored right after the module
    assert torch.equal(seen["inside"], w0 * 2)
    assert patch.calls == {"0.weight": 1}


def test_module_patch_restores_on_failure_and_handles_shared_weights():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, head)
    before = state(model)
    with ModulePatch(model, {"0.weight": lambda t: t + 1}):
        assert torch.equal(model[1].weight, before["p:0.weight"] + 1)  # whole-pass patch
    assert_same_state(before, state(model))

    mlp = _model()
    before = state(mlp)

    def fail(module, args, output):
        raise RuntimeError("boom")

    mlp[2].register_forward_hook(fail)
    with (
        pytest.raises(RuntimeError),
        ModulePatch(mlp, {"0.weight": lambda t: t * 0, "2.weight": lambda t: t * 3}),
    ):
        mlp(torch.randn(1, 16))
    assert_same_state(before, state(mlp))


def test_float64_entry_closer_than_float32_resolution_is_restored_bit_exactly():
    model = torch.nn.Linear(3, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    snap = ParameterSnapshot(model)
    with torch.no_grad():
        snap.data["weight"].fill_(1 + 0.6 * 2**-23)  # rounds to 1.0 in float32
    before, old = model.weight.detach().clone(), snap.data["weight"].clone()
    with SelectPatch(snap.compute_delta(ParameterSnapshot.live(model)), magnitude_drop(1e-7)):
        pass
    assert torch.equal(model.weight, before) and torch.equal(snap.data["weight"], old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("snapshot_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "recomputed"])
def test_switch_between_masks_gives_each_mask_and_restores_exactly(
    dtype, snapshot_dtype, packed, monkeypatch, fused
):
    # "recomputed" is what accelerators do: the undo recomputes each chunk's current mask
    monkeypatch.setattr(patching, "_pack_on", lambda device: packed)
    big = dtype == torch.float32 and snapshot_dtype is None  # several chunks
    model = _model(dtype, big=big)
    snap = ParameterSnapshot(model, dtype=snapshot_dtype)
    _update(model, scale=1e-2)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    old = {n: t.clone().to(dtype) for n, t in snap.data.items()}
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_bits = {n: t.clone() for n, t in snap.data.items()}

    def magnitude(t):
        return {n: (new[n].float() - old[n].float()).abs() > f32_floor(t) for n in new}

    def random(keep, seed):
        return {
            n: random_keep_mask(new[n].numel(), keep, seed, n, 0, "cpu").view(new[n].shape)
            for n in new
        }

    steps = [
        (magnitude_drop(2e-3), magnitude(2e-3)),
        (random_drop(0.4, seed=7), random(0.4, 7)),
        (random_drop(0.9, seed=8), random(0.9, 8)),
        (magnitude_drop(5e-3), magnitude(5e-3)),
    ]
    with SelectPatch(delta, steps[0][0], fused=fused) as patch:
        for i, (drop, keep) in enumerate(steps):
            if i:
                patch.switch(drop, count_dropped=True)
                expect_dropped = sum(int((~k).sum()) for k in keep.values())
                assert patch.dropped_count() == expect_dropped
            expect = _expected(old, new, keep)
            for n, p in model.named_parameters():
                assert torch.equal(p, expect[n]), (i, n)
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.int8), new[n].view(torch.int8)), n
        assert torch.equal(snap.data[n].view(torch.int8), old_bits[n].view(torch.int8)), n


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "recomputed"])
def test_failed_switch_restores_everything(packed, monkeypatch, fused):
    monkeypatch.setattr(patching, "_pack_on", lambda device: packed)
    model = _model(big=True)
    snap = ParameterSnapshot(model)
    _update(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    before, snap_before = state(model), {n: t.clone() for n, t in snap.data.items()}
    inner = random_drop(0.3, seed=1)
    calls = []

    def flaky(name, offset, bits, out):
        calls.append(name)
        if len(calls) == 3:  # after some chunks already moved to the new mask
            raise RuntimeError("mask failed")
        return inner(name, offset, bits, out)

    patch = SelectPatch(delta, magnitude_drop(1e-3), fused=fused).__enter__()
    with pytest.raises(RuntimeError, match="mask failed"):
        patch.switch(flaky)  # restores by itself: no __exit__ here
    assert_same_state(before, state(model))
    for n in snap.data:
        assert torch.equal(snap.data[n], snap_before[n])


def test_saved_values_fallback_saves_only_changed_entries():
    model = _model(torch.bfloat16)
    snap = ParameterSnapshot(model, dtype=torch.float32)  # dtypes differ: values are saved
    with torch.no_grad():
        model[0].weight[0, :4] += 1.0  # four changed entries in all
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    with SelectPatch(delta, random_drop(0.0, seed=0)) as patch:  # drop everything
        saved = sum(rec.index.numel() for rec in patch._done)
    assert saved == 4


def test_counts_that_were_turned_off_raise_instead_of_reading_zero():
    model = _model()
    snap = ParameterSnapshot(model)
    _update(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    with SelectPatch(delta, magnitude_drop(1e-3)) as patch:
        assert patch.dropped_count() > 0 and patch.changed_count() > 0
        patch.switch(random_drop(0.5, seed=0))  # counts restart, off by default
        with pytest.raises(RuntimeError, match="count_dropped=True"):
            patch.dropped_count()
        with pytest.raises(RuntimeError, match="count_changed=True"):
            patch.changed_count()


def test_tensors_the_kernel_gives_up_on_continue_eagerly_and_restore(monkeypatch):
    """The compiled swap declining half-way (a failed compile, a refused signature) leaves the
    tensors it moved in their fused records and hands the rest to the eager chunks."""
    from grail.trainer.analysis import kernels

    if kernels.disabled_reason() is not None:
        pytest.skip("torch.compile does not work here")
    monkeypatch.setattr(kernels.settings, "min_total_numel", 0)
    model = _model(big=True)
    snap = ParameterSnapshot(model)
    _update(model, scale=1e-2)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    old = {n: t.clone() for n, t in snap.data.items()}
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    real = kernels.select_swap
    calls = []

    def flaky(*args):
        calls.append(args[4])
        return None if len(calls) % 3 == 0 else real(*args)

    monkeypatch.setattr(kernels, "select_swap", flaky)
    keep = {
        n: random_keep_mask(new[n].numel(), 0.4, 7, n, 0, "cpu").view(new[n].shape) for n in new
    }
    with torch.no_grad(), SelectPatch(delta, magnitude_drop(2e-3), fused=True) as patch:
        patch.switch(random_drop(0.4, seed=7))
        kinds = {rec.fused for rec in patch._done}
        for n, p in model.named_parameters():
            assert torch.equal(p, _expected(old, new, keep)[n]), n
    assert kinds == {True, False}
    for n, p in model.named_parameters():
        assert torch.equal(p, new[n]) and torch.equal(snap.data[n], old[n]), n


def test_a_wrapper_that_changes_the_mask_is_applied_not_the_spec_of_what_it_wraps(fused):
    """A function wrapping a mask (functools.wraps copies its attributes) is a mask without a
    spec: the compiled swap never replaces it by the spec of the mask it wraps, so the patched
    weights follow the wrapper (here: the complement of a magnitude mask)."""
    import functools

    model = _model()
    snap = ParameterSnapshot(model)
    _update(model, scale=1e-2)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    old = {n: t.clone() for n, t in snap.data.items()}
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    inner = magnitude_drop(2e-3)

    @functools.wraps(inner)
    def complement(name, offset, bits, out):
        return inner(name, offset, bits, out).bitwise_not_()  # -1 <-> 0

    dropped_by_inner = {n: (new[n] - old[n]).abs() <= f32_floor(2e-3) for n in new}
    expect = _expected(old, new, dropped_by_inner)  # keep what the inner mask drops
    with SelectPatch(delta, complement, fused=fused) as patch:
        assert patch.drop.spec is None and not any(rec.fused for rec in patch._done)
        for n, p in model.named_parameters():
            assert torch.equal(p, expect[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p, new[n]), n
