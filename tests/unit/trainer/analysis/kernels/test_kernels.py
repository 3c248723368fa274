"""The compiled single-pass kernels against float64 references and against each other."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from grail.trainer.analysis import kernels
from grail.trainer.analysis.core.layout import LE, MAXES, Columns
from grail.trainer.analysis.core.stats import f32_floor
from grail.trainer.analysis.kernels import moments, policy

from ..conftest import compiler_works

THRESHOLDS = [0.0, 1e-3, 0.5]

pytestmark = pytest.mark.skipif(
    not compiler_works(), reason="torch.compile does not work here (no C++ compiler?)"
)


@pytest.fixture(autouse=True)
def _kernels_at_any_model_size() -> Iterator[None]:
    with kernels.settings.override(min_total_numel=0):
        yield


def test_small_measurements_stay_eager() -> None:
    with kernels.settings.override(min_total_numel=1 << 24):
        assert kernels.worth_it(1 << 24) and not kernels.worth_it(1000)


def _data(n: int, dtype: torch.dtype, nonfinite: bool, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[::7] = 0.0
    x[1::11] = 0.5  # exactly on a threshold
    x[2::13] = -1e-3
    if nonfinite:
        x[3] = math.nan
        x[5] = math.inf
        x[8] = -math.inf
    return x.to(dtype)


def _moments_reference(x: torch.Tensor, thresholds: list[float]) -> dict[str, float]:
    v = x.float().double().numpy()
    fin = np.isfinite(v)
    f = v[fin]
    t32 = [float(np.float32(f32_floor(t))) for t in thresholds]
    return {
        "count": float(fin.sum()),
        "sum": float(f.sum()),
        "sum_sq": float((f * f).sum()),
        "sum_abs": float(np.abs(f).sum()),
        "nonfinite": float((~fin).sum()),
        "le": [float((np.abs(f) <= t).sum()) for t in t32],
        "max_abs": float(np.abs(f).max()) if f.size else -math.inf,
    }


def _named(row: torch.Tensor, cols: Columns) -> dict:
    """A row as ``{column name: value}`` (the threshold counts as a list)."""
    values = row.tolist()
    return {k: values[cols.span(k)] if k == LE else values[cols[k]] for k in cols.fields}


def _assert_row(sums: torch.Tensor, max_abs: float, ref: dict, cols: Columns) -> None:
    got = _named(sums, cols)
    assert got["count"] == ref["count"] and got["nonfinite"] == ref["nonfinite"]
    assert got[LE] == ref["le"]
    for key in ("sum", "sum_sq", "sum_abs"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-9), key
    assert max_abs == ref["max_abs"]


MAX_ABS = MAXES["max_abs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_moments_match_float64_reference(dtype, nonfinite) -> None:
    batch = kernels.MomentsBatch([f32_floor(t) for t in THRESHOLDS])
    xs = [_data(n, dtype, nonfinite, seed=n) for n in (70_001, 3000)]  # direct, then pooled
    assert [batch.add(x, [i]) for i, x in enumerate(xs)] == [True, True]
    sums, maxes, groups = batch.rows()
    assert groups == [(0,), (1,)]
    for i, x in enumerate(xs):
        ref = _moments_reference(x, THRESHOLDS)
        _assert_row(sums[i], float(maxes[i, MAX_ABS]), ref, batch.layout.moments)
    assert torch.isnan(maxes[:, MAXES.indices("max", "neg_min")]).all()  # not computed
    assert kernels.disabled_reason() is None


def test_moments_of_an_all_nonfinite_tensor() -> None:
    batch = kernels.MomentsBatch([0.0])
    batch.add(torch.tensor([math.nan, math.inf, -math.inf, math.nan]), [0])
    sums, maxes, _ = batch.rows()
    want = {"count": 0.0, "sum": 0.0, "sum_sq": 0.0, "sum_abs": 0.0, "nonfinite": 4.0, LE: [0.0]}
    assert _named(sums[0], batch.layout.moments) == want
    assert maxes[0, MAX_ABS] == -math.inf


def test_tensors_larger_than_a_slice_give_one_row_per_slice() -> None:
    x = _data(10_000, torch.float32, nonfinite=True)
    with kernels.settings.override(pool_numel=2):
        whole = kernels.MomentsBatch([0.0, 0.5])
        whole.add(x, [0])
        with kernels.settings.override(slice_numel=4096):
            sliced = kernels.MomentsBatch([0.0, 0.5])
            assert sliced.add(x, [0, 2])
        (s1, m1, _), (s2, m2, g2) = whole.rows(), sliced.rows()
    assert g2 == [(0, 2)] * 3
    count = whole.layout.moments["count"]
    assert s2.shape[0] == 3 and s2[:, count].tolist() == [3334 - 3, 3334, 3332]  # equal slices
    torch.testing.assert_close(s2.sum(0), s1[0], rtol=1e-13, atol=0)
    assert m2[:, MAX_ABS].max() == m1[0, MAX_ABS]


def test_small_or_accelerator_tensors_are_refused() -> None:
    batch = kernels.MomentsBatch([0.0])
    assert not batch.add(torch.ones(1), [0])
    assert not batch.add(torch.ones(2, 3), [0])  # callers pass flat views
    assert not kernels.MomentsBatch([0.0], min_numel=100).add(torch.ones(50), [0])
    assert not batch.add(torch.ones(200)[::2], [0])  # not contiguous
    adam = kernels.AdamBatch([0.1])
    ones = torch.ones(100)
    assert not adam.add(ones, ones, torch.ones(100, device="meta"), ones, 1.0, 0.0, [0])
    assert not adam.add(ones, ones, ones, ones, torch.tensor(1.0), 0.0, [0])  # device scalar
    sums, maxes, groups = batch.rows()
    assert sums.shape == (0, len(batch.layout.moments)) == (0, 6)
    assert maxes.shape == (0, len(MAXES)) and groups == []


@pytest.mark.usefixtures("_pool_flush_2500")
def test_small_tensors_are_pooled_per_groups_and_dtype() -> None:
    batch = kernels.MomentsBatch([f32_floor(t) for t in THRESHOLDS])
    xs = [_data(n, torch.float32, nonfinite=i == 3, seed=i) for i, n in enumerate([900] * 6)]
    xs.append(_data(900, torch.bfloat16, nonfinite=False, seed=9))
    keys = [[0], [0], [1, 2], [0], [0], [1, 2], [0]]
    for x, k in zip(xs, keys, strict=True):
        assert batch.add(x, k)
    sums, maxes, groups = batch.rows()
    # (0,): xs 0, 1, 3 flushed at 2700 entries, then xs 4 alone; (1, 2): xs 2, 5; bf16: xs 6
    members = {0: [0, 1, 3], 1: [4], 2: [2, 5], 3: [6]}
    assert sorted(groups) == sorted([(0,), (0,), (1, 2), (0,)])
    order = sorted(members, key=lambda r: min(members[r]))
    for row, r in enumerate(order):
        x = torch.cat([xs[i].float() for i in members[r]])
        ref = _moments_reference(x, THRESHOLDS)
        _assert_row(sums[row], float(maxes[row, MAX_ABS]), ref, batch.layout.moments)


def _adam_inputs(n: int, nonfinite: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=gen) * 1e-3
    v = torch.rand(n, generator=gen) * 1e-6
    v[::5] = m[::5] ** 2  # |u| near 1: the sign-descent band is populated
    g = torch.randn(n, generator=gen)
    g[::9] = 0.0
    m[1::17] = 0.0
    w = torch.randn(n, generator=gen)
    if nonfinite:
        m[4] = math.nan
        v[6] = math.inf
        g[7] = math.nan
    return m, v, g, w


def _adam_reference(m, v, g, w, scale, shift, thresholds) -> dict:
    # u in IEEE float32 (numpy), then float64 sums. (Eager torch.sqrt on CPU is not always
    # correctly rounded; the compiled kernel is.)
    f32 = np.float32
    u = ((m.numpy() * f32(scale)) / (np.sqrt(v.numpy()) + f32(shift))).astype(np.float64)
    fin = np.isfinite(u)
    au = np.abs(u[fin])
    gs, ms = np.sign(g.double().numpy()), np.sign(m.double().numpy())
    prod = np.nan_to_num(gs * ms, nan=0.0)
    return {
        "count": float(fin.sum()),
        "sum_sq": float((au * au).sum()),
        "sum_abs": float(au.sum()),
        "nonfinite": float((~fin).sum()),
        "le": [float((au <= np.float32(t)).sum()) for t in thresholds],
        "sign_sum": float(prod.sum()),
        "pairs": float((prod != 0).sum()),
        "w_sq": float((w.double().numpy() ** 2).sum()),
    }


@pytest.mark.parametrize("nonfinite", [False, True])
def test_adam_rows_match_float64_reference(nonfinite) -> None:
    t32 = [f32_floor(t) for t in (math.nextafter(0.1, 0), math.nextafter(0.9, 0), 1.1)]
    batch = kernels.AdamBatch(t32)
    inputs = _adam_inputs(50_000, nonfinite)
    scale, shift = 0.9, 1e-8
    assert batch.add(*inputs, scale, shift, [3], sign=-1.0, lr=0.01)
    sums, maxes, extras, groups = batch.rows()
    assert groups == [(3,)]
    ref = _adam_reference(*inputs, scale, shift, t32)
    got = _named(sums[0], batch.layout.moments)
    assert got["count"] == ref["count"] and got["nonfinite"] == ref["nonfinite"]
    assert got[LE] == ref["le"]
    assert math.isnan(got["sum"]) and torch.isnan(maxes).all()  # not computed
    assert got["sum_sq"] == pytest.approx(ref["sum_sq"], rel=1e-12)
    assert got["sum_abs"] == pytest.approx(ref["sum_abs"], rel=1e-12)
    assert list(extras) == list(kernels.AdamBatch.EXTRAS)
    sign_sum, pairs, w_sq, lr_u_sq = (float(extras[k][0]) for k in kernels.AdamBatch.EXTRAS)
    assert (sign_sum, pairs) == (-ref["sign_sum"], ref["pairs"])
    assert w_sq == pytest.approx(ref["w_sq"], rel=1e-12)
    assert lr_u_sq == pytest.approx(1e-4 * ref["sum_sq"], rel=1e-12)


@pytest.mark.parametrize("nonfinite", [False, True])
def test_joint_rows_equal_separate_rows(nonfinite) -> None:
    m, v, g, w = _adam_inputs(70_000, nonfinite, seed=3)
    ta, tg = [0.1, 0.9, 1.1], [0.0, 1e-8, 1e-6]
    sep_a, sep_g = kernels.AdamBatch(ta), kernels.MomentsBatch(tg)
    sep_a.add(m, v, g, w, 0.7, 1e-8, [0])
    sep_g.add(g, [1])
    joint_a, joint_g = kernels.AdamBatch(ta), kernels.MomentsBatch(tg)
    raw_a, raw_g = kernels.joint_rows(joint_a, joint_g, m, v, g, w, 0.7, 1e-8)
    joint_a.add(m, v, g, w, 0.7, 1e-8, [0], raw=raw_a)
    joint_g.add(g, [1], raw=raw_g)
    for a, b in zip(sep_a.rows() + sep_g.rows(), joint_a.rows() + joint_g.rows(), strict=True):
        if isinstance(a, list):
            assert a == b
        else:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0, equal_nan=True)  # dicts too
    # small tensors are pooled by each batch instead
    assert kernels.joint_rows(joint_a, joint_g, *(t[:1000] for t in (m, v, g, w)), 0.7, 0) is None


@pytest.fixture
def _pool_flush_2500() -> Iterator[None]:
    with kernels.settings.override(pool_flush=2500):  # the (0,) queue flushes once
        yield


@pytest.fixture
def fresh_kernels(monkeypatch):
    """Fresh compile state: a new failure record and new kernel objects."""
    monkeypatch.setattr(policy, "_failure", [])
    for name, fn in (
        ("_MOMENTS_FAST", moments._moments_fast),
        ("_MOMENTS_MASKED", moments._moments_masked),
    ):
        monkeypatch.setattr(moments, name, policy.Kernel(fn, 1))


def test_compiler_failure_warns_once_and_callers_go_eager(
    fresh_kernels, monkeypatch, caplog
) -> None:
    from grail.trainer.analysis.metrics.base import AnalysisContext
    from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore details")

    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(64, 32)
    model.weight.grad = torch.randn(32, 64)
    model.bias.grad = torch.randn(32)
    ctx = AnalysisContext(model=model)
    with caplog.at_level(logging.WARNING, logger="grail.trainer.analysis.kernels"):
        got = GradientSparsityMetrics(fused=True).compute(context=ctx)
        again = GradientSparsityMetrics(fused=True).compute(context=ctx)
    want = GradientSparsityMetrics(fused=False).compute(context=ctx)
    assert got == pytest.approx(want, rel=1e-6) and again == got
    assert [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()] == [
        caplog.records[0].getMessage()
    ]
    assert kernels.disabled_reason() == "RuntimeError: no C++ compiler found\nmore details"
    assert not kernels.MomentsBatch([0.0]).add(torch.ones(10), [0])


def test_signatures_beyond_the_limit_go_eager_without_failing(fresh_kernels) -> None:
    batch = kernels.MomentsBatch([0.0])
    with kernels.settings.override(max_signatures=1):
        assert batch.add(torch.ones(10), [0])
        assert not batch.add(torch.ones(10, dtype=torch.float64), [0])  # a second dtype
        assert batch.add(torch.ones(100_000), [0])  # sizes are dynamic: the same signature
    assert kernels.disabled_reason() is None


def test_a_failing_compiled_call_turns_the_kernels_off(fresh_kernels, monkeypatch, caplog) -> None:
    """An error from the compiled function itself (e.g. a recompile Dynamo decides on its own)
    is caught like a failed compile: the batch declines and the caller computes eagerly."""
    batch = kernels.MomentsBatch([0.0])
    assert batch.add(torch.ones(100_000), [0])  # compiles and runs

    def broken(*args):
        raise RuntimeError("recompile limit")

    monkeypatch.setattr(moments._MOMENTS_FAST, "_compiled", broken)
    with caplog.at_level(logging.WARNING, logger="grail.trainer.analysis.kernels"):
        assert not batch.add(torch.ones(100_000), [0])
        assert not batch.add(torch.ones(100_000), [0])
    assert kernels.disabled_reason() == "RuntimeError: recompile limit"
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1
    sums, _, groups = batch.rows()  # the row taken before the failure is still there
    assert groups == [(0,)] and sums[0, batch.layout.moments["count"]] == 100_000


def test_infinite_threshold_counts_only_finite_entries() -> None:
    from grail.trainer.analysis.metrics.base import AnalysisContext
    from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics

    model = torch.nn.Linear(100, 1000, bias=False)
    grad = torch.randn(1000, 100, generator=torch.Generator().manual_seed(0))
    grad[0, :3] = math.inf
    model.weight.grad = grad
    ctx = AnalysisContext(model=model)
    fused = GradientSparsityMetrics(thresholds=[0.0, math.inf], fused=True).compute(context=ctx)
    eager = GradientSparsityMetrics(thresholds=[0.0, math.inf], fused=False).compute(context=ctx)
    assert fused["gradient/sparsity_at_inf"] == eager["gradient/sparsity_at_inf"] == 1 - 3e-5
    # the mean is a cancelling sum: the eager path's float32 chunk sums carry ~1e-6 of it
    assert fused == pytest.approx(eager, rel=1e-5)


def test_grad_and_inference_modes_use_the_kernels() -> None:
    from grail.trainer.analysis.metrics.base import AnalysisContext
    from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics

    model = torch.nn.Linear(300, 300)
    model.weight.grad, model.bias.grad = torch.randn(300, 300), torch.randn(300)
    ctx = AnalysisContext(model=model)
    want = GradientSparsityMetrics(fused=False).compute(context=ctx)
    got = GradientSparsityMetrics().compute(context=ctx)  # grad mode on
    with torch.inference_mode():
        got_inference = GradientSparsityMetrics().compute(context=ctx)
    assert got == pytest.approx(want, rel=1e-6) and got_inference == pytest.approx(want, rel=1e-6)
    assert kernels.disabled_reason() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_change_rows_match_float64_reference(dtype, nonfinite) -> None:
    old = _data(70_001, dtype, nonfinite=False, seed=1)
    new = (old.float() + _data(70_001, torch.float32, nonfinite, seed=2) * 1e-2).to(dtype)
    new[::3] = old[::3]  # exactly unchanged entries
    new[1::29] = -old[1::29]  # sign flips
    thresholds = [0.0, 1e-3, 0.5]
    batch = kernels.ChangeBatch([f32_floor(t) for t in thresholds])
    assert batch.add(new, old, [0])
    assert not batch.add(new, old.float() if dtype != torch.float32 else old.double(), [0])
    sums, maxes, extras, groups = batch.rows()
    d = new.float() - old.float()  # exact in float32 for these dtypes
    ref = _moments_reference(d, thresholds)
    _assert_row(sums[0], float(maxes[0, MAX_ABS]), ref, batch.layout.moments)
    fin = torch.isfinite(d)
    assert maxes[0, MAXES["max"]] == d[fin].max() and maxes[0, MAXES["neg_min"]] == -d[fin].min()
    o, n = old.double().numpy(), new.double().numpy()
    bits = lambda t: t.to(torch.bfloat16).view(torch.int16).numpy()  # noqa: E731
    bf16_same = float((bits(new) == bits(old)).sum())
    exact = ref["le"][0]
    assert list(extras) == list(kernels.ChangeBatch.EXTRAS)
    assert float(extras["old_sum_sq"][0]) == pytest.approx(float((o * o).sum()), rel=1e-12)
    assert float(extras["exact_unchanged"][0]) == exact
    assert float(extras["bf16_unchanged"][0]) == (
        exact if dtype == torch.bfloat16 else bf16_same
    )
    flips = float((((n > 0) & (o < 0)) | ((n < 0) & (o > 0))).sum())
    assert float(extras["sign_flips"][0]) == flips
    assert groups == [(0,)]


def test_change_of_bf16_parameters_stored_as_float32_counts_bf16_as_exact() -> None:
    """The bf16-unchanged count of a bf16 parameter is its exact-unchanged count on both paths,
    also when both snapshots store it as float32 (+0 -> -0 unchanged, NaN -> NaN changed)."""
    from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    from grail.trainer.analysis.metrics import ParameterChangeMetrics

    model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight[0, :4] = torch.tensor([0.0, 1.0, math.nan, 3.0])
    old = ParameterSnapshot(model, dtype=torch.float32)
    with torch.no_grad():
        model.weight[0, 0] = -0.0
        model.weight[1:] += 1.0
    new = ParameterSnapshot(model, dtype=torch.float32)
    delta = old.compute_delta(new)
    fused = ParameterChangeMetrics(fused=True, track_sign_flips=True).compute(delta=delta)
    eager = ParameterChangeMetrics(fused=False, track_sign_flips=True).compute(delta=delta)
    key = "param_change/bf16_unchanged_ratio"
    assert fused[key] == eager[key] == fused["param_change/exact_unchanged_ratio"]
    # (std loses float32 digits to cancellation on the eager path here; float64 sums do not)
    assert fused == pytest.approx(eager, rel=1e-4, nan_ok=True)


def _swap_pair(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new, old)`` with every kind of entry a mask can meet: unchanged values, differences
    on and around the threshold, signed zeros, subnormals, infinities (NaN separately)."""
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=gen)
    new = old + torch.randn(n, generator=gen) * 1e-3
    new[::5] = old[::5]  # unchanged
    old[1::17], new[1::17] = 0.0, -0.0  # equal values, different bits
    if dtype == torch.float32:
        new[2::19] = old[2::19] + 1e-3  # differences near the threshold
    if dtype != torch.float16:  # float32 and bfloat16 reach subnormal differences
        old[3::23], new[3::23] = 2e-38, 2e-38 + 3e-39
    new[4::29] = math.inf
    old[6::31] = -math.inf
    return new.to(dtype), old.to(dtype)


