"""Masks: magnitude masks, the counter-based random bits, and exact keep-ratio thresholds."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.core.stats import f32_floor
from grail.trainer.analysis.ops.masks import (
    keep_ratio_thresholds,
    keep_threshold_bits,
    magnitude_drop,
    magnitude_keep_mask,
    mix_seed,
    random_bits,
    random_drop,
    random_keep_mask,
    random_uniforms,
)

F32_MAX = float(np.finfo(np.float32).max)

# A threshold beyond the float32 range (1e39) is cast to float32 on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def _f32(x: float) -> float:
    with np.errstate(over="ignore"):  # 1e39 rounds to inf: intended
        return float(np.float32(x))


def _up(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _down(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


# --- magnitude ------------------------------------------------------------------------------


def _ref_dropped(values: np.ndarray, threshold: float) -> np.ndarray:
    """float64 reference: True where |v| <= threshold as real numbers (NaN never dropped)."""
    a = np.abs(values.astype(np.float64))
    with np.errstate(invalid="ignore"):
        return a <= threshold


def _probe_values(thresholds: list[float]) -> np.ndarray:
    """float32 values around each threshold, both signs, plus the special values."""
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, F32_MAX, 1.0, 3.0]
    for t in thresholds:
        if t >= 0:
            f = _f32(t)
            vals += [f, _up(f), _down(f), _up(_up(f)), _down(_down(f))]
    vals = np.array(vals, dtype=np.float32)
    return np.concatenate([vals, -vals])


THRESHOLDS = [
    0.0,
    1e-6,  # not representable in float32
    0.1,  # not representable
    1e-8,
    _f32(1e-6),  # exactly a float32 value
    0.25,  # exactly representable, power of two
    _up(_f32(0.1)),
    1.0,
    1e-40,  # float32 subnormal range
    1e39,  # beyond float32 range: only infinities are larger
]


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_magnitude_keep_mask_matches_float64_reference(threshold):
    values = _probe_values(THRESHOLDS)
    mask = magnitude_keep_mask(torch.from_numpy(values), threshold)
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), ~_ref_dropped(values, threshold))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_magnitude_keep_mask_other_dtypes(dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)).mul(1e-3).to(dtype)
    t = 1e-3
    ref = np.abs(x.double().numpy()) > t
    if dtype == torch.float64:  # compared after rounding to float32 (documented)
        ref = np.abs(x.float().double().numpy()) > t
    np.testing.assert_array_equal(magnitude_keep_mask(x, t).numpy(), ref)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_magnitude_drop_matches_float64_reference(threshold):
    values = _probe_values(THRESHOLDS)
    abs_bits = torch.from_numpy(np.abs(values)).view(torch.int32)
    out = torch.empty_like(abs_bits)
    res = magnitude_drop(threshold)("w", 0, abs_bits, out)
    assert res.dtype == torch.int32
    assert res.data_ptr() == out.data_ptr()
    expected = np.where(_ref_dropped(values, threshold), -1, 0).astype(np.int32)
    np.testing.assert_array_equal(res.numpy(), expected)


def test_negative_zero_threshold_drops_exactly_the_unchanged_entries():
    # -0.0 >= 0: a threshold, not "drop nothing"; its sign bit must not wrap the limit around
    d = torch.tensor([0.0, -0.0, 1e-45, -1.0, math.nan, math.inf]).abs()
    bits = d.view(torch.int32)
    got = magnitude_drop(-0.0)("w", 0, bits, torch.empty_like(bits))
    assert got.tolist() == [-1, -1, 0, 0, 0, 0]
    assert magnitude_drop(-0.0).spec == magnitude_drop(0.0).spec


def test_magnitude_drop_agrees_with_keep_mask_on_random_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g) * torch.logspace(-9, 0, 50_000)
    x[::997] = 0.0
    x[::1999] = float("nan")
    abs_bits = x.abs().view(torch.int32)
    for t in (0.0, 1e-8, 1e-6, 3.3e-5, 1e-3):
        drop = magnitude_drop(t)("w", 0, abs_bits, torch.empty_like(abs_bits))
        assert torch.equal(drop == 0, magnitude_keep_mask(x, t))
        assert set(drop.unique().tolist()) <= {-1, 0}


@pytest.mark.parametrize("threshold", [-1.0, -1e-30, math.nan])
def test_magnitude_masks_with_negative_or_nan_threshold_keep_everything(threshold):
    values = _probe_values([1.0, 5.0, 1e30])
    x = torch.from_numpy(values)
    assert bool(magnitude_keep_mask(x, threshold).all())
    abs_bits = x.abs().view(torch.int32)
    drop = magnitude_drop(threshold)("w", 0, abs_bits, torch.empty_like(abs_bits))
    assert not bool(drop.any()), drop


# --- random bits ----------------------------------------------------------------------------


def _ref_key(seed: int, name: str, high: int) -> int:
    digest = hashlib.blake2b(repr((seed, name, high)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _ref_lowbias32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _ref_bits(numel: int, seed: int, name: str, offset: int) -> np.ndarray:
    """Top 24 bits of lowbias32((i mod 2^32 + key(seed, name, i div 2^32)) mod 2^32)."""
    pos = [offset + j for j in range(numel)]
    x = np.array([((i & 0xFFFFFFFF) + _ref_key(seed, name, i >> 32)) & 0xFFFFFFFF for i in pos],
                 dtype=np.uint64)  # fmt: skip
    return (_ref_lowbias32(x) >> np.uint32(8)).astype(np.int64)


def test_mix_seed_is_a_stable_63_bit_hash():
    for parts in [(0, "w", 0), (7, "model.layers.0.q_proj.weight", 3), (2**62, "", 0)]:
        assert mix_seed(*parts) == _ref_key(*parts)
        assert 0 <= mix_seed(*parts) < 2**63
    assert mix_seed(0, "w", 0) != mix_seed(0, "w", 1) != mix_seed(1, "w", 1)


def test_lowbias32_reference_is_a_bijection_sample():
    # sanity check of the reference itself: a bijection maps distinct inputs to distinct outputs
    x = np.arange(1 << 16, dtype=np.uint64) * 65521
    assert len(np.unique(_ref_lowbias32(x))) == len(x)


@pytest.mark.parametrize(
    ("numel", "seed", "name", "offset"),
    [
        (1000, 0, "w", 0),
        (4097, 123456789, "model.layers.0.self_attn.q_proj.weight", 17),
        (300, 2**63 - 1, "bias", 10**6),
        (1, 5, "x", 0),
    ],
)
def test_random_bits_match_numpy_uint32_reference(numel, seed, name, offset):
    bits = random_bits(numel, seed, name, offset, "cpu")
    assert bits.dtype == torch.int32 and bits.shape == (numel,)
    np.testing.assert_array_equal(
        bits.numpy().astype(np.int64), _ref_bits(numel, seed, name, offset)
    )


@pytest.mark.parametrize("offset", [2**32 - 3, 5 * 2**32 + 11, 2**40 - 1, 2**32])
def test_random_bits_beyond_2_pow_32(offset):
    bits = random_bits(9, 3, "emb", offset, "cpu")
    np.testing.assert_array_equal(bits.numpy().astype(np.int64), _ref_bits(9, 3, "emb", offset))


def test_random_bits_are_24_bit():
    bits = random_bits(200_000, 1, "w", 0, "cpu")
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**24
    # all 24 bits are used: the top and bottom bit are each set about half of the time
    for bit in (0, 23):
        frac = float(((bits >> bit) & 1).float().mean())
        assert abs(frac - 0.5) < 0.01


def test_random_bits_independent_of_chunking_and_offset():
    n, seed, name = 5000, 11, "layer.weight"
    full = random_bits(n, seed, name, 0, "cpu")
    rng = np.random.default_rng(0)
    for _ in range(5):
        cuts = sorted(set(rng.integers(0, n, size=rng.integers(1, 8)).tolist()) | {0, n})
        parts = [random_bits(b - a, seed, name, a, "cpu") for a, b in itertools.pairwise(cuts)]
        assert torch.equal(torch.cat(parts), full)
    # the same holds across the 2^32 boundary
    base = 2**32 - 100
    long = random_bits(300, seed, name, base, "cpu")
    split = torch.cat([random_bits(100, seed, name, base, "cpu"),
                       random_bits(200, seed, name, base + 100, "cpu")])  # fmt: skip
    assert torch.equal(long, split)


def test_random_keep_mask_independent_of_chunking():
    full = random_keep_mask(1000, 0.3, 4, "w", 0, "cpu")
    parts = [random_keep_mask(k, 0.3, 4, "w", s, "cpu") for s, k in [(0, 1), (1, 499), (500, 500)]]
    assert torch.equal(torch.cat(parts), full)


def test_different_seeds_and_names_differ():
    a = random_bits(10_000, 0, "w", 0, "cpu")
    for other in (random_bits(10_000, 1, "w", 0, "cpu"), random_bits(10_000, 0, "w2", 0, "cpu"),
                  random_bits(10_000, 0, "w", 1, "cpu")):  # fmt: skip
        assert float((a == other).float().mean()) < 0.01
    assert torch.equal(a, random_bits(10_000, 0, "w", 0, "cpu"))


def test_masks_of_different_seeds_are_roughly_independent():
    n, p = 200_000, 0.5
    a = random_keep_mask(n, p, 0, "w", 0, "cpu")
    b = random_keep_mask(n, p, 1, "w", 0, "cpu")
    both = float((a & b).float().mean())
    sigma = math.sqrt(p * p * (1 - p * p) / n)
    assert abs(both - p * p) < 6 * sigma


@pytest.mark.parametrize("keep", [0.001, 0.1, 0.3, 0.5, 0.97])
def test_empirical_keep_fraction_within_binomial_tolerance(keep):
    n = 1 << 20
    mask = random_keep_mask(n, keep, 7, "w", 0, "cpu")
    frac = float(mask.float().mean())
    sigma = math.sqrt(keep * (1 - keep) / n)
    assert abs(frac - keep) < 6 * sigma, (frac, keep, sigma)


def test_keep_threshold_bits_edges():
    assert keep_threshold_bits(0.0) == 0
    assert keep_threshold_bits(1.0) == 1 << 24
    assert keep_threshold_bits(-0.5) == 0 and keep_threshold_bits(2.0) == 1 << 24
    assert keep_threshold_bits(0.5) == 1 << 23
    assert bool(random_keep_mask(1000, 1.0, 0, "w", 0, "cpu").all())
    assert not bool(random_keep_mask(1000, 0.0, 0, "w", 0, "cpu").any())


def test_random_keep_mask_and_drop_follow_the_bits():
    n, keep, seed = 20_000, 0.37, 9
    ref = _ref_bits(n, seed, "w", 123) < round(keep * 2**24)
    mask = random_keep_mask(n, keep, seed, "w", 123, "cpu")
    np.testing.assert_array_equal(mask.numpy(), ref)
    abs_bits = torch.zeros(n, dtype=torch.int32)  # contents are ignored by the random drop
    out = torch.empty_like(abs_bits)
    drop = random_drop(keep, seed)("w", 123, abs_bits, out)
    assert drop.data_ptr() == out.data_ptr() and drop.dtype == torch.int32
    np.testing.assert_array_equal(drop.numpy(), np.where(ref, 0, -1))


def test_random_uniforms():
    u = random_uniforms(10_000, 2, "w", 5, "cpu")
    assert u.dtype == torch.float32
    np.testing.assert_array_equal(u.double().numpy(), _ref_bits(10_000, 2, "w", 5) / 2.0**24)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    random_bits(10_000, 0, "w", 0, "cpu")
    random_keep_mask(1000, 0.5, 0, "w", 0, "cpu")
    random_uniforms(1000, 0, "w", 0, "cpu")
    bits = torch.zeros(100, dtype=torch.int32)
    random_drop(0.5, 3)("w", 0, bits, torch.empty_like(bits))
    assert torch.equal(torch.get_rng_state(), state)
    # and the global seed does not influence the result
    torch.manual_seed(99)
    a = random_bits(100, 0, "w", 0, "cpu")
    torch.manual_seed(100)
    assert torch.equal(a, random_bits(100, 0, "w", 0, "cpu"))


def test_random_bits_empty():
    assert random_bits(0, 0, "w", 0, "cpu").numel() == 0


# --- keep-ratio thresholds ------------------------------------------------------------------


def _ref_threshold(values: np.ndarray, ratio: float) -> tuple[float, int, float]:
    """(expected threshold, k, k-th largest |v|) from a float64 sort; non-finite count as +inf."""
    a = np.abs(values.astype(np.float64))
    a[~np.isfinite(a)] = np.inf
    n = len(a)
    k = max(1, min(n, round(ratio * n)))
    kth = float(np.sort(a)[::-1][k - 1])
    if math.isinf(kth):
        t = F32_MAX  # keeps exactly the non-finite entries
    elif kth <= 0.0:
        t = 0.0
    else:
        t = float(np.nextafter(np.float32(kth), np.float32(0)))
    return t, k, kth


def _chunks_of(values: np.ndarray, sizes: list[int]):
    t = torch.from_numpy(values)
    pieces = list(torch.split(t, sizes)) if sizes else [t]

    def chunks():
        return iter(pieces)

    return chunks


def _check(values: np.ndarray, ratios: list[float], sizes: list[int] = ()) -> dict[float, float]:
    found = keep_ratio_thresholds(_chunks_of(values, list(sizes)), ratios)
    assert sorted(found) == sorted(set(ratios))
    a = np.abs(values.astype(np.float64))
    a_inf = np.where(np.isfinite(a), a, np.inf)
    for r in ratios:
        t, k, kth = _ref_threshold(values, r)
        assert found[r] == t, (r, found[r], t)
        kept = magnitude_keep_mask(torch.from_numpy(values), found[r]).numpy()
        # every non-finite entry is kept
        assert kept[~np.isfinite(a)].all()
        if kth > 0:
            # exactly the entries at least as large as the k-th largest are kept
            np.testing.assert_array_equal(kept, a_inf >= kth)
            assert kept.sum() >= k
        else:
            # the target exceeds the changed fraction: every changed entry is kept
            np.testing.assert_array_equal(kept, a_inf > 0)
    return found


RATIOS = [1e-4, 0.001, 0.01, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0]


def test_keep_ratio_thresholds_random_data():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(100_000) * np.exp(rng.uniform(-20, 0, 100_000))).astype(
        np.float32
    )
    _check(values, RATIOS, sizes=[30_000, 1, 69_999])


def test_keep_ratio_thresholds_independent_of_chunking():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(20_000).astype(np.float32) * 1e-3
    ratios = [0.001, 0.1, 0.5, 1.0]
    one = keep_ratio_thresholds(_chunks_of(values, []), ratios)
    many = keep_ratio_thresholds(_chunks_of(values, [7] * 10 + [1, 3] * 5 + [19910]), ratios)
    assert one == many


def test_keep_ratio_thresholds_ties():
    rng = np.random.default_rng(2)
    # bf16-rounded deltas: heavy ties inside one high-bits bin
    values = torch.from_numpy(rng.standard_normal(50_000).astype(np.float32) * 1e-4)
    values = values.to(torch.bfloat16).float().numpy()
    _check(values, RATIOS)
    # all equal: any ratio keeps everything
    same = np.full(1000, 0.5, dtype=np.float32)
    found = _check(same, [0.001, 0.5, 1.0])
    assert set(found.values()) == {_down(0.5)}


def test_keep_ratio_thresholds_with_zeros_and_target_above_changed_fraction():
    rng = np.random.default_rng(3)
    values = np.zeros(10_000, dtype=np.float32)
    changed = rng.choice(10_000, 1_000, replace=False)
    values[changed] = rng.standard_normal(1_000).astype(np.float32)
    values[:3] = -0.0
    found = _check(values, [0.05, 0.1, 0.2, 0.5, 1.0])
    assert found[0.2] == found[0.5] == found[1.0] == 0.0
    assert found[0.05] > 0.0
    # all zeros
    assert keep_ratio_thresholds(_chunks_of(np.zeros(100, np.float32), []), [0.5]) == {0.5: 0.0}


def test_keep_ratio_thresholds_non_finite():
    rng = np.random.default_rng(4)
    values = rng.standard_normal(1000).astype(np.float32)
    values[[5, 50, 500]] = [np.nan, np.inf, -np.inf]
    _check(values, [0.001, 0.002, 0.003, 0.004, 0.01, 0.5, 1.0])


def test_keep_ratio_thresholds_keep_all_and_extremes():
    values = np.array([1e-45, 1e-30, 3.0, F32_MAX, -2.0], dtype=np.float32)
    found = _check(values, [0.2, 0.4, 0.6, 0.8, 1.0])
    assert found[1.0] == 0.0  # keeps the smallest subnormal too
    assert found[0.2] == _down(F32_MAX)


def test_keep_ratio_thresholds_reduce_is_applied():
    rng = np.random.default_rng(5)
    values = rng.standard_normal(3_000).astype(np.float32)
    calls = []

    def twice(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return t * 2  # as if a second rank held an identical copy

    found = keep_ratio_thresholds(_chunks_of(values, []), [0.01, 0.5], reduce=twice)
    doubled = keep_ratio_thresholds(_chunks_of(np.concatenate([values, values]), []), [0.01, 0.5])
    assert found == doubled
    assert calls  # the histograms went through reduce


def test_keep_ratio_thresholds_empty_and_duplicates():
    assert keep_ratio_thresholds(lambda: iter(()), [0.1, 0.5]) == {0.1: 0.0, 0.5: 0.0}
    values = np.arange(1, 101, dtype=np.float32)
    found = keep_ratio_thresholds(_chunks_of(values, []), [0.1, 0.1])
    assert found == {0.1: _down(91.0)}


def test_keep_ratio_thresholds_reads_chunks_at_most_twice():
    values = np.linspace(-1, 1, 1001, dtype=np.float32)
    passes = []

    def chunks():
        passes.append(1)
        return iter([torch.from_numpy(values)])

    keep_ratio_thresholds(chunks, [0.1, 0.2, 0.3])
    assert len(passes) == 2


# --- CUDA: the same bits and thresholds on every device ----------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("offset", [0, 12345, 2**32 - 1000])
def test_random_bits_identical_on_cuda(offset):
    cpu = random_bits(5000, 3, "w", offset, "cpu")
    gpu = random_bits(5000, 3, "w", offset, "cuda")
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    drop = random_drop(0.3, 3)
    bits = torch.zeros(5000, dtype=torch.int32)
    assert torch.equal(
        drop("w", offset, bits.cuda(), torch.empty_like(bits, device="cuda")).cpu(),
        drop("w", offset, bits, torch.empty_like(bits)),
    )


@cuda
def test_magnitude_drop_and_keep_ratio_thresholds_on_cuda():
    values = _probe_values(THRESHOLDS)
    x = torch.from_numpy(values)
    abs_bits = x.abs().view(torch.int32)
    for t in THRESHOLDS:
        cpu = magnitude_drop(t)("w", 0, abs_bits, torch.empty_like(abs_bits))
        gpu = magnitude_drop(t)("w", 0, abs_bits.cuda(), torch.empty_like(abs_bits, device="cuda"))
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(magnitude_keep_mask(x.cuda(), t).cpu(), magnitude_keep_mask(x, t))
    rng = np.random.default_rng(6)
    data = (rng.standard_normal(100_000) * 1e-3).astype(np.float32)
    t = torch.from_numpy(data)
    on_gpu = keep_ratio_thresholds(lambda: iter(t.cuda().split(30_000)), RATIOS)
    assert on_gpu == keep_ratio_thresholds(lambda: iter([t]), RATIOS)


def test_masks_are_frozen_values_that_declare_their_spec():
    """MagnitudeDrop / RandomDrop carry their spec and say whether they read |delta|; equal
    arguments give equal (hashable) masks; a plain function becomes a mask without a spec."""
    import dataclasses
    import functools

    from grail.trainer.analysis.ops.masks import (
        DropSpec,
        FunctionMask,
        MagnitudeDrop,
        Mask,
        RandomDrop,
        as_mask,
    )

    mag, rnd = MagnitudeDrop(1e-6), RandomDrop(0.25, seed=3)
    assert magnitude_drop(1e-6) == mag and random_drop(0.25, 3) == rnd
    assert len({mag, MagnitudeDrop(1e-6), rnd, RandomDrop(0.25, 3)}) == 2
    assert mag.spec == DropSpec(threshold=f32_floor(1e-6)) and mag.uses_delta
    assert rnd.spec == DropSpec(keep_limit=keep_threshold_bits(0.25), seed=3)
    assert not rnd.uses_delta
    with pytest.raises(dataclasses.FrozenInstanceError):
        mag.threshold = 1.0  # type: ignore[misc]
    assert as_mask(mag) is mag and isinstance(mag, Mask)

    def plain(name, offset, bits, out):
        return out.zero_()

    wrapped = functools.wraps(mag)(lambda name, offset, bits, out: out.fill_(-1))
    for fn in (plain, wrapped):
        m = as_mask(fn)
        assert isinstance(m, FunctionMask) and m.spec is None and m.uses_delta
    bits = torch.zeros(4, dtype=torch.int32)
    assert as_mask(wrapped)("w", 0, bits, torch.empty_like(bits)).tolist() == [-1] * 4
