"""Spectrum of one matrix and its aggregation, against float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.ops.spectrum import Spectrum, aggregate_spectra, matrix_spectrum


def decaying(m: int, n: int, decay: float = 0.8, seed: int = 0) -> torch.Tensor:
    """A float32 matrix with singular values decay**i and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def ref_values(a: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(a.double().numpy(), compute_uv=False) ** 2


def ref_metrics(sq: np.ndarray, frob: float, r: int) -> dict[str, float]:
    p = sq / sq.sum()
    p = p[p > 0]
    cum = np.cumsum(sq) / sq.sum()
    return {
        "energy": min(1.0, sq[:r].sum() / frob),
        "stable": frob / sq[0],
        "effective": float(np.exp(-(p * np.log(p)).sum())),
        "rank90": int(np.argmax(cum >= 0.9) + 1),
    }


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
def test_exact_spectrum_matches_numpy(method: str, shape: tuple[int, int]) -> None:
    a = decaying(*shape, decay=0.85)
    sq = ref_values(a)
    frob = float((a.double() ** 2).sum())
    s = matrix_spectrum(a, rank=5, keep_factors=True, method=method)
    assert s.exact and s.sigma_sq.numel() == min(shape)
    np.testing.assert_allclose(s.sigma_sq.numpy(), sq, rtol=0, atol=1e-6 * sq.sum())
    for r in (1, 3, 5):
        ref = ref_metrics(sq, frob, r)
        assert s.energy_at(r) == pytest.approx(ref["energy"], rel=1e-5)  # float32 SVD
    ref = ref_metrics(sq, frob, 1)
    assert s.stable_rank() == pytest.approx(ref["stable"], rel=1e-5)
    assert s.effective_rank() == pytest.approx(ref["effective"], rel=1e-5)
    assert s.rank_for_energy(0.9) == ref["rank90"]
    # truncation factors reproduce numpy's rank-r truncation
    u, sv, vh = np.linalg.svd(a.double().numpy(), full_matrices=False)
    for r in (1, 5):
        want = (u[:, :r] * sv[:r]) @ vh[:r]
        np.testing.assert_allclose(s.truncation(r).double().numpy(), want, atol=2e-6)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_planted_rank2_and_exact_rank1(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(50, 2, generator=g) @ torch.randn(2, 35, generator=g)
    s = matrix_spectrum(a, rank=2, method=method)
    assert abs(s.energy_at(2) - 1.0) < 1e-5
    assert s.energy_at(1) < 0.999
    assert s.rank_for_energy(0.999999) == 2
    a1 = torch.randn(60, 1, generator=g) @ torch.randn(1, 40, generator=g)
    s1 = matrix_spectrum(a1, rank=1, method=method)
    # the noise floor of the squared values stays ~eps^2, so an exact rank-1 update reads as 1
    assert s1.effective_rank() == pytest.approx(1.0, abs=1e-4)
    assert s1.stable_rank() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kw", [{"method": "gram"}, {"method": "svd"}, {"exact_max_dim": 8}])
@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_factors_hold_only_their_own_storage(kw: dict, shape: tuple[int, int]) -> None:
    """Only r(m+n) floats per matrix may stay alive, never a view of a full decomposition."""
    s = matrix_spectrum(decaying(*shape), rank=3, keep_factors=True, **kw)
    assert s.left.shape == (shape[0], 3) and s.right.shape == (3, shape[1])
    for t in (s.left, s.right):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_rank_beyond_full_rank_is_full_energy() -> None:
    a = decaying(10, 6)
    s = matrix_spectrum(a, rank=64, keep_factors=True)
    assert s.energy_at(6) == 1.0 and s.energy_at(64) == 1.0
    assert s.left.shape == (10, 6) and s.right.shape == (6, 6)
    np.testing.assert_allclose(s.truncation(6).numpy(), a.numpy(), atol=1e-5)


def test_bf16_stored_rank1_update_is_low_rank_in_energy_but_full_matrix_rank() -> None:
    """A rank-1 update stored in bf16 picks up rounding noise in every entry: ``matrix_rank``
    reads it as (nearly) full rank, the energy spectrum still says rank 1."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 48, generator=g) * 0.02).bfloat16()
    update = torch.randn(64, 1, generator=g) @ torch.randn(1, 48, generator=g) * 0.02
    w_new = (w.float() + update).bfloat16()
    d = w_new.float() - w.float()
    s = matrix_spectrum(d, rank=8)
    assert s.energy_at(1) > 0.99
    assert s.stable_rank() < 1.05
    assert np.linalg.matrix_rank(d.double().numpy()) >= 0.9 * 48


def test_randomized_agrees_with_exact_beyond_the_exact_limit() -> None:
    a = decaying(300, 200, decay=0.9, seed=5)
    exact = matrix_spectrum(a, rank=16, method="svd")
    rnd = matrix_spectrum(a, rank=16, exact_max_dim=64, keep_factors=True)
    assert exact.exact and not rnd.exact
    assert rnd.sigma_sq.numel() == 16
    np.testing.assert_allclose(rnd.sigma_sq.numpy(), exact.sigma_sq[:16].numpy(), rtol=1e-3)
    for r in (1, 4, 16):
        assert rnd.energy_at(r) == pytest.approx(exact.energy_at(r), abs=1e-3)
    assert rnd.stable_rank() == pytest.approx(exact.stable_rank(), rel=1e-3)
    u, sv, vh = np.linalg.svd(a.double().numpy(), full_matrices=False)
    want = (u[:, :4] * sv[:4]) @ vh[:4]
    assert np.abs(rnd.truncation(4).double().numpy() - want).max() < 1e-3 * sv[0]


def test_randomized_tail_completion_matches_its_definition() -> None:
    a = decaying(120, 90, decay=0.97, seed=2)
    s = matrix_spectrum(a, rank=8, exact_max_dim=32, oversampling=8, power_iterations=2)
    frob = float((a.double() ** 2).sum())
    top = s.sigma_sq.numpy()
    tail = frob - top.sum()
    assert s.tail_energy == pytest.approx(tail, rel=1e-6)
    full = np.concatenate([top, np.full(90 - 8, tail / (90 - 8))])
    p = full / full.sum()
    assert s.effective_rank() == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    want = int(np.argmax(np.cumsum(full) >= 0.9 * full.sum()) + 1)
    assert s.rank_for_energy(0.9) == want > 8


def test_randomized_is_seeded_and_leaves_the_global_rng_alone() -> None:
    a = decaying(100, 80, decay=0.99)
    state = torch.get_rng_state()
    s1 = matrix_spectrum(a, rank=4, exact_max_dim=16, seed=7, power_iterations=0)
    s2 = matrix_spectrum(a, rank=4, exact_max_dim=16, seed=7, power_iterations=0)
    s3 = matrix_spectrum(a, rank=4, exact_max_dim=16, seed=8, power_iterations=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(s1.sigma_sq, s2.sigma_sq)
    assert not torch.equal(s1.sigma_sq, s3.sigma_sq)


def test_zero_matrix_and_bad_input() -> None:
    s = matrix_spectrum(torch.zeros(5, 4), rank=2)
    assert math.isnan(s.energy_at(1)) and math.isnan(s.stable_rank())
    assert math.isnan(s.effective_rank()) and s.rank_for_energy(0.9) == 0
    with pytest.raises(ValueError, match="2-D"):
        matrix_spectrum(torch.zeros(3), rank=1)
    with pytest.raises(ValueError, match="method"):
        matrix_spectrum(torch.zeros(3, 3), rank=1, method="eig")
    with pytest.raises(ValueError, match="without factors"):
        s.truncation(1)


def test_aggregate_weights_by_energy_and_groups() -> None:
    mats = {
        "a.q.weight": decaying(12, 8, 0.5, seed=1) * 3.0,
        "a.k.weight": decaying(8, 20, 0.9, seed=2),
        "b.q.weight": decaying(16, 16, 0.7, seed=3) * 0.5,
        "b.z.weight": torch.zeros(4, 6),
    }
    spectra = {n: matrix_spectrum(a, rank=4) for n, a in mats.items()}
    group = {"a.q.weight": "q", "b.q.weight": "q", "a.k.weight": "k", "b.z.weight": "z"}
    out = aggregate_spectra(spectra, [1, 4], group.get)

    def ref(names: list[str]) -> dict[str, float]:
        w, e1, e4, st, ef, r9, params, lora1 = 0, 0, 0, 0, 0, 0, 0, 0
        for n in names:
            a = mats[n].double().numpy()
            params += a.size
            lora1 += sum(a.shape)
            frob = (a**2).sum()
            if frob == 0:
                continue
            sq = np.linalg.svd(a, compute_uv=False) ** 2
            m = ref_metrics(sq, frob, 1)
            w += frob
            e1 += sq[:1].sum()
            e4 += sq[:4].sum()
            st += frob * m["stable"]
            ef += frob * m["effective"]
            r9 += frob * m["rank90"]
        if w == 0:
            return {"param_ratio_at_r1": lora1 / params}
        return {"energy_at_r1": e1 / w, "energy_at_r4": e4 / w, "stable_rank": st / w,
                "effective_rank": ef / w, "rank_for_energy_0.9": r9 / w,
                "param_ratio_at_r1": lora1 / params, "param_ratio_at_r4": 4 * lora1 / params}

    for prefix, names in [("", list(mats)), ("component/q/", ["a.q.weight", "b.q.weight"]),
                          ("component/z/", ["b.z.weight"])]:
        for k, v in ref(names).items():
            assert out[prefix + k] == pytest.approx(v, rel=1e-5), prefix + k
    assert out["num_matrices"] == 4
    assert math.isnan(out["component/z/energy_at_r1"])
    # LoRA at rank 1 on a 4x6 matrix trains 10 of its 24 entries
    assert out["component/z/param_ratio_at_r1"] == 10 / 24


def test_spectrum_dataclass_completed_exact_is_identity() -> None:
    sq = torch.tensor([4.0, 1.0], dtype=torch.float64)
    s = Spectrum(sq, 5.0, (2, 3), exact=True)
    assert s.completed() is sq and s.tail_energy == 0.0
