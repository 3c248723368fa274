"""StreamingStats against float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.core.layout import LE, Layout
from grail.trainer.analysis.core.stats import CPU_CHUNK, StreamingStats, count_zeros, f32_floor

from ..reference import moments, to_numpy64

THRESHOLDS = [0.0, 1e-8, 1e-6, 1e-4, 0.5]


def _check(summary, ref, rel=1e-6):
    assert summary.count == ref["count"]
    assert summary.nonfinite == ref["nonfinite"]
    for t, c in ref["le"].items():
        assert summary.le[t] == c, t
    for key in ("sum_sq", "sum_abs"):
        assert getattr(summary, key) == pytest.approx(ref[key], rel=rel, abs=1e-300)
    assert summary.norm_l2 == pytest.approx(ref["norm_l2"], rel=rel)
    assert summary.max_abs == ref["max_abs"]
    assert summary.max == ref["max"]
    assert summary.min == ref["min"]
    scale = ref["sum_abs"] / max(ref["count"], 1)
    assert summary.mean == pytest.approx(ref["mean"], rel=1e-5, abs=1e-6 * scale + 1e-300)
    # sum_sq/n - mean^2 in float32 sums: absolute error ~sqrt(eps32) * rms when |mean| ~ rms
    rms = math.sqrt(ref["sum_sq"] / max(ref["count"], 1))
    assert summary.std == pytest.approx(ref["std"], rel=1e-5, abs=5e-4 * rms + 1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 1000, CPU_CHUNK * 2 + 17])
def test_update_matches_numpy(dtype, numel):
    gen = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=gen) * 1e-4).to(dtype)
    if numel > 10:
        x[::7] = 0  # exact zeros
        x[1::11] = 1e-6  # ties at a threshold (after rounding to dtype)
        x[3] = float("nan")
        x[5] = float("-inf")
    s = StreamingStats(THRESHOLDS)
    s.update(x)
    ref64 = to_numpy64(x)
    # thresholds compare the float32 value exactly as a real number
    _check(s.result(0), moments(ref64, THRESHOLDS))


def test_threshold_not_representable_in_float32_is_exact():
    t = 1e-6  # not a float32; the nearest float32 below and above must land on the right side
    below = np.float32(t)
    if float(below) > t:
        below = np.nextafter(below, np.float32(0))
    above = np.nextafter(below, np.float32(1))
    x = torch.tensor([float(below), float(above), -float(below), -float(above)])
    s = StreamingStats([t])
    s.update(x)
    assert s.result(0).le[t] == 2
    assert f32_floor(t) == float(below)


def test_groups_merge_and_accumulate():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, generator=gen), torch.randn(3000, generator=gen)
    s = StreamingStats([0.5], groups=["all", "a", "b"])
    s.update(a, groups=[0, 1])
    s.update(b, groups=[0, 2])
    ref_all = moments(np.concatenate([to_numpy64(a), to_numpy64(b)]), [0.5])
    _check(s.result("all"), ref_all)
    _check(s.result("a"), moments(to_numpy64(a), [0.5]))
    _check(s.result(2), moments(to_numpy64(b), [0.5]))

    s1 = StreamingStats([0.5])
    s1.update(a)
    s2 = StreamingStats([0.5])
    s2.update(b)
    _check(s1.merge(s2).all_reduce().result(0), ref_all)


def test_extra_sums_and_layout_checks():
    s = StreamingStats([], extra_sums=["x", "y"])
    s.add("x", torch.tensor(2.0))
    s.add("y", 3.0)
    s.add("x", 1.5)
    assert s.result(0).extra == {"x": 3.5, "y": 3.0}
    with pytest.raises(ValueError):
        s.merge(StreamingStats([0.1]))
    sums, maxes = s.moments(torch.ones(4))
    with pytest.raises(ValueError):
        s.accumulate(sums, maxes, 0, extras=[torch.tensor(1.0)])


def test_empty_and_all_nonfinite():
    s = StreamingStats([0.0])
    r = s.result(0)
    assert (r.count, r.nonfinite, r.norm_l2, r.mean, r.std, r.max, r.min) == (0, 0, 0, 0, 0, 0, 0)
    s.update(torch.tensor([math.nan, math.inf]))
    r = s.result(0)
    assert (r.count, r.nonfinite, r.le[0.0], r.max_abs) == (0, 2, 0, 0.0)
    assert r.fraction_le(0.0) == 0.0


def test_count_zeros_treats_nan_as_nonzero():
    x = torch.tensor([0.0, -0.0, 1.0, math.nan, math.inf, 0.0])
    assert int(count_zeros(x, torch.empty(6))) == 3


def test_std_is_population_std():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = StreamingStats()
    s.update(x)
    assert s.result(0).std == pytest.approx(float(np.std([1, 2, 3, 4])))
    assert s.result(0).five_numbers()["mean"] == 2.5


@pytest.mark.parametrize("numel", [1, 5000])
def test_sync_free_path_equals_the_host_path(numel):
    from grail.trainer.analysis.core.stats import chunk_moments

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(numel, generator=gen) * 1e-4
    if numel > 10:
        x[::9] = 0
        x[4] = float("nan")
        x[7] = float("inf")
    t32 = [f32_floor(t) for t in THRESHOLDS]
    bufs = [torch.empty(numel), torch.empty(numel), torch.empty(numel, dtype=torch.int32)]
    a = chunk_moments(x, t32, *bufs, sync_free=False)
    b = chunk_moments(x, t32, *bufs, sync_free=True)
    assert torch.equal(a[1], b[1])
    cols = Layout(tuple(THRESHOLDS)).moments
    scale = float(a[0][cols["sum_abs"]])  # the scale of summation error of the signed sum
    assert torch.allclose(a[0], b[0], rtol=1e-6, atol=1e-6 * scale)
    counts = cols.indices("count", "nonfinite", LE)
    assert len(counts) == 7 and torch.equal(a[0][counts], b[0][counts])  # counts are exact
    allbad = torch.tensor([float("nan")] * 3)
    small = [torch.empty(3), torch.empty(3), torch.empty(3, dtype=torch.int32)]
    c = chunk_moments(allbad, t32, *small, sync_free=True)
    d = chunk_moments(allbad, t32, *small, sync_free=False)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
