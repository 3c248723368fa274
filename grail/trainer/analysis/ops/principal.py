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

:class:`FactorCache` keeps the factors of a reference between calls, validated by
:func:`fingerprint` (a 128-bit hash of the float32 bit patterns and the shape), so a reference is
decomposed once while it does not change. It is a plain container owned by its caller.

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

_PERIOD = 65521  # fingerprint weights repeat with this (prime) period; below 2^16
_WEIGHTS: dict[torch.device, torch.Tensor] = {}  # one constant table per device
_ROWS = 16  # rows of _PERIOD elements converted to int64 at a time
_MASK64 = (1 << 64) - 1


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


# --- caching the factors of a reference --------------------------------------------------------
def _weights(device: torch.device) -> torch.Tensor:
    w = _WEIGHTS.get(device)
    if w is None:
        gen = torch.Generator().manual_seed(0x5EED)
        odd = torch.randint(0, 1 << 15, (_PERIOD,), generator=gen, dtype=torch.int64) * 2 + 1
        w = _WEIGHTS[device] = odd.to(device)
    return w


def fingerprint(a: torch.Tensor) -> tuple[int, ...]:
    """A hash of the shape and the float32 bit patterns of ``a``: equal for bit-identical
    matrices, different (but for a ~2^-64 chance) otherwise.

    With :math:`b_i` the int32 bit pattern of entry :math:`i` (flat order), row
    :math:`r = \\lfloor i / P\\rfloor` and odd pseudo-random weights :math:`w_{i \\bmod P} <
    2^{16}` (:math:`P` = 65521): :math:`(\\sum_i w_{i \\bmod P} b_i, \\sum_i (r+1) b_i) \\bmod
    2^{64}`. A single changed entry always changes the first sum (odd weights); the second
    catches changes that repeat with the period. Products stay below :math:`2^{47}` and each row
    sum below :math:`2^{63}`, so nothing overflows; the rows are added in Python. One read of
    ``a`` in blocks of ~1M entries.

    >>> a = torch.ones(3, 4)
    >>> b = a.clone(); b[2, 3] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    >>> fingerprint(a) == fingerprint(a.clone()), fingerprint(a) == fingerprint(b)
    (True, False)
    """
    flat = a.detach().float().contiguous().view(torch.int32).reshape(-1)
    w = _weights(flat.device)
    weighted = plain = 0
    row = 0
    step = _ROWS * _PERIOD
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].to(torch.int64)
        full = chunk.numel() // _PERIOD * _PERIOD
        rows_w: list[int] = []
        rows_p: list[int] = []
        if full:
            block = chunk[:full].view(-1, _PERIOD)
            rows_w = (block * w).sum(1).tolist()
            rows_p = block.sum(1).tolist()
        if full < chunk.numel():
            tail = chunk[full:]
            rows_w.append(int((tail * w[: tail.numel()]).sum()))
            rows_p.append(int(tail.sum()))
        for sw, sp in zip(rows_w, rows_p, strict=True):
            row += 1
            weighted += sw
            plain += row * sp
    return (*a.shape, weighted & _MASK64, plain & _MASK64)


class FactorCache:
    """Top factors of reference matrices by parameter name, stored on ``device``.

    Each entry is ``(rank, fingerprint, factors)``; :meth:`get` returns the factors only for the
    same name, rank and fingerprint - a changed reference misses and is decomposed again.
    ``tracks`` says which matrix of a measurement is kept:

    * ``"next"`` (interval view): the updated matrix, whose factors are those of the next
      measurement's reference once the snapshot advances to it;
    * ``"reference"`` (a fixed base): the reference itself, decomposed once.

    Memory: :math:`k(m + n) + k` numbers per matrix (float32 vectors, float64 values).

    >>> cache = FactorCache()
    >>> f = top_factors(torch.eye(3), 1)
    >>> cache.put("w", 1, (1,), f)
    >>> cache.get("w", 1, (1,), "cpu") is not None, cache.get("w", 1, (2,), "cpu")
    (True, None)
    """

    def __init__(self, device: torch.device | str = "cpu", tracks: str = "next") -> None:
        if tracks not in ("next", "reference"):
            raise ValueError(f"tracks must be 'next' or 'reference', got {tracks!r}")
        self.device = torch.device(device)
        self.tracks = tracks
        self._entries: dict[str, tuple[int, tuple[int, ...], Factors]] = {}
        self.hits = 0
        self.misses = 0

    def get(
        self, name: str, rank: int, key: tuple[int, ...], device: torch.device | str
    ) -> Factors | None:
        """The cached factors of ``name`` on ``device`` if rank and fingerprint match."""
        entry = self._entries.get(name)
        if entry is None or entry[0] != rank or entry[1] != key:
            self.misses += 1
            return None
        self.hits += 1
        return entry[2].to(device)

    def put(self, name: str, rank: int, key: tuple[int, ...], factors: Factors) -> None:
        self._entries[name] = (rank, key, factors.to(self.device))

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def nbytes(self) -> int:
        return sum(f.nbytes() for _, _, f in self._entries.values())
