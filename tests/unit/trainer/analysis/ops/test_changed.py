"""Changed sets and their overlaps against numpy: criteria, scores, pieces of a saved mask."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from grail.trainer.analysis.core.mask_file import ChangeCriterion, MaskWriter, load_mask
from grail.trainer.analysis.ops.changed import (
    REFERENCE_KEYS,
    ReferenceOverlap,
    changed_flags,
    reference_counts,
    reference_overlap,
    set_overlap,
)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """uint16 bf16 patterns of finite float32 values, rounded to nearest even, in numpy."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _pair(n: int, seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=g)
    new = old + torch.randn(n, generator=g) * scale * old.abs()
    new[:10] = old[:10]  # some untouched entries
    return old, new


def test_exact_and_threshold_against_numpy():
    old, new = _pair(10_000, 0, 1e-3)
    new[10] = float("nan")
    d = new - old
    ref = (new.double() - old.double()).numpy()
    exact = changed_flags(ChangeCriterion("exact"), old, new, d).numpy()
    assert np.array_equal(exact, (ref != 0) | np.isnan(ref))
    for t in (0.0, 1e-5, 1e-3):
        got = changed_flags(ChangeCriterion("threshold", t), old, new, d).numpy()
        # float32 deltas against the float32 threshold (as the library applies it)
        d32 = d.numpy()
        assert np.array_equal(got, (np.abs(d32) > np.float32(t)) | np.isnan(d32))


def test_bf16_view_against_explicit_rounding():
    old, new = _pair(50_000, 1, 4e-3)
    got = changed_flags(ChangeCriterion("bf16_view"), old, new, new - old).numpy()
    expected = bf16_reference(new.numpy()) != bf16_reference(old.numpy())
    assert np.array_equal(got, expected)
    assert 0.2 < expected.mean() < 0.8  # the test data straddles the rounding boundary


def test_bf16_view_of_bf16_values_is_exact_change():
    old, new = (t.to(torch.bfloat16) for t in _pair(5000, 2, 1e-2))
    got = changed_flags(ChangeCriterion("bf16_view"), old, new, None)
    assert torch.equal(got, new.view(torch.int16) != old.view(torch.int16))


def test_criteria_need_their_inputs():
    d = torch.zeros(3)
    with pytest.raises(ValueError, match="stored values"):
        changed_flags(ChangeCriterion("bf16_view"), None, None, d)
    with pytest.raises(ValueError, match="global top-k"):
        changed_flags(ChangeCriterion("keep_ratio", 0.1), d, d, d)


def test_set_overlap_formulas():
    rng = np.random.default_rng(3)
    a, b = rng.random(1000) < 0.2, rng.random(1000) < 0.5
    s = set_overlap(1000, int(a.sum()), int(b.sum()), int((a & b).sum()))
    da, db = a.mean(), b.mean()
    assert s["intersection"] == (a & b).sum() and s["union"] == (a | b).sum()
    assert s["jaccard"] == pytest.approx((a & b).sum() / (a | b).sum(), rel=1e-12)
    assert s["jaccard_random"] == pytest.approx(da * db / (da + db - da * db), rel=1e-12)
    assert s["jaccard_lift"] == pytest.approx(s["jaccard"] / s["jaccard_random"], rel=1e-12)
    assert s["overlap_a_in_b"] == pytest.approx((a & b).sum() / a.sum(), rel=1e-12)
    assert (s["overlap_a_in_b_random"], s["overlap_b_in_a_random"]) == (db, da)
    empty = set_overlap(10, 0, 0, 0)
    assert all(math.isnan(empty[k]) for k in ("jaccard", "jaccard_random", "jaccard_lift",
                                               "overlap_a_in_b", "overlap_b_in_a"))


@pytest.fixture
def saved(tmp_path):
    """A mask over two parameters and the same flags as numpy arrays."""
    rng = np.random.default_rng(4)
    shapes = {"w": (37, 11), "v": (101,)}
    flags = {n: rng.random(s) < 0.35 for n, s in shapes.items()}
    writer = MaskWriter(tmp_path / "ref.safetensors", shapes, ChangeCriterion("exact"))
    for n, f in flags.items():
        writer.write(n, torch.from_numpy(f))
    writer.finish()
    return load_mask(tmp_path / "ref.safetensors"), flags


def _pieces(numel: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A random partition of ``range(numel)`` into pieces at arbitrary (odd) offsets."""
    cuts = sorted(set(rng.integers(1, numel, size=6).tolist()))
    bounds = [0, *cuts, numel]
    return [(lo, hi - lo) for lo, hi in pairwise(bounds) if hi > lo]


def test_pieces_of_any_sharding_add_up_to_the_whole(saved):
    mask, ref = saved
    rng = np.random.default_rng(5)
    now = {n: rng.random(f.shape) < 0.5 for n, f in ref.items()}
    inter = sum(int((now[n] & ref[n]).sum()) for n in ref)
    union = sum(int((now[n] | ref[n]).sum()) for n in ref)
    total = sum(f.size for f in ref.values())
    count = sum(int(f.sum()) for f in now.values())
    a, b = count / total, mask.density
    jobs = [(n, lo, k) for n, f in ref.items() for lo, k in _pieces(f.size, rng)]
    for _ in range(3):  # several shardings, in shuffled order
        rng.shuffle(jobs)
        acc = ReferenceOverlap(mask)
        for n, lo, k in jobs:
            acc.update(n, lo, torch.from_numpy(now[n].reshape(-1)[lo : lo + k].copy()))
        assert acc.counts.tolist() == [inter, count, mask.changed, total]
        r = acc.result()
        assert list(r) == list(REFERENCE_KEYS)
        assert r["jaccard"] == inter / union
        assert r["jaccard_random"] == pytest.approx(a * b / (a + b - a * b), rel=1e-12)
        assert r["overlap_now_in_ref"] == inter / count
        assert r["overlap_ref_in_now"] == inter / mask.changed
        jobs = [(n, lo, k) for n, f in ref.items() for lo, k in _pieces(f.size, rng)]


def test_reference_counts_reject_pieces_outside_the_parameter(saved):
    mask, _ = saved
    with pytest.raises(ValueError, match="outside its 101 entries"):
        reference_counts(mask, "v", 100, torch.ones(2, dtype=torch.bool))
    assert math.isnan(reference_overlap([0, 0, 0, 0])["jaccard"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pieces_on_the_gpu_count_like_pieces_on_the_cpu(saved):
    mask, ref = saved
    rng = np.random.default_rng(6)
    now = {n: rng.random(f.shape) < 0.5 for n, f in ref.items()}
    totals = {}
    for device in ("cpu", "cuda"):
        acc = ReferenceOverlap(mask)
        for n, f in now.items():
            for lo, k in _pieces(f.size, rng):
                flags = torch.from_numpy(f.reshape(-1)[lo : lo + k].copy()).to(device)
                acc.update(n, lo, flags)
        assert acc.counts.device.type == device
        totals[device] = acc.counts.tolist()
    assert totals["cpu"] == totals["cuda"]
