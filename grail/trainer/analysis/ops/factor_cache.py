"""The factors of reference matrices kept between measurements, and the hash that validates them.

:class:`FactorCache` holds the top singular factors of a reference matrix by parameter name;
:func:`fingerprint` (a 128-bit hash of the shape and the float32 bit patterns) is its key, so a
reference is decomposed again exactly when it changed. A plain container owned by its caller
(the principal-geometry computers); the factors themselves come from
:func:`~grail.trainer.analysis.ops.principal.top_factors`.

Example:
    >>> import torch
    >>> a = torch.ones(2, 3)
    >>> fingerprint(a) == fingerprint(a.clone()), fingerprint(a) == fingerprint(2 * a)
    (True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .principal import Factors

__all__ = ["FactorCache", "fingerprint"]

_PERIOD = 65521  # fingerprint weights repeat with this (prime) period; below 2^16
_WEIGHTS: dict[torch.device, torch.Tensor] = {}  # one constant table per device
_ROWS = 16  # rows of _PERIOD elements converted to int64 at a time
_MASK64 = (1 << 64) - 1


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
        # plain sums first, then the weights multiplied in place: no product tensor is
        # allocated (a fresh one per block made the hash 4-5x slower)
        if full:
            block = chunk[:full].view(-1, _PERIOD)
            rows_p = block.sum(1).tolist()
            rows_w = block.mul_(w).sum(1).tolist()
        if full < chunk.numel():
            tail = chunk[full:]
            rows_p.append(int(tail.sum()))
            rows_w.append(int(tail.mul_(w[: tail.numel()]).sum()))
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

    >>> from grail.trainer.analysis.ops.principal import top_factors
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