def _eager_drop(drop, name: str, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    from grail.trainer.analysis.core.snapshot import float32_delta_

    d = float32_delta_(torch.empty(new.numel()), new, old)
    out = torch.empty(new.numel(), dtype=torch.int32)
    return drop(name, 0, d.abs_().view(torch.int32), out).bool()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [0.0, -0.0, 1e-45, 1e-3, -1.0, math.inf, math.nan])
def test_select_swap_moves_exactly_the_eager_masks_entries(dtype, threshold) -> None:
    from grail.trainer.analysis.ops.masks import NO_DROP, magnitude_drop, random_drop

    new, old = _swap_pair(10_007, dtype)
    d = (new.float() - old.float()).abs()
    if dtype != torch.float16:
        assert bool(((d > 0) & (d < torch.finfo(torch.float32).tiny)).any())  # subnormal
    if dtype == torch.float32:  # NaN payloads survive a float32 select
        new[7] = torch.tensor(0x7FA00001, dtype=torch.int32).view(torch.float32)
    p, s = new.clone(), old.clone()
    steps = [magnitude_drop(threshold), random_drop(0.3, seed=5), random_drop(0.8, seed=5)]
    state = NO_DROP
    for drop in steps:
        counts = kernels.select_swap(p, s, state, drop.spec, "w", 0, count_changed=True)
        assert counts is not None
        dropped = _eager_drop(drop, "w", new, old)
        assert torch.equal(p.view(torch.uint8), torch.where(dropped, old, new).view(torch.uint8))
        assert torch.equal(s.view(torch.uint8), torch.where(dropped, new, old).view(torch.uint8))
        changed = ~((new.float() - old.float()).abs() == 0)
        assert counts.tolist() == [int(dropped.sum()), int(changed.sum())]
        state = drop.spec
    assert kernels.select_swap(p, s, state, NO_DROP, "w", 0) is not None
    assert torch.equal(p.view(torch.uint8), new.view(torch.uint8))
    assert torch.equal(s.view(torch.uint8), old.view(torch.uint8))


