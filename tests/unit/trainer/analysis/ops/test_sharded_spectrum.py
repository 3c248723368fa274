"""sharded_spectra in one process: float64 numpy SVDs, non-finite updates, errors, layouts.

The two-process behaviour (gather, round robin, broadcast) is checked in test_distributed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from grail.trainer.analysis.core.snapshot import ParameterDelta, ParameterSnapshot
from grail.trainer.analysis.ops.sharded_spectrum import sharded_spectra
from grail.trainer.analysis.ops.spectrum import Spectrum, matrix_spectrum, spectrum_layout

SHAPES = {"a": (12, 7), "b": (5, 40), "c": (33, 30)}


def _delta(nan_in: str | None = None) -> tuple[ParameterDelta, dict[str, np.ndarray]]:
    gen = torch.Generator().manual_seed(3)
    model = nn.ParameterDict({n: nn.Parameter(torch.randn(s, generator=gen)) for n, s in
                              SHAPES.items()})
    old = ParameterSnapshot(model)
    with torch.no_grad():
        for n, p in model.items():  # a decaying spectrum plus dense noise
            u = torch.randn(p.shape[0], 4, generator=gen) * torch.tensor([1.0, 0.5, 0.25, 0.1])
            p.add_(u @ torch.randn(4, p.shape[1], generator=gen) * 0.1)
            p.add_(torch.randn(p.shape, generator=gen) * 0.003)
            if n == nan_in:
                p[1, 2] = float("nan")
    new = ParameterSnapshot(model)
    ref = {n: new.data[n].double().numpy() - old.data[n].double().numpy() for n in SHAPES}
    return old.compute_delta(new), ref


def _fns(rank: int, exact_max_dim: int = 2048, factors: bool = True):
    def compute(name: str, a: torch.Tensor, frob_sq: float) -> Spectrum:
        return matrix_spectrum(a, rank, exact_max_dim=exact_max_dim, keep_factors=factors,
                               frob_sq=frob_sq, seed=1)

    def layout(shape: tuple[int, int]) -> tuple[int, int]:
        return spectrum_layout(shape, rank, exact_max_dim=exact_max_dim, keep_factors=factors)

    return compute, layout


def test_spectra_match_numpy_and_layouts_match_matrix_spectrum() -> None:
    delta, ref = _delta()
    for exact_max_dim in (2048, 8):  # exact, then the range finder for c (30 > 8)
        spectra, bad = sharded_spectra(delta, list(SHAPES), *_fns(3, exact_max_dim))
        assert bad == [] and list(spectra) == list(SHAPES)
        for n, s in spectra.items():
            d = ref[n]
            sq = np.linalg.svd(d, compute_uv=False) ** 2
            assert s.shape == d.shape and s.exact == (exact_max_dim > 8 or n != "c")
            assert s.frob_sq == pytest.approx((d**2).sum(), rel=1e-6)
            np.testing.assert_allclose(s.sigma_sq[:3].numpy(), sq[:3], rtol=1e-3)
            if s.exact:
                np.testing.assert_allclose(s.sigma_sq.numpy(), sq, rtol=1e-4, atol=1e-6 * sq[0])
            assert s.left is not None and s.right is not None
            assert s.left.shape == (d.shape[0], 3) and s.right.shape == (3, d.shape[1])
            u, sv, vh = np.linalg.svd(d)
            np.testing.assert_allclose(s.truncation(3).double().numpy(),
                                       (u[:, :3] * sv[:3]) @ vh[:3], atol=2e-3)


def test_nonfinite_updates_are_left_out_and_factors_are_optional() -> None:
    delta, _ = _delta(nan_in="b")
    spectra, bad = sharded_spectra(delta, list(SHAPES), *_fns(2, factors=False))
    assert bad == ["b"] and list(spectra) == ["a", "c"]
    assert all(s.left is None and s.right is None for s in spectra.values())


def test_errors_of_the_decomposition_are_raised() -> None:
    delta, _ = _delta()
    compute, layout = _fns(2)

    def failing(name: str, a: torch.Tensor, frob_sq: float) -> Spectrum:
        if name == "b":
            raise torch.linalg.LinAlgError("did not converge")
        return compute(name, a, frob_sq)

    with pytest.raises(torch.linalg.LinAlgError, match="converge"):
        sharded_spectra(delta, list(SHAPES), failing, layout)
    with pytest.raises(RuntimeError, match="expected 99"):  # a layout that lies is caught
        sharded_spectra(delta, ["a"], compute, lambda shape: (99, 2))
