r"""Where an update sits relative to the principal singular directions of the weights.

For a reference matrix :math:`W \in \mathbb{R}^{m \times n}` with top-:math:`k` singular triplets
:math:`W \approx U_k \Sigma_k V_k^\top` (columns of :math:`U_k`, :math:`V_k` orthonormal), an
update :math:`\Delta` with energy :math:`E = \lVert\Delta\rVert_F^2`, and
:math:`W' = W + \Delta` with top-:math:`k` left vectors :math:`U'_k`, one matrix gives
(:func:`principal_geometry`):

* ``inside[k]`` = :math:`\lVert U_k^\top \Delta V_k\rVert_F^2`, the energy of the update inside
  the top-:math:`k` principal block (an isotropic random update puts
  :math:`E k^2 / (mn)` there);
* ``left[k]`` = :math:`\lVert U_k^\top \Delta\rVert_F^2`, its energy along the top-:math:`k` left
  directions (random: :math:`E k / m`);
* ``overlap[k]`` = :math:`\lVert U_k^\top U'_k\rVert_F^2 / k = \frac1k \sum_i \cos^2\theta_i`, the
  mean squared cosine of the principal angles between the two top-:math:`k` subspaces (1: not
  rotated). It is evaluated as :math:`1 - \lVert (I - U_k U_k^\top) U'_k\rVert_F^2 / k` (equal for
  orthonormal bases): the residual is small when the rotation is, so its float32 rounding
  error is about :math:`\epsilon^2` instead of the :math:`\epsilon` of a sum of squared cosines
  near :math:`k`, which would hide the tiny rotations of small updates;
* ``drift[k]`` = :math:`\lVert\sigma_{1:k}(W') - \sigma_{1:k}(W)\rVert_2 /
  \lVert\sigma_{1:k}(W)\rVert_2`, the relative change of the top-:math:`k` singular values.

``k`` is capped at :math:`\min(m, n)` for each matrix (:func:`effective_rank`), so a rank beyond a
small matrix's size covers all of it. Products run in float32 on the matrix's device; the squared
norms are summed in float64.

:func:`aggregate_principal` combines many matrices with weights :math:`E_i` (as the low-rank
family does): the energy shares are ratios of sums, the overlap and drift :math:`E`-weighted
means, so a matrix that did not move weighs nothing and all-zero updates give NaN.

Top factors come from :func:`~grail.trainer.analysis.ops.spectrum.matrix_spectrum` (exact up to
``exact_max_dim``, the seeded randomized range finder above it); :func:`top_factors` turns its
truncation factors into orthonormal :math:`U_k`, :math:`V_k` by a QR of the columns in order (the
exact Gram path puts :math:`\Sigma` on whichever side is tall, and its vectors of small singular
values are only nearly orthogonal; QR keeps the span of every leading set of columns) and
recomputes the singular values in float64 from the vectors. A direction whose singular value is 0
has no defined vector and is left as a zero column (a zero matrix has no principal directions:
callers skip it).

:class:`~.factor_cache.FactorCache` keeps the factors of a reference between calls, validated
by :func:`~.factor_cache.fingerprint` (a 128-bit hash of the float32 bit patterns and the
shape), so a reference is decomposed once while it does not change (module
:mod:`~grail.trainer.analysis.ops.factor_cache`; both are re-exported here).

Decisions: the randomized path's vectors are approximations whose error grows as the spectrum
flattens (random-init weights have a flat one); because the reference and the updated matrix use
the same seed, the two approximations share their sketch and the error largely cancels in
``overlap`` for small updates (tested against the exact path on a decaying spectrum).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(6, 5, generator=g)
    >>> ref = top_factors(w, 2)
    >>> delta = 1e-3 * torch.outer(ref.u[:, 0], ref.v[:, 0])  # along the first principal pair
    >>> geo = principal_geometry(ref, top_factors(w + delta, 2), delta, [1, 2])
    >>> round(geo.inside[0] / geo.energy, 5), round(geo.overlap[0], 5)
    (1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .factor_cache import FactorCache, fingerprint  # re-exported: the cache of references
from .spectrum import matrix_spectrum

__all__ = [
    "FactorCache",
    "Factors",
    "Geometry",
    "aggregate_principal",
    "effective_rank",
    "fingerprint",
    "principal_geometry",
    "top_factors",
]

@dataclass
class Factors:
    """Top singular triplets of one matrix: ``u`` [m, k], ``v`` [n, k] (float32, orthonormal
    columns, on the matrix's device), ``s`` [k] (float64, CPU, descending)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    exact: bool

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def to(self, device: torch.device | str) -> Factors:
        """A copy on ``device`` (``s`` stays on the CPU); ``self`` when already there."""
        device = torch.device(device)
        if self.u.device == device:
            return self
        return Factors(self.u.to(device), self.s, self.v.to(device), self.exact)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.s, self.v))


