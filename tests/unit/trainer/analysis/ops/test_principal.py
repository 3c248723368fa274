"""The principal geometry of one update against matrices with a known SVD and float64 numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.ops.principal import (
    FactorCache,
    Geometry,
    aggregate_principal,
    fingerprint,
    principal_geometry,
    top_factors,
)

F32_EPS = float(torch.finfo(torch.float32).eps)


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


def known_svd(m: int = 40, n: int = 30, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(W, U, s, V)`` in float64 with evenly spaced singular values from 10 down to 1."""
    r = min(m, n)
    u, v = _orthonormal(m, r, seed), _orthonormal(n, r, seed + 1)
    s = np.linspace(10.0, 1.0, r)
    return (u * s) @ v.T, u, s, v


def _geometry(w: np.ndarray, d: np.ndarray, ranks: list[int], **kw) -> Geometry:
    k = max(ranks)
    wt, dt = torch.from_numpy(w).float(), torch.from_numpy(d).float()
    ref, new = top_factors(wt, k, **kw), top_factors(wt + dt, k, **kw)
    return principal_geometry(ref, new, dt, ranks)


def numpy_reference(w: np.ndarray, d: np.ndarray, k: int) -> dict[str, float]:
    """float64: energy shares, mean squared cosine of the principal angles, spectral drift."""
    u, s, vt = np.linalg.svd(w)
    u2, s2, _ = np.linalg.svd(w + d)
    e = (d**2).sum()
    uk, vk = u[:, :k], vt[:k].T
    cosines = np.linalg.svd(uk.T @ u2[:, :k], compute_uv=False)
    return {
        "inside": ((uk.T @ d @ vk) ** 2).sum() / e,
        "left": ((uk.T @ d) ** 2).sum() / e,
        "overlap": (cosines**2).mean(),
        "drift": np.linalg.norm(s2[:k] - s[:k]) / np.linalg.norm(s[:k]),
    }


# --- factors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])  # Sigma on the left, then on the right
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_top_factors_are_the_orthonormal_singular_vectors(shape, method):
    w, u, s, v = known_svd(*shape)
    f = top_factors(torch.from_numpy(w).float(), 5, method=method)
    assert f.rank == 5 and f.exact and f.s.dtype == torch.float64
    np.testing.assert_allclose(f.s.numpy(), s[:5], rtol=1e-5)
    gu, gv = f.u.double().numpy(), f.v.double().numpy()
    np.testing.assert_allclose(gu.T @ gu, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(gv.T @ gv, np.eye(5), atol=1e-5)
    signs = np.sign((gu * u[:, :5]).sum(0))  # singular vectors up to sign
    np.testing.assert_allclose(gu * signs, u[:, :5], atol=1e-4)
    np.testing.assert_allclose(gv * signs, v[:, :5], atol=1e-4)


def test_top_factors_of_a_matrix_smaller_than_k_cover_all_of_it():
    f = top_factors(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), 64)
    assert f.rank == 3 and f.u.shape == (3, 3) and f.v.shape == (7, 3)


# --- energy shares against a known SVD -------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-6, 1e-2, 1.0])
def test_an_update_along_the_first_principal_pair_has_all_its_energy_in_top1(eps):
    w, u, _, v = known_svd()
    d = eps * np.outer(u[:, 0], v[:, 0])
    g = _geometry(w, d, [1, 4])
    assert g.energy == pytest.approx((d**2).sum(), rel=1e-5)
    for values in (g.inside, g.left):
        assert values[0] / g.energy == pytest.approx(1.0, abs=10 * F32_EPS)
        assert values[1] / g.energy == pytest.approx(1.0, abs=10 * F32_EPS)


def test_an_update_orthogonal_to_the_top_block_has_none_of_its_energy_there():
    w, u, _, v = known_svd()
    k = 4
    g = np.random.default_rng(3).standard_normal(w.shape)
    pu, pv = np.eye(40) - u[:, :k] @ u[:, :k].T, np.eye(30) - v[:, :k] @ v[:, :k].T
    outside = 1e-2 * pu @ g @ pv  # neither left nor right principal directions
    geo = _geometry(w, outside, [1, k])
    assert geo.inside[1] / geo.energy < 10 * F32_EPS and geo.left[1] / geo.energy < 10 * F32_EPS
    # left directions principal, right ones not: inside the left share, outside the block
    rows = 1e-2 * u[:, :k] @ u[:, :k].T @ g @ pv
    geo = _geometry(w, rows, [1, k])
    assert geo.inside[1] / geo.energy < 10 * F32_EPS
    assert geo.left[1] / geo.energy == pytest.approx(1.0, abs=10 * F32_EPS)


