"""TensorExchange: whole tensors toggled between W_new and W_old, and every bit put back."""

from __future__ import annotations

import pytest
import torch

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.patching import exchange as exchange_module
from grail.trainer.analysis.patching.exchange import TensorExchange
from tests.conftest import tiny_qwen2

from ..reference import assert_same_state, state


@torch.no_grad()
def _setup(snapshot_dtype=None, size=None):
    torch.manual_seed(0)
    if size is None:
        model = tiny_qwen2()
    else:  # a tensor of several chunks (CPU chunks hold 2^18 entries)
        model = torch.nn.Sequential(torch.nn.Linear(size, size), torch.nn.Linear(size, 4))
    snap = ParameterSnapshot(model, dtype=snapshot_dtype)
    old = {n: t.clone() for n, t in snap.data.items()}
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 1e-2)
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, snap, old, new


@pytest.mark.parametrize("rebind", [True, False])
def test_toggled_tensors_read_old_the_others_new_and_exit_restores_every_bit(rebind):
    model, snap, old, new = _setup()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    before = state(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    names = list(new)
    first, second = names[1:4], names[3:6]  # overlapping: names[3] toggles twice
    with TensorExchange(model, delta, rebind=rebind) as ex:
        ex.toggle(first)
        ex.toggle(second)
        flipped = set(first) ^ set(second)
        assert ex.toggled == flipped
        for n, p in model.named_parameters():
            assert torch.equal(p, old[n] if n in flipped else new[n]), n
            rebound = p.data_ptr() == snap.data[n].data_ptr()
            assert rebound == (rebind and n in flipped), n
        assert torch.equal(delta.new.data[names[1]], new[names[1]] if rebind else old[names[1]])
        ex.toggle(names)  # everything flips: the complement reads W_old now
        for n, p in model.named_parameters():
            assert torch.equal(p, new[n] if n in flipped else old[n]), n
    assert_same_state(before, state(model))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert_same_state(old, dict(snap.data))


def test_rebind_copies_nothing_and_never_writes_the_snapshot():
    model, snap, old, _new = _setup()
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    with TensorExchange(model, delta) as ex:
        ex.toggle(list(old))
        assert not ex._buffers and not ex._saved
        assert_same_state(old, dict(snap.data))


def test_lossy_snapshot_dtype_saves_the_live_values_and_leaves_the_snapshot_alone():
    model, snap, old, new = _setup(snapshot_dtype=torch.bfloat16)
    before = state(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    name = "model.layers.0.mlp.up_proj.weight"
    with TensorExchange(model, delta) as ex:
        ex.toggle([name])
        assert torch.equal(model.get_parameter(name), old[name].float())
        assert torch.equal(snap.data[name], old[name])
        assert list(ex._saved) == [name]
        ex.toggle([name])
        assert torch.equal(model.get_parameter(name), new[name]) and not ex._saved
        ex.toggle([name])
    assert_same_state(before, state(model))
    assert_same_state(old, dict(snap.data))


def test_a_failure_halfway_through_a_tensor_puts_its_chunks_back(monkeypatch):
    model, snap, old, new = _setup(size=600)  # 360k entries: two chunks
    before = state(model)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    real = exchange_module._swap_chunk
    calls = {"n": 0}

    def failing(p, s, tmp):
        calls["n"] += 1
        if calls["n"] == 3:  # "0.bias" (one chunk) went over, then 0.weight's second chunk fails
            raise RuntimeError("injected")
        real(p, s, tmp)

    monkeypatch.setattr(exchange_module, "_swap_chunk", failing)
    with pytest.raises(RuntimeError, match="injected"), TensorExchange(
        model, delta, rebind=False
    ) as ex:
        ex.toggle(["0.bias", "0.weight"])
    assert calls["n"] == 5  # 0.weight's first chunk went back, then 0.bias on exit
    assert_same_state(before, state(model))
    assert_same_state(old, dict(snap.data))
    with TensorExchange(model, delta, rebind=False) as ex:  # and it still works
        ex.toggle(["0.weight"])
        assert torch.equal(model[0].weight, old["0.weight"])
        assert torch.equal(model[0].bias, new["0.bias"])


def test_non_contiguous_parameter_is_refused_by_value():
    model = torch.nn.Linear(3, 2, bias=False)
    model.weight = torch.nn.Parameter(torch.randn(3, 2).t())
    snap = ParameterSnapshot(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    ex = TensorExchange(model, delta, rebind=False)
    with pytest.raises(RuntimeError, match="not contiguous"), ex:
        ex.toggle(["weight"])