def effective_rank(k: int, shape: tuple[int, int]) -> int:
    """``min(k, m, n)``: the rank a top-``k`` block can have in an ``m x n`` matrix."""
    return max(0, min(int(k), int(shape[0]), int(shape[1])))


def top_factors(
    w: torch.Tensor,
    k: int,
    *,
    exact_max_dim: int = 2048,
    oversampling: int = 8,
    power_iterations: int = 2,
    seed: int = 0,
    method: str = "gram",
) -> Factors:
    """The top ``min(k, m, n)`` singular triplets of the 2-D matrix ``w`` (see module doc)."""
    spec = matrix_spectrum(
        w,
        k,
        exact_max_dim=exact_max_dim,
        oversampling=oversampling,
        power_iterations=power_iterations,
        seed=seed,
        keep_factors=True,
        method=method,
    )
    assert spec.left is not None and spec.right is not None
    left, right = spec.left, spec.right  # [m, r], [r, n] with left @ right = U_r S_r V_r^T
    u, v = _orthonormal(left), _orthonormal(right.T)
    return Factors(u, _rayleigh_values(w.float(), u, v), v, spec.exact)


def _orthonormal(a: torch.Tensor) -> torch.Tensor:
    """The columns of ``a`` made orthonormal in order (QR, signs kept): the span of the first
    ``j`` columns is unchanged for every ``j``. Vectors of small singular values that the Gram
    path derives as :math:`Xv/\\sigma` are only orthogonal to about :math:`\\epsilon\\sigma_1
    /\\sigma`; a zero column (a zero singular value) stays zero."""
    nonzero = torch.linalg.vector_norm(a, dim=0) > 0
    q, r = torch.linalg.qr(a)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * (sign * nonzero.to(q.dtype))).contiguous()