def test_select_swap_random_bits_follow_name_and_offset() -> None:
    from grail.trainer.analysis.ops.masks import NO_DROP, random_drop, random_keep_mask

    new, old = _swap_pair(5_000, torch.float32)
    p, s = new.clone(), old.clone()
    offset = (1 << 32) - 1000  # the last block of counters before a new one: fits
    assert kernels.select_swap(p, s, NO_DROP, random_drop(0.5, 3).spec, "b", 123) is not None
    keep = random_keep_mask(5_000, 0.5, 3, "b", 123, "cpu")
    assert torch.equal(p, torch.where(keep, new, old))
    kernels.select_swap(p, s, random_drop(0.5, 3).spec, NO_DROP, "b", 123)
    assert kernels.select_swap(p, s, NO_DROP, random_drop(0.5, 3).spec, "b", offset) is None
    assert torch.equal(p, new)


def test_select_swap_declines_what_it_cannot_do_exactly() -> None:
    from grail.trainer.analysis.ops.masks import NO_DROP, magnitude_drop, random_drop

    new, old = _swap_pair(1_000, torch.bfloat16)
    mag = magnitude_drop(1e-3).spec
    two_seeds = (random_drop(0.5, 1).spec, random_drop(0.5, 2).spec)
    nan_new = new.clone()
    nan_new[3] = math.nan  # a NaN's payload would not survive a bfloat16 round trip
    for p, s, before, after in [
        (nan_new, old.clone(), NO_DROP, mag),
        (new.clone(), old.clone(), *two_seeds),
        (new.clone(), old.float(), NO_DROP, mag),  # dtypes differ
        (new.double(), old.double(), NO_DROP, mag),
        (new[::2], old[::2], NO_DROP, mag),  # strided
    ]:
        p0, s0 = p.clone(), s.clone()
        assert kernels.select_swap(p, s, before, after, "w", 0) is None
        assert torch.equal(p.isnan(), p0.isnan()) and torch.equal(p.nan_to_num(), p0.nan_to_num())
        assert torch.equal(s, s0)