def test_a_random_gaussian_update_lands_where_an_isotropic_one_would():
    """E||U_k^T D V_k||^2 = E k^2/(mn) and E||U_k^T D||^2 = E k/m for Gaussian D; with k^2 = 4096
    degrees of freedom one draw is within 2.2% (one standard deviation): tolerance 10%."""
    m, n, k = 256, 192, 64
    w, *_ = known_svd(m, n, seed=5)
    d = 1e-3 * np.random.default_rng(6).standard_normal((m, n))
    geo = _geometry(w, d, [k])
    out = aggregate_principal({"w": geo}, [k])
    assert out[f"energy_in_top{k}_random"] == pytest.approx(k * k / (m * n))
    assert out[f"left_energy_top{k}_random"] == pytest.approx(k / m)
    assert out[f"energy_in_top{k}"] == pytest.approx(k * k / (m * n), rel=0.1)
    assert out[f"left_energy_top{k}"] == pytest.approx(k / m, rel=0.05)


# --- rotation and drift against numpy --------------------------------------------------------
@pytest.mark.parametrize("theta", [1e-3, 0.1, 0.7])
def test_a_known_rotation_by_theta_gives_cos_squared_theta(theta):
    """Rotate u_1 towards u_6 by theta: the top-1 subspace turns by theta, the top-4 subspace
    has one principal angle theta and three of zero."""
    w, u, s, v = known_svd()
    rot = u.copy()
    rot[:, 0] = math.cos(theta) * u[:, 0] + math.sin(theta) * u[:, 5]
    rot[:, 5] = -math.sin(theta) * u[:, 0] + math.cos(theta) * u[:, 5]
    d = (rot * s) @ v.T - w
    geo = _geometry(w, d, [1, 4])
    cos2 = math.cos(theta) ** 2
    assert geo.overlap[0] == pytest.approx(cos2, abs=1e-6)
    assert geo.overlap[1] == pytest.approx((cos2 + 3) / 4, abs=1e-6)
    assert geo.drift[1] == pytest.approx(0.0, abs=1e-5)  # a rotation keeps the spectrum
    # a tiny rotation is resolved, not lost in float32 rounding of a sum near 1
    if theta == 1e-3:
        assert 1 - geo.overlap[0] == pytest.approx(math.sin(theta) ** 2, rel=0.05)


@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_overlap_and_drift_match_float64_numpy(scale):
    w, *_ = known_svd(50, 36, seed=8)
    d = scale * np.random.default_rng(9).standard_normal(w.shape)
    ranks = [1, 3, 8]
    geo = _geometry(w, d, ranks)
    for i, k in enumerate(ranks):
        ref = numpy_reference(w, d, k)
        assert geo.inside[i] / geo.energy == pytest.approx(ref["inside"], rel=1e-4, abs=1e-7)
        assert geo.left[i] / geo.energy == pytest.approx(ref["left"], rel=1e-4, abs=1e-7)
        assert 1 - geo.overlap[i] == pytest.approx(1 - ref["overlap"], rel=1e-3, abs=1e-7)
        assert geo.drift[i] == pytest.approx(ref["drift"], rel=1e-3, abs=1e-6)


def test_no_update_means_no_rotation_and_no_drift():
    w, *_ = known_svd()
    geo = _geometry(w, np.zeros_like(w), [1, 8])
    assert geo.energy == 0 and geo.drift == [0.0, 0.0]
    assert geo.overlap == pytest.approx([1.0, 1.0], abs=1e-10)


def test_ranks_beyond_the_matrix_size_cover_the_whole_matrix():
    w, *_ = known_svd(12, 9)
    d = 0.1 * np.random.default_rng(1).standard_normal(w.shape)
    geo = _geometry(w, d, [4, 64])  # k = 64 is k = 9 = min(m, n): V_9 spans every row
    ref = numpy_reference(w, d, 9)
    assert geo.inside[1] == pytest.approx(geo.left[1], rel=1e-5)
    assert geo.left[1] / geo.energy == pytest.approx(ref["left"], rel=1e-4)
    assert geo.overlap[1] == pytest.approx(ref["overlap"], abs=1e-5)
    out = aggregate_principal({"w": geo}, [4, 64])
    assert out["energy_in_top64_random"] == pytest.approx(81 / 108)  # k^2 / (mn) with k = 9
    assert out["left_energy_top64_random"] == pytest.approx(9 / 12)


# --- randomized path ---------------------------------------------------------------------------
def test_randomized_path_agrees_with_the_exact_one_on_a_large_matrix():
    """A 600 x 500 matrix with a decaying spectrum (sigma_i = exp(-i / 8) + a 1e-3 floor): the
    range finder at rank 16 + 8 oversampling, 2 power iterations, agrees with the exact path
    to 1e-4 in the shares and the overlap and to 1e-6 in the drift (measured: 5e-6, 1.2e-7);
    the same seed gives the same numbers."""
    m, n = 600, 500
    rng = np.random.default_rng(11)
    u, v = _orthonormal(m, n, 12), _orthonormal(n, n, 13)
    s = np.exp(-np.arange(n) / 8.0) + 1e-3
    w = (u * s) @ v.T
    d = 1e-3 * rng.standard_normal((m, n)) + 1e-3 * np.outer(u[:, 1], v[:, 0])
    ranks = [1, 4, 16]
    exact = _geometry(w, d, ranks)
    rnd = _geometry(w, d, ranks, exact_max_dim=100, seed=3)
    assert exact.exact and not rnd.exact
    assert _geometry(w, d, ranks, exact_max_dim=100, seed=3) == rnd
    for i in range(len(ranks)):
        assert rnd.inside[i] / rnd.energy == pytest.approx(exact.inside[i] / exact.energy,
                                                           abs=1e-4)
        assert rnd.left[i] / rnd.energy == pytest.approx(exact.left[i] / exact.energy, abs=1e-4)
        assert rnd.overlap[i] == pytest.approx(exact.overlap[i], abs=1e-4)
        assert rnd.drift[i] == pytest.approx(exact.drift[i], abs=1e-6)


