"""Each kernel's declared raw row: every named column holds what its name says.

The kernel functions run here as plain (uncompiled) torch code: the declaration is checked
against float64 numpy references column by column, so an entry added, dropped or moved in a
kernel's return, or in its declared field tuple, fails here by name. (The compiled forms are
checked against the same kind of references, through ``rows()``, in ``test_kernels.py``.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.core.layout import LE, Columns
from grail.trainer.analysis.core.stats import f32_floor
from grail.trainer.analysis.kernels import adam, change, moments
from grail.trainer.analysis.kernels.policy import constants

THRESHOLDS = [f32_floor(t) for t in (0.0, 1e-3, 0.5)]


def _named(row: torch.Tensor, cols: Columns) -> dict:
    assert row.shape == (len(cols),), (row.shape, cols.fields)
    values = row.tolist()
    return {k: values[cols.span(k)] if k == LE else values[cols[k]] for k in cols.fields}


def _data(n: int, nonfinite: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[::7] = 0.0
    x[1::11] = 0.5
    if nonfinite:
        x[3], x[5], x[8] = math.nan, math.inf, -math.inf
    return x


def _sums_ref(x: np.ndarray, thresholds: list[float]) -> dict:
    fin = np.isfinite(x)
    f = x[fin]
    return {
        "count": float(fin.sum()),
        "sum": float(f.sum()),
        "sum_sq": float((f * f).sum()),
        "sum_abs": float(np.abs(f).sum()),
        LE: [float((np.abs(f) <= np.float32(t)).sum()) for t in thresholds],
        "max_abs": float(np.abs(f).max()) if f.size else -math.inf,
        "max": float(f.max()) if f.size else -math.inf,
        "min": float(f.min()) if f.size else math.inf,
    }


def _check(got: dict, want: dict) -> None:
    """Exact for counts and extremes, 1e-12 relative for float64 sums."""
    assert set(got) <= set(want), set(got) - set(want)
    for key, value in got.items():
        if key in ("sum", "sum_sq", "sum_abs", "w_sq", "old_sq"):
            assert value == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
        else:
            assert value == want[key], key


@pytest.mark.parametrize("masked", [False, True])
def test_moments_rows(masked) -> None:
    x = _data(5000, nonfinite=masked, seed=1)
    fn = moments._moments_masked if masked else moments._moments_fast
    fields = moments.MASKED if masked else moments.FAST
    got = _named(fn(x, constants(THRESHOLDS)), Columns(fields, len(THRESHOLDS)))
    _check(got, _sums_ref(x.double().numpy(), THRESHOLDS))
    assert ("count" in got) == masked
    assert set(moments.CHECKED) <= set(fields)


@pytest.mark.parametrize("masked", [False, True])
def test_adam_rows(masked) -> None:
    gen = torch.Generator().manual_seed(2)
    m, v = torch.randn(4000, generator=gen) * 1e-3, torch.rand(4000, generator=gen) * 1e-6
    g, w = torch.randn(4000, generator=gen), torch.randn(4000, generator=gen)
    g[::9], m[1::17] = 0.0, 0.0
    if masked:
        m[4], v[6] = math.nan, math.inf
    t = [f32_floor(x) for x in (0.1, 0.9, 1.1)]
    c = constants([0.9, 1e-8, *t])
    fn, fields = (adam._adam_masked, adam.MASKED) if masked else (adam._adam_fast, adam.FAST)
    got = _named(fn(m, v, g, w, c), Columns(fields, len(t)))
    u = adam.adam_u(m, v, c[0], c[1]).double().numpy()  # the layout is under test, not u
    prod = np.nan_to_num(np.sign(g.double().numpy()) * np.sign(m.double().numpy()), nan=0.0)
    want = _sums_ref(u, t)
    want.update(
        w_sq=float((w.double().numpy() ** 2).sum()),
        agree=float((prod > 0).sum()),
        pairs=float((prod != 0).sum()),
    )
    _check(got, want)
    assert ("count" in got) == masked and set(adam.CHECKED) <= set(fields)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_change_rows(masked, dtype) -> None:
    old = _data(6000, nonfinite=False, seed=3).to(dtype)
    new = (old.float() + _data(6000, nonfinite=masked, seed=4) * 1e-2).to(dtype)
    new[::3] = old[::3]
    new[1::29] = -old[1::29]
    fn = change._change_masked if masked else change._change_fast
    fields = change.MASKED if masked else change.FAST
    got = _named(fn(new, old, constants(THRESHOLDS)), Columns(fields, len(THRESHOLDS)))
    n, o = new.double().numpy(), old.double().numpy()
    want = _sums_ref((new.float() - old.float()).double().numpy(), THRESHOLDS)
    bits = lambda t: t.to(torch.bfloat16).view(torch.int16).numpy()  # noqa: E731
    want.update(
        old_sq=float((o * o).sum()),
        bf16_same=float((bits(new) == bits(old)).sum()),
        flips=float((((n > 0) & (o < 0)) | ((n < 0) & (o > 0))).sum()),
    )
    _check(got, want)
    assert ("count" in got) == masked and set(change.CHECKED) <= set(fields)


def test_joint_row_is_the_adam_row_then_the_gradient_row() -> None:
    gen = torch.Generator().manual_seed(5)
    m, v, g, w = (torch.rand(3000, generator=gen) for _ in range(4))
    c, tg = constants([0.5, 1e-8, 0.1, 0.9]), constants(THRESHOLDS)
    joint = adam._joint_fast(m, v, g, w, c, tg)
    n_adam = len(adam.AdamBatch([0.1, 0.9]).fast)
    assert n_adam == len(Columns(adam.FAST, 2))
    assert torch.equal(joint[:n_adam], adam._adam_fast(m, v, g, w, c))
    assert torch.equal(joint[n_adam:], moments._moments_fast(g, tg))


def test_compare_rows() -> None:
    from grail.trainer.analysis.kernels import rows

    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 40, generator=gen), torch.randn(5, 40, generator=gen)
    p = torch.softmax(a, dim=-1)
    mass = p.double().sum(-1)
    out = rows._compare(a, b, p, mass)
    assert out.shape == (len(rows.COMPARE), 5)
    got = {name: out[i].tolist() for i, name in enumerate(rows.COMPARE)}
    a64, b64, p64 = (t.double().numpy() for t in (a, b, p))
    d = (a - b).double().numpy()
    centre = (p64 * d).sum(-1) / mass.numpy()
    dc = d - centre[:, None]
    want = {
        "sq": (d * d).sum(-1),
        "dots": (a64 * b64).sum(-1),
        "norm_a": (a64 * a64).sum(-1),
        "norm_b": (b64 * b64).sum(-1),
        "min_diff": dc.min(-1),
        "pd": (p64 * dc).sum(-1),
        "pe": (p64 * np.expm1(-dc)).sum(-1),
    }
    assert set(got) == set(want)
    for name, value in want.items():  # products are float32 in the kernel: ~1e-6 relative
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
