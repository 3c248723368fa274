"""Named columns: the layout of StreamingStats, the eager chunk rows and their readers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.core.layout import (
    BASE_SUMS,
    LE,
    MAXES,
    MOMENTS,
    Columns,
    Layout,
    assign,
    stack_row,
)
from grail.trainer.analysis.core.stats import StreamingStats, chunk_moments, f32_floor

from ..reference import moments, to_numpy64

THRESHOLDS = [0.0, 1e-6, 0.5]


def test_columns_name_every_column_once() -> None:
    cols = Columns(("count", LE, "max_abs", "flips"), n_thresholds=3)
    assert len(cols) == 6
    assert (cols["count"], cols.span(LE), cols["max_abs"], cols["flips"]) == (
        0,
        slice(1, 4),
        4,
        5,
    )
    assert cols.indices("flips", LE, "count") == [5, 1, 2, 3, 0]
    assert "flips" in cols and "sum" not in cols
    with pytest.raises(KeyError, match="span"):
        cols[LE]  # several columns: only span() gives them
    with pytest.raises(KeyError, match="no column 'sum'"):
        cols["sum"]
    with pytest.raises(ValueError, match="twice"):
        Columns(("sum", "sum"))
    assert len(Columns((LE,), n_thresholds=0)) == 0  # no thresholds: no columns


def test_layout_of_the_statistics() -> None:
    layout = Layout((0.0, 1e-6), ("old_sq", "flips"))
    assert layout.moments.fields == MOMENTS == (*BASE_SUMS, LE)
    assert layout.sums.fields == (*MOMENTS, "old_sq", "flips")
    assert len(layout.moments) == 7 and len(layout.sums) == 9 and len(layout.maxes) == 3
    assert [layout.le(0.0), layout.le(1e-6)] == list(range(*layout.sums.span(LE).indices(9)))
    assert layout.sums["old_sq"] == 7 and layout.sums["flips"] == 8
    # the moments lead the sums: a row of moments fills the first columns of a full row
    assert all(layout.moments.span(k) == layout.sums.span(k) for k in MOMENTS)
    assert layout.new_sums(4).shape == (4, 7) and layout.new_sums(extras=True).shape == (9,)
    assert torch.equal(layout.new_maxes(2), torch.full((2, 3), -math.inf, dtype=torch.float64))
    assert Layout((0.0,), ("a",)) == Layout([0.0], ["a"]) != Layout((0.0,), ("b",))


@pytest.mark.parametrize("name", [*BASE_SUMS, LE])
def test_extra_sums_may_not_shadow_a_reserved_column(name) -> None:
    with pytest.raises(ValueError, match="reserved"):
        Layout((0.5,), ("fine", name))
    with pytest.raises(ValueError, match="reserved"):
        StreamingStats([0.5], extra_sums=[name])


def test_stack_row_and_assign_move_values_by_name() -> None:
    fields = ("b", LE, "a")
    one, two, seven = (torch.tensor(v) for v in (1.0, 2.0, 7.0))
    row = stack_row(fields, {"a": one, LE: [seven, seven], "b": two})
    assert row.tolist() == [2.0, 7.0, 7.0, 1.0]
    rows = stack_row(("x", "y"), {"x": torch.arange(3.0), "y": -torch.arange(3.0)}, dim=1)
    assert rows.tolist() == [[0.0, -0.0], [1.0, -1.0], [2.0, -2.0]]
    src = Columns(fields, 2)
    dst_cols = Columns(("a", "c", LE, "b"), 2)
    dst = torch.zeros(2, len(dst_cols))
    assign(dst, dst_cols, row.expand(2, -1), src, ("a", "b", LE))
    assert dst.tolist() == [[1.0, 0.0, 7.0, 7.0, 2.0]] * 2


def test_extra_columns_by_name() -> None:
    layout = Layout((), ("x", "y", "z"))
    like = torch.zeros(2, 5, dtype=torch.float64)
    got = layout.extra_columns({"z": torch.tensor([1.0, 2.0]), "x": torch.tensor([3.0, 4.0])}, like)
    assert got.dtype == torch.float64 and got.tolist() == [[3.0, 0.0, 1.0], [4.0, 0.0, 2.0]]
    with pytest.raises(ValueError, match="unknown extra sums \\['w'\\]"):
        layout.extra_columns({"w": torch.tensor([1.0, 2.0])}, like)


def _named(row: torch.Tensor, cols: Columns) -> dict:
    values = row.tolist()
    return {k: values[cols.span(k)] if k == LE else values[cols[k]] for k in cols.fields}


@pytest.mark.parametrize("sync_free", [False, True])
def test_chunk_moments_columns_hold_what_their_names_say(sync_free) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=gen) * 1e-3
    x[::9] = 0.0
    x[4], x[7], x[11] = math.nan, math.inf, 3.0  # 3.0: the largest magnitude, positive
    x[12] = -2.0  # the smallest value
    t32 = [f32_floor(t) for t in THRESHOLDS]
    bufs = [torch.empty(5000), torch.empty(5000), torch.empty(5000, dtype=torch.int32)]
    sums, maxes = chunk_moments(x, t32, *bufs, sync_free=sync_free)
    layout = Layout(tuple(THRESHOLDS))
    ref = moments(to_numpy64(x), THRESHOLDS)
    got = _named(sums, layout.moments)
    assert (got["count"], got["nonfinite"]) == (ref["count"], ref["nonfinite"])
    assert got[LE] == [ref["le"][t] for t in THRESHOLDS]
    for key in ("sum", "sum_sq", "sum_abs"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
    assert _named(maxes, layout.maxes) == {"max_abs": 3.0, "max": 3.0, "neg_min": 2.0}


def test_results_read_every_column_by_name() -> None:
    """Distinct values in every column: each Summary field must come from its own column."""
    s = StreamingStats([0.25, 0.5], groups=["g"], extra_sums=["e1", "e2"])
    values = {name: float(10 + i) for i, name in enumerate(s.layout.sums.fields) if name != LE}
    for name, v in values.items():
        s.sums[0, s.column(name)] = v
    s.sums[0, s.column(0.25)], s.sums[0, s.column(0.5)] = 3.0, 4.0
    for name, v in (("max_abs", 7.0), ("max", 6.0), ("neg_min", 5.0)):
        s.maxes[0, MAXES[name]] = v
    r = s.result("g")
    assert (r.count, r.sum, r.sum_sq, r.sum_abs, r.nonfinite) == tuple(
        values[k] for k in BASE_SUMS
    )
    assert r.le == {0.25: 3, 0.5: 4} and r.extra == {"e1": values["e1"], "e2": values["e2"]}
    assert (r.max_abs, r.max, r.min) == (7.0, 6.0, -5.0)


def test_accumulate_rows_places_extras_by_name() -> None:
    s = StreamingStats([0.5], groups=["a", "b"], extra_sums=["x", "y"])
    sums = s.layout.new_sums(2)
    sums[:, s.column("count")] = torch.tensor([1.0, 2.0])
    maxes = s.layout.new_maxes(2, fill=1.0)
    s.accumulate_rows(sums, maxes, [[0], [0, 1]], {"y": torch.tensor([5.0, 6.0])})
    a, b = s.results()
    assert (a.count, a.extra) == (3, {"x": 0.0, "y": 11.0})
    assert (b.count, b.extra) == (2, {"x": 0.0, "y": 6.0})
    with pytest.raises(ValueError, match="unknown extra sums"):
        s.accumulate_rows(sums, maxes, [[0], [1]], {"z": torch.tensor([1.0, 1.0])})
    with pytest.raises(ValueError, match="fit neither"):
        s.accumulate_rows(sums[:, :3], maxes, [[0], [1]])


def test_accumulate_takes_extras_by_name_or_in_declared_order() -> None:
    by_name = StreamingStats([], extra_sums=["x", "y"])
    in_order = StreamingStats([], extra_sums=["x", "y"])
    sums, maxes = by_name.moments(torch.tensor([1.0, -2.0]))
    by_name.accumulate(sums, maxes, 0, {"y": torch.tensor(2.0), "x": torch.tensor(1.0)})
    in_order.accumulate(sums, maxes, 0, [torch.tensor(1.0), torch.tensor(2.0)])
    assert by_name.result(0) == in_order.result(0)
    assert by_name.result(0).extra == {"x": 1.0, "y": 2.0}
    with pytest.raises(ValueError, match="no extra sum 'count'"):
        by_name.add("count", 1.0)


def test_a_float64_reference_agrees_with_the_layout_after_merge() -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(3000, generator=gen), torch.randn(1000, generator=gen)
    s1, s2 = StreamingStats(THRESHOLDS), StreamingStats(THRESHOLDS)
    s1.update(a)
    s2.update(b)
    r = s1.merge(s2).result(0)
    ref = moments(np.concatenate([to_numpy64(a), to_numpy64(b)]), THRESHOLDS)
    assert r.le == ref["le"] and r.count == ref["count"]
    assert r.max == ref["max"] and r.min == ref["min"] and r.max_abs == ref["max_abs"]