# --- aggregation -------------------------------------------------------------------------------
def test_aggregation_weights_matrices_by_update_energy_and_groups_them():
    a = Geometry((4, 8), 1.0, True, [0.5], [0.75], [0.9], [0.2])
    b = Geometry((8, 8), 3.0, False, [0.3], [0.6], [0.5], [0.1])
    still = Geometry((4, 4), 0.0, True, [0.0], [0.0], [1.0], [0.0])
    groups = {"a": "x", "b": "y", "c": "x"}
    out = aggregate_principal({"a": a, "b": b, "c": still}, [2], groups.get)
    assert out["energy_in_top2"] == pytest.approx(0.8 / 4)
    assert out["energy_in_top2_random"] == pytest.approx((1 * 4 / 32 + 3 * 4 / 64) / 4)
    assert out["left_energy_top2"] == pytest.approx(1.35 / 4)
    assert out["left_energy_top2_random"] == pytest.approx((1 * 2 / 4 + 3 * 2 / 8) / 4)
    assert out["subspace_overlap_top2"] == pytest.approx((0.9 + 3 * 0.5) / 4)
    assert out["spectral_drift_top2"] == pytest.approx((0.2 + 0.3) / 4)
    assert out["component/x/energy_in_top2"] == 0.5
    assert out["component/y/energy_in_top2"] == pytest.approx(0.1)
    nothing = aggregate_principal({"c": still}, [2])
    assert all(math.isnan(v) for v in nothing.values())


def test_geometry_round_trips_through_a_vector():
    g = Geometry((3, 5), 2.5, False, [1.0, 2.0], [3.0, 4.0], [0.5, 0.25], [0.1, 0.2])
    vec = g.to_vector()
    assert vec.dtype == torch.float64 and vec.numel() == Geometry.vector_size(2)
    assert Geometry.from_vector((3, 5), vec) == g


# --- fingerprints and the cache ----------------------------------------------------------------
def test_fingerprint_sees_every_change_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 700, generator=gen)  # 210000 entries: several weight periods
    key = fingerprint(a)
    assert fingerprint(a.clone()) == key
    assert fingerprint(a.to(torch.bfloat16).float()) != key
    assert fingerprint(a.reshape(700, 300)) != key  # the shape is part of it
    flat = a.reshape(-1)
    for i in torch.randint(0, flat.numel(), (20,), generator=gen).tolist():
        b = flat.clone()
        b[i] = torch.nextafter(b[i], torch.tensor(math.inf))  # one ulp
        assert fingerprint(b.view_as(a)) != key, i
    swapped = flat.clone()
    swapped[[5, 9]] = swapped[[9, 5]]
    assert fingerprint(swapped.view_as(a)) != key
    period = 65521  # +d and -d one weight period apart: caught by the row sums
    bits = flat.clone().view(torch.int32)
    bits[10] += 1
    bits[10 + period] -= 1
    assert fingerprint(bits.view(torch.float32).view_as(a)) != key


@pytest.mark.parametrize("shape", [(300, 700), (3, 5), (65521 * 17 + 3, 1)])
def test_fingerprint_is_its_documented_formula(shape):
    """The two sums of the docstring in Python integers mod 2^64, over rows of 65521 entries
    (blocks of 16 rows and a partial last row included)."""
    from grail.trainer.analysis.ops import factor_cache

    a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    bits = a.reshape(-1).view(torch.int32).numpy().astype(np.int64).tolist()
    weights = factor_cache._weights(torch.device("cpu")).tolist()
    period, mask = 65521, (1 << 64) - 1
    weighted = sum(weights[i % period] * b for i, b in enumerate(bits)) & mask
    plain = sum((i // period + 1) * b for i, b in enumerate(bits)) & mask
    assert fingerprint(a) == (*shape, weighted, plain)


def test_factor_cache_returns_entries_only_for_the_same_name_rank_and_fingerprint():
    cache = FactorCache("cpu", tracks="reference")
    f = top_factors(torch.eye(4), 2)
    cache.put("w", 2, (7,), f)
    assert cache.get("w", 2, (7,), "cpu").u.equal(f.u)
    assert cache.get("w", 1, (7,), "cpu") is None
    assert cache.get("w", 2, (8,), "cpu") is None
    assert cache.get("v", 2, (7,), "cpu") is None
    assert (cache.hits, cache.misses, len(cache), "w" in cache) == (1, 3, 1, True)
    assert cache.nbytes() == (4 * 2 + 4 * 2) * 4 + 2 * 8
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="tracks"):
        FactorCache(tracks="both")
