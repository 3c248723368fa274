"""The compile policy: modes, the break-even schedule of "auto" against an independent
reference, the timing it decides from, and computers switching to the kernels mid-run."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from grail.trainer.analysis import AnalysisConfig, kernels
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.kernels import ledger, policy
from grail.trainer.analysis.metrics import ParameterChangeMetrics, SparseQualityMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext
from tests.conftest import tiny_qwen2

from ..conftest import compiler_works
from ..reference import assert_same_state, delta32, state

BIG = 1 << 30  # a measurement size above every size limit


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults_to_auto() -> None:
    assert AnalysisConfig().fused_kernels == "auto"
    assert AnalysisConfig.comprehensive().fused_kernels == "auto"


@pytest.mark.parametrize("mode", [True, False, "auto"])
def test_config_accepts_the_three_modes_and_round_trips(mode) -> None:
    cfg = AnalysisConfig(fused_kernels=mode)
    again = AnalysisConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fused_kernels == mode
    assert type(again.fused_kernels) is type(mode)


@pytest.mark.parametrize("bad", [1, 0, 1.0, None, "true", "on", "Auto", "", ["auto"]])
def test_config_rejects_other_values_naming_the_field(bad) -> None:
    with pytest.raises(ValueError, match=r"fused_kernels=.*True, False or \"auto\""):
        AnalysisConfig(fused_kernels=bad)
    with pytest.raises(ValueError, match="fused_kernels"):
        AnalysisConfig.from_dict({"fused_kernels": bad})


# --- modes ------------------------------------------------------------------------------------


def test_false_never_true_from_the_size_limit_and_nothing_recorded_below_it() -> None:
    with kernels.settings.override(min_total_numel=1000):
        assert not kernels.use("change", BIG, False)
        assert not kernels.use("change", 999, True) and not kernels.use("change", 999, "auto")
        assert kernels.report() == {}  # neither False nor small measurements are counted
        assert kernels.use("change", 1000, True)
        assert kernels.report()["change"]["compiled_measurements"] == 1


def test_unknown_modes_and_families_are_errors() -> None:
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="mode must be one of"):
            kernels.use("change", BIG, bad)
    with pytest.raises(ValueError, match="unknown kernel family 'chnage'"):
        kernels.use("chnage", BIG, "auto")


def test_a_failed_compiler_keeps_every_mode_eager(monkeypatch) -> None:
    monkeypatch.setattr(policy, "_failure", ["RuntimeError: no compiler"])
    with kernels.settings.override(startup_seconds=0.0, kernel_seconds=0.0):
        assert not kernels.use("swap", BIG, True) and not kernels.use("swap", BIG, "auto")


def test_the_same_step_is_one_measurement_with_one_answer() -> None:
    with kernels.settings.override():
        first = kernels.use("adam", BIG, "auto", step=5)
        again = kernels.use("adam", BIG, "auto", step=5)
        assert bool(first) is bool(again) is False
        assert kernels.report()["adam"]["measurements"] == 1
        kernels.use("adam", BIG, "auto", step=6)
        kernels.use("adam", BIG, "auto")
        kernels.use("adam", BIG, "auto")  # no step: every call is a measurement
        assert kernels.report()["adam"]["measurements"] == 4


def test_override_starts_a_fresh_ledger_and_restores_the_old_one() -> None:
    with kernels.settings.override():
        kernels.use("rows", BIG, "auto")
        with kernels.settings.override(horizon=3):
            assert kernels.report() == {}
            kernels.use("moments", BIG, "auto")
            assert set(kernels.report()) == {"moments"}
        assert set(kernels.report()) == {"rows"} and kernels.settings.horizon == 10


# --- the break-even schedule ------------------------------------------------------------------


def _schedule(family: str, eager: float, n: int, families: tuple[str, ...] = ()) -> list[bool]:
    """Decisions of ``n`` measurements of ``family`` whose eager work takes ``eager`` seconds
    (recorded straight into the ledger: no clock involved); ``families`` are decided (and take
    the same time) after it in every measurement."""
    out = []
    for step in range(n):
        for name in (family, *families):
            decision = kernels.use(name, BIG, "auto", step=step)
            ledger.current().record(decision, 0.0 if decision else eager, 0.0)
            if name == family:
                out.append(bool(decision))
    return out


def _reference_switch(saving: float, eager: float, kernels_: int, n: int) -> int | None:
    """The first measurement the rule compiles at, written out for one family alone."""
    s = saving * eager
    h = kernels.settings.horizon
    for m in range(1, n + 1):
        remaining = h - m + 1 if m <= h else m - 1
        history = s if m > 2 else 0.0  # two eager measurements known
        net = history * remaining - kernels_ * kernels.settings.kernel_seconds
        if net >= 0 and net >= kernels.settings.startup_seconds:
            return m
    return None


@pytest.mark.parametrize(
    ("eager", "switch"),
    [(4.0, 3), (1.0, 24), (0.01, None)],  # by hand: 0.5*4*8-1.5 >= 10; 0.5*1*23-1.5 >= 10
)
def test_schedule_by_hand(monkeypatch, eager, switch) -> None:
    monkeypatch.setitem(policy._PRIORS, "change", (0.5, 1))
    with kernels.settings.override(startup_seconds=10.0, kernel_seconds=1.5, horizon=10):
        got = _schedule("change", eager, 100)
        assert _reference_switch(0.5, eager, 1, 100) == switch
        expected = [False] * 100 if switch is None else [m >= switch for m in range(1, 101)]
        assert got == expected
        info = kernels.report()["change"]
        assert info["switched_at"] == switch
        assert info["eager_measurements"] == (switch - 1 if switch else 99)  # 100th: open


@pytest.mark.parametrize("family", sorted(policy._PRIORS))
@pytest.mark.parametrize("eager", [0.05, 0.3, 1.0, 3.0])
def test_schedule_of_every_family_matches_the_reference(family, eager) -> None:
    saving, n_kernels = policy._PRIORS[family]
    with kernels.settings.override():
        got = _schedule(family, eager, 200)
        switch = _reference_switch(saving, eager, n_kernels, 200)
    assert got == [switch is not None and m >= switch for m in range(1, 201)]


def test_zero_estimated_cost_compiles_at_the_first_measurement() -> None:
    with kernels.settings.override(startup_seconds=0.0, kernel_seconds=0.0):
        assert _schedule("swap", 1.0, 3) == [True, True, True]


def test_families_share_the_startup(monkeypatch) -> None:
    """Each family alone does not repay the startup; together they do, at the same
    measurement (the second family switches when its turn comes in it)."""
    monkeypatch.setitem(policy._PRIORS, "change", (0.5, 1))
    monkeypatch.setitem(policy._PRIORS, "swap", (0.5, 2))
    with kernels.settings.override(startup_seconds=10.0, kernel_seconds=1.0, horizon=10):
        assert _schedule("change", 2.0, 4)[2] is False  # net 0.5*2*8 - 1 = 7 < 10
    with kernels.settings.override(startup_seconds=10.0, kernel_seconds=1.0, horizon=10):
        got = _schedule("change", 2.0, 4, families=("swap",))
        assert got == [False, False, True, True]  # 7 + 6 >= 10
        report = kernels.report()
        assert report["change"]["switched_at"] == report["swap"]["switched_at"] == 3
        assert report["swap"]["compiled_measurements"] == 2


def test_measured_compiles_replace_the_estimates(monkeypatch) -> None:
    """The startup is paid once; later compiles lower the per-kernel estimate (never raise
    it)."""
    monkeypatch.setitem(policy._PRIORS, "rows", (0.5, 2))
    with kernels.settings.override(startup_seconds=100.0, kernel_seconds=1.5, horizon=0):
        book = ledger.current()
        book.compiled(20.0)  # the first compile: startup paid
        book.compiled(0.2)
        book.compiled(0.4)  # per kernel: 0.3
        # net = 0.5 * 0.1 * (m - 1) - 2 * 0.3 >= 0  <=>  m >= 13 (horizon 0: R = m - 1)
        assert _schedule("rows", 0.1, 14).index(True) + 1 == 13
    with kernels.settings.override(startup_seconds=0.0, kernel_seconds=0.1, horizon=0):
        ledger.current().compiled(1.0)
        ledger.current().compiled(9.0)  # slower than the estimate: the estimate stays
        assert _schedule("rows", 0.1, 6).index(True) + 1 == 5  # 0.05 (m - 1) >= 0.2


def test_the_cheapest_eager_measurement_is_the_estimate(monkeypatch) -> None:
    """A slow first measurement (warming up) does not make compiling look better."""
    monkeypatch.setitem(policy._PRIORS, "change", (0.5, 1))
    with kernels.settings.override(startup_seconds=10.0, kernel_seconds=1.0, horizon=10):
        for step, seconds in enumerate([100.0, 1.0, 1.0]):
            decision = kernels.use("change", BIG, "auto", step=step)
            assert not decision  # the mean of 100 and 1 would predict 0.5*50.5*8 - 1 >= 10
            ledger.current().record(decision, seconds, 0.0)
        assert kernels.report()["change"]["eager_min"] == 1.0


@hsettings(max_examples=200, deadline=None)
@given(
    phi=st.floats(0.05, 0.95),
    eager=st.floats(1e-3, 20.0),
    startup=st.floats(0.0, 60.0),
    per_kernel=st.floats(0.0, 5.0),
    horizon=st.integers(2, 20),
    family=st.sampled_from(sorted(policy._PRIORS)),
)
def test_window_promise_and_ski_rental_bound(phi, eager, startup, per_kernel, horizon, family):
    """With costs as estimated: over the first ``horizon`` measurements "auto" costs no more
    than eager, and over any longer run at most twice the best choice in hindsight (plus one
    measurement's saving), measured as the excess over an always-compiled run."""
    n_kernels = policy._PRIORS[family][1]
    saved = dict(policy._PRIORS)
    policy._PRIORS[family] = (phi, n_kernels)
    try:
        with kernels.settings.override(
            startup_seconds=startup, kernel_seconds=per_kernel, horizon=horizon
        ):
            runs = _schedule(family, eager, 50 * horizon)
    finally:
        policy._PRIORS.clear()
        policy._PRIORS.update(saved)
    s, compile_cost = phi * eager, startup + n_kernels * per_kernel
    switch = runs.index(True) + 1 if any(runs) else None

    def cost(n: int) -> float:
        if switch is None or switch > n:
            return n * eager
        return (switch - 1) * eager + compile_cost + (n - switch + 1) * (1 - phi) * eager

    assert cost(horizon) <= horizon * eager * (1 + 1e-9) + 1e-12
    for n in (horizon, 2 * horizon, 5 * horizon, 50 * horizon):
        extra = cost(n) - n * (1 - phi) * eager
        best = min(n * s, compile_cost)
        assert extra <= 2 * best + 2 * s + 1e-9 * (1 + extra)


# --- timing -----------------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    """A work clock that moves only when told to."""
    now = [0.0]
    monkeypatch.setattr(ledger, "work_seconds", lambda: now[0])
    return now


def test_work_is_cpu_time_per_thread() -> None:
    """Sleeping (waiting, as on a busy machine) is not work; computing is, per thread."""
    start = ledger.work_seconds()
    time.sleep(0.2)
    assert ledger.work_seconds() - start < 0.1
    cpu = time.process_time()
    x = torch.ones(1 << 16)
    while time.process_time() - cpu < 0.05:
        x.mul_(1.0)
    spent = ledger.work_seconds() - start
    assert spent * torch.get_num_threads() == pytest.approx(time.process_time() - cpu, abs=0.02)


def test_timed_records_work_apart_from_compiling(clock) -> None:
    with kernels.settings.override():
        decision = kernels.use("change", BIG, "auto", step=1)
        with kernels.timed(decision):
            clock[0] += 2.0
            ledger.current().compiled(3.0)  # as Kernel does, around a compile
            clock[0] += 3.0
        with kernels.timed(decision):
            clock[0] += 1.0
        info = kernels.report()["change"]
        assert (info["open_seconds"], info["compile_seconds"]) == (3.0, 3.0)
        kernels.use("change", BIG, "auto", step=2)  # closes measurement 1
        info = kernels.report()["change"]
        assert (info["eager_measurements"], info["eager_min"], info["eager_seconds"]) == (
            1,
            3.0,
            3.0,
        )


def test_timed_ignores_flags_nested_blocks_and_blocks_without_a_decision(clock) -> None:
    with kernels.settings.override():
        swap = kernels.use("swap", BIG, "auto", step=1)
        for flag in (True, False, kernels.use("swap", 10, "auto")):  # the last: too small
            with kernels.timed(flag):
                clock[0] += 5.0
        with kernels.timed():  # nothing decided inside
            clock[0] += 5.0
        with kernels.timed(swap):
            clock[0] += 1.0
            with kernels.timed(swap):  # e.g. a restore inside a switch: counted once
                clock[0] += 1.0
        assert kernels.report()["swap"]["open_seconds"] == 2.0


def test_a_decorated_call_times_the_first_decision_taken_inside(clock) -> None:
    @kernels.timed()
    def compute(step: int) -> bool:
        clock[0] += 1.0
        first = kernels.use("moments", BIG, "auto", step=step)
        kernels.use("adam", BIG, "auto", step=step)  # a joint pass asks too: not bound
        clock[0] += 2.0
        return bool(first)

    with kernels.settings.override():
        compute(1)
        compute(2)
        report = kernels.report()
        moments, adam = report["moments"], report["adam"]
        assert (moments["eager_seconds"], moments["open_seconds"]) == (3.0, 3.0)
        assert (adam["eager_seconds"], adam["open_seconds"]) == (0.0, 0.0)


def test_a_failing_block_still_records_and_closes(clock) -> None:
    with kernels.settings.override():
        decision = kernels.use("rows", BIG, "auto", step=1)
        with pytest.raises(RuntimeError), kernels.timed(decision):
            clock[0] += 4.0
            raise RuntimeError("forward failed")
        with kernels.timed(decision):  # the block closed: this one is not nested
            clock[0] += 1.0
        assert kernels.report()["rows"]["open_seconds"] == 5.0


# --- computers switching mid-run --------------------------------------------------------------

needs_compiler = pytest.mark.skipif(
    not compiler_works(), reason="torch.compile does not work here (no C++ compiler?)"
)


@torch.no_grad()
def _nudge(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen) * 1e-3
        d[torch.rand(p.shape, generator=gen) < 0.3] = 0
        p.add_(d.to(p.dtype))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameter_change_switches_mid_run_with_the_same_numbers(dtype) -> None:
    """Eager measurements equal the eager computer bit for bit, compiled ones agree with it and
    with a float64 numpy reference; the switch happens where the settings make it pay."""
    model = tiny_qwen2(dtype=dtype)
    auto = ParameterChangeMetrics(thresholds=[0.0, 1e-4], per_layer=True, fused="auto")
    eager = ParameterChangeMetrics(thresholds=[0.0, 1e-4], per_layer=True, fused=False)
    big = {"min_total_numel": 0, "pool_numel": 64, "startup_seconds": 1e9, "kernel_seconds": 0.0}
    with kernels.settings.override(**big):
        for step in range(1, 5):
            if step == 3:
                kernels.settings.startup_seconds = 0.0  # from now on compiling is free
            snap = ParameterSnapshot(model)
            _nudge(model, step)
            delta = snap.compute_delta(ParameterSnapshot.live(model))
            ctx = AnalysisContext(step=step)
            got, want = auto.compute(delta, context=ctx), eager.compute(delta, context=ctx)
            assert got.keys() == want.keys()
            if step < 3:
                assert got == want
            else:
                for key, value in want.items():
                    assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
            d = np.concatenate(
                [delta32(p, snap.data[n]).astype(np.float64) for n, p in model.named_parameters()]
            )
            assert got["param_change/norm_l2"] == pytest.approx(np.sqrt((d * d).sum()), rel=1e-6)
            assert got["param_change/sparsity_at_0e+00"] == (d == 0).mean()
        info = kernels.report()["change"]
        assert kernels.disabled_reason() is None
    assert (info["switched_at"], info["eager_measurements"], info["compiled_measurements"]) == (
        3,
        2,
        2,
    )


@needs_compiler
@pytest.mark.parametrize("failing", [False, True])
def test_sparse_quality_switches_mid_run_exactly_restoring_the_model(failing):
    """Across the switch: the same numbers as the eager computer; weights, snapshot, RNG state,
    training flags and gradients exactly as before each measurement, also when the forward pass
    raises in the first compiled measurement."""
    model = tiny_qwen2()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    auto = SparseQualityMetrics(thresholds=[1e-3], seed=1, fused="auto")
    eager = SparseQualityMetrics(thresholds=[1e-3], seed=1, fused=False)
    big = {"min_total_numel": 0, "pool_numel": 64, "startup_seconds": 1e9, "kernel_seconds": 0.0}
    with kernels.settings.override(**big):
        for step in range(1, 5):
            if step == 3:
                kernels.settings.startup_seconds = 0.0
            snap = ParameterSnapshot(model)
            _nudge(model, step)
            delta = snap.compute_delta(ParameterSnapshot.live(model))
            ctx = AnalysisContext(model=model, inputs={"input_ids": ids}, step=step)
            before, snapshot = state(model), {n: t.clone() for n, t in snap.data.items()}
            modes, rng = [m.training for m in model.modules()], torch.get_rng_state()
            if failing and step == 3:
                calls = []

                def fail_second(module, args, output, calls=calls):
                    calls.append(1)
                    if len(calls) == 2:  # the first masked variant, weights swapped
                        raise RuntimeError("forward failed")

                handle = model.model.layers[1].register_forward_hook(fail_second)
                with pytest.raises(RuntimeError, match="forward failed"):
                    auto.compute(delta, context=ctx)
                handle.remove()
            else:
                got = auto.compute(delta, context=ctx)
                want = eager.compute(delta, context=ctx)
                for key, value in want.items():
                    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
            assert_same_state(before, state(model))
            assert_same_state(snapshot, dict(snap.data))
            assert [m.training for m in model.modules()] == modes
            assert torch.equal(torch.get_rng_state(), rng)
        report = kernels.report()
    assert report["swap"]["switched_at"] == report["rows"]["switched_at"] == 3
    assert report["swap"]["compiled_measurements"] == 2
    assert kernels.disabled_reason() is None


def test_modes_reach_every_computer_through_the_config() -> None:
    from grail.trainer.analysis.metrics.registry import build_computers

    for mode in (True, False, "auto"):
        computers = build_computers(AnalysisConfig.comprehensive(fused_kernels=mode))
        assert {c.fused for c in computers if hasattr(c, "fused")} == {mode}