def _rayleigh_values(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Singular values as :math:`\\lVert W v_i\\rVert` (tall ``w``) or :math:`\\lVert W^\\top
    u_i\\rVert` (wide) in float64.

    Second-order accurate in the vectors' error, and free of the float32 rounding of the
    solver's values, which would otherwise put a floor of about 1e-6 under ``drift``.
    Row blocks of ~4M entries bound the float64 copy.
    """
    x, vec = (w, v) if w.shape[0] >= w.shape[1] else (w.T, u)
    vec64 = vec.double()
    out = torch.zeros(vec.shape[1], dtype=torch.float64, device=w.device)
    rows = max(1, (1 << 22) // max(1, x.shape[1]))
    for start in range(0, x.shape[0], rows):
        out += (x[start : start + rows].double() @ vec64).square().sum(0)
    return out.sqrt().cpu()


@dataclass
class Geometry:
    """Per-matrix numbers of :func:`principal_geometry`, one entry per requested rank."""

    shape: tuple[int, int]
    energy: float
    exact: bool
    inside: list[float]
    left: list[float]
    overlap: list[float]
    drift: list[float]

    def to_vector(self) -> torch.Tensor:
        """``[energy, exact, *inside, *left, *overlap, *drift]`` in float64 (for a broadcast)."""
        head = [self.energy, 1.0 if self.exact else 0.0]
        values = head + self.inside + self.left + self.overlap + self.drift
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_vector(cls, shape: tuple[int, int], vec: torch.Tensor) -> Geometry:
        """Inverse of :meth:`to_vector`."""
        values = vec.tolist()
        n = (len(values) - 2) // 4
        parts = [values[2 + i * n : 2 + (i + 1) * n] for i in range(4)]
        return cls(shape, values[0], bool(values[1]), *parts)

    @staticmethod
    def vector_size(n_ranks: int) -> int:
        return 2 + 4 * n_ranks


def principal_geometry(
    ref: Factors, new: Factors, delta: torch.Tensor, ranks: Sequence[int]
) -> Geometry:
    r"""``inside``, ``left``, ``overlap`` and ``drift`` of ``delta`` for each of ``ranks``.

    ``ref`` are the reference's factors, ``new`` those of reference + ``delta``; both must hold
    at least ``min(max(ranks), m, n)`` triplets.
    """
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D update, got shape {tuple(delta.shape)}")
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    d = delta.float()
    top = effective_rank(max(ranks), shape)
    if ref.rank < top or new.rank < top:
        raise ValueError(f"factors of rank {ref.rank} and {new.rank} for a top-{top} block")
    u, v, u_new = ref.u[:, :top], ref.v[:, :top], new.u[:, :top]
    energy = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    proj = u.T @ d  # [top, n]: U^T Delta
    left_cum = proj.double().square().sum(1).cumsum(0)
    block = (proj @ v).double().square()  # [top, top]: (U^T Delta V)^2
    cosines = u.T @ u_new  # [top, top]
    inside, left, overlap, drift = [], [], [], []
    for k in ranks:
        kk = effective_rank(k, shape)
        inside.append(float(block[:kk, :kk].sum()))
        left.append(float(left_cum[kk - 1]))
        residual = u_new[:, :kk] - u[:, :kk] @ cosines[:kk, :kk]
        rotated = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2
        overlap.append(min(1.0, max(0.0, 1.0 - rotated / kk)))
        s_ref, s_new = ref.s[:kk], new.s[:kk]
        scale = float(torch.linalg.vector_norm(s_ref))
        change = float(torch.linalg.vector_norm(s_new - s_ref))
        drift.append(change / scale if scale > 0 else math.nan)
    return Geometry(shape, energy, ref.exact and new.exact, inside, left, overlap, drift)


def aggregate_principal(
    geometries: Mapping[str, Geometry],
    ranks: Sequence[int],
    group_of: Callable[[str], str] | None = None,
) -> dict[str, float]:
    r"""Energy-weighted summary over matrices, for the whole set and optionally per group.

    With :math:`E_i` the update energy of matrix :math:`i` and :math:`k_i = \min(k, m_i, n_i)`:
    ``energy_in_top{k}`` = :math:`\sum_i \mathrm{inside}_i / \sum_i E_i`, ``..._random`` =
    :math:`\sum_i E_i k_i^2/(m_i n_i) / \sum_i E_i`; ``left_energy_top{k}`` =
    :math:`\sum_i \mathrm{left}_i / \sum_i E_i`, ``..._random`` = :math:`\sum_i E_i k_i / m_i /
    \sum_i E_i`; ``subspace_overlap_top{k}`` and ``spectral_drift_top{k}`` =
    :math:`\sum_i E_i x_i / \sum_i E_i`. NaN when :math:`\sum_i E_i = 0`. Group keys are
    prefixed ``component/{group}/``. Keys carry no family prefix.

    >>> g = Geometry((4, 4), 2.0, True, [1.0], [1.5], [0.5], [0.1])
    >>> out = aggregate_principal({"w": g}, [2])
    >>> out["energy_in_top2"], out["energy_in_top2_random"], out["left_energy_top2_random"]
    (0.5, 0.25, 0.5)
    """
    groups = ["all"]
    if group_of is not None:
        groups += list(dict.fromkeys(group_of(n) for n in geometries))
    columns = ["inside", "inside_rnd", "left", "left_rnd", "overlap", "drift"]
    sums = {g: {"energy": 0.0, **{f"{c}{k}": 0.0 for c in columns for k in ranks}} for g in groups}
    for name, geo in geometries.items():
        if not geo.energy > 0:
            continue
        m, n = geo.shape
        row = {"energy": geo.energy}
        for i, k in enumerate(ranks):
            kk = effective_rank(k, geo.shape)
            row[f"inside{k}"] = geo.inside[i]
            row[f"inside_rnd{k}"] = geo.energy * kk * kk / (m * n)
            row[f"left{k}"] = geo.left[i]
            row[f"left_rnd{k}"] = geo.energy * kk / m
            row[f"overlap{k}"] = geo.energy * geo.overlap[i]
            row[f"drift{k}"] = geo.energy * geo.drift[i]
        targets = ["all"] if group_of is None else ["all", group_of(name)]
        for g in targets:
            for key, value in row.items():
                sums[g][key] += value

    out: dict[str, float] = {}
    for g in groups:
        prefix = "" if g == "all" else f"component/{g}/"
        x = sums[g]
        total = x["energy"]

        def share(key: str, total: float = total, x: dict[str, float] = x) -> float:
            return min(1.0, x[key] / total) if total > 0 else math.nan

        for k in ranks:
            out[f"{prefix}energy_in_top{k}"] = share(f"inside{k}")
            out[f"{prefix}energy_in_top{k}_random"] = share(f"inside_rnd{k}")
            out[f"{prefix}left_energy_top{k}"] = share(f"left{k}")
            out[f"{prefix}left_energy_top{k}_random"] = share(f"left_rnd{k}")
            out[f"{prefix}subspace_overlap_top{k}"] = share(f"overlap{k}")
            out[f"{prefix}spectral_drift_top{k}"] = (
                x[f"drift{k}"] / total if total > 0 else math.nan
            )
    return out
