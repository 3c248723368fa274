"""Which entries of an update a sparse mask keeps: magnitude, random, and budget thresholds.

* **Magnitude**: keep ``|delta| > T``. ``T`` is applied exactly as a real number to the float32
  delta (see :func:`~grail.trainer.analysis.core.stats.f32_floor`).
* **Random**: keep each entry independently with probability ``keep``. The random bits of an entry
  are a hash of ``(seed, parameter name, global flat position)`` (:func:`random_bits`), so the
  mask does not depend on how the tensor is sharded over ranks or chunked, and no RNG state - the
  global one least of all - is read or advanced.
* **Budget** (:mod:`.select`, re-exported here): :func:`keep_ratio_thresholds` finds the global
  magnitude threshold that keeps a given fraction of all entries, exactly, by a two-pass radix
  select on the float32 bit pattern of ``|delta|`` (monotone for non-negative floats): a
  32768-bin histogram of the high 16 bits, then one of the low 16 bits inside the selected bin.
  Memory is two histograms, not a concatenation or sort of all deltas.

A mask as the patching applies it is a :class:`Mask`: a small frozen object, callable as a
:data:`DropFn`, that declares what it is - its :class:`DropSpec` (which the compiled swap
evaluates itself; ``None`` for a mask known only by its function) and whether it reads
``|delta|`` at all. :class:`MagnitudeDrop` (:func:`magnitude_drop`) and :class:`RandomDrop`
(:func:`random_drop`) carry a spec; :func:`as_mask` turns any other drop function into a
:class:`FunctionMask` without one, so a wrapper that changes what a mask drops is evaluated by
calling it, never replaced by the spec of what it wraps.

Example:
    >>> import torch
    >>> d = torch.tensor([0.0, 1e-7, 1e-5, -1e-3])
    >>> magnitude_keep_mask(d, 1e-6).tolist()
    [False, False, True, True]
    >>> m1 = random_keep_mask(10, 0.5, seed=1, name="w", offset=0, device="cpu")
    >>> m2 = random_keep_mask(4, 0.5, seed=1, name="w", offset=6, device="cpu")
    >>> bool((m1[6:] == m2).all())
    True
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..core.scratch import ScratchBuffers
from ..core.stats import f32_floor

__all__ = [
    "NO_DROP",
    "DropFn",
    "DropSpec",
    "FunctionMask",
    "MagnitudeDrop",
    "Mask",
    "RandomDrop",
    "as_mask",
    "keep_ratio_thresholds",
    "keep_threshold_bits",
    "magnitude_drop",
    "magnitude_keep_mask",
    "mix_seed",
    "pack_mask",
    "random_bits",
    "random_drop",
    "random_keep_mask",
    "random_key",
    "random_uniforms",
    "unpack_mask",
]

_MASK63 = (1 << 63) - 1
_M1 = 0x7FEB352D  # lowbias32 multipliers (C. Wellons' hash prospector), as signed int32
_M2 = 0x846CA68B - (1 << 32)


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def magnitude_keep_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask ``|delta| > threshold`` (NaN deltas are kept: they certainly changed)."""
    return ~(delta.float().abs() <= f32_floor(threshold))


def _as_int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _lowbias32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit integer hash of an int32 tensor (wrapping arithmetic, logical shifts)."""
    for shift, mult in ((16, _M1), (15, _M2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if mult is not None:
            x.mul_(mult)
    return x


_ARANGE: dict[torch.device, torch.Tensor] = {}


_ARANGE_MAX = 1 << 20  # the cached counter stays small; longer requests are drawn in pieces


def _arange(n: int, device: torch.device) -> torch.Tensor:
    cached = _ARANGE.get(device)
    if cached is None:
        cached = torch.arange(_ARANGE_MAX, dtype=torch.int32, device=device)
        _ARANGE[device] = cached
    return cached[:n]


def random_bits(
    numel: int,
    seed: int,
    name: str,
    offset: int,
    device: torch.device | str,
    out: torch.Tensor | None = None,
    tmp: torch.Tensor | None = None,
) -> torch.Tensor:
    """24 uniform random bits (int32 in [0, 2^24)) for global flat positions ``offset ..``.

    A counter-based generator: the value at global position ``i`` of parameter ``name`` is
    ``lowbias32(i + key)`` with ``key`` derived from ``(seed, name, i // 2^32)``, so it depends
    neither on sharding nor on chunking, and no generator state (least of all the global one) is
    involved. lowbias32 is a bijective 32-bit mixer with full avalanche; its top 24 bits are used.
    ``out`` and ``tmp`` are optional int32 buffers of ``numel`` elements (the result goes to
    ``out``).
    """
    device = torch.device(device)
    out = torch.empty(numel, dtype=torch.int32, device=device) if out is None else out
    tmp = torch.empty_like(out) if tmp is None else tmp
    pos = 0
    while pos < numel:
        gi = offset + pos
        low = gi & 0xFFFFFFFF
        # stay inside one 2^32 block of positions and within the cached counter
        n = min(numel - pos, (1 << 32) - low, _ARANGE_MAX)
        x = out[pos : pos + n]
        torch.add(_arange(n, device), random_key(seed, name, gi), out=x)
        _lowbias32_(x, tmp[pos : pos + n])
        torch.bitwise_right_shift(x, 8, out=x).bitwise_and_(0xFFFFFF)
        pos += n
    return out


def random_key(seed: int, name: str, offset: int) -> int:
    """The int32 added to the local counter ``0, 1, ..`` of the positions ``offset ..`` (within
    one ``2^32`` block) before hashing: :func:`random_bits` at ``offset + i`` is
    ``lowbias32(int32(i + random_key(seed, name, offset)))``."""
    return _as_int32((offset & 0xFFFFFFFF) + mix_seed(seed, name, offset >> 32))


def random_uniforms(
    numel: int, seed: int, name: str, offset: int, device: torch.device | str
) -> torch.Tensor:
    """Uniforms in [0, 1) on a 2^-24 grid, from :func:`random_bits`."""
    return random_bits(numel, seed, name, offset, device).float().mul_(2.0**-24)


def keep_threshold_bits(keep: float) -> int:
    """An entry is kept iff its 24 random bits are below this (so P(keep) = keep on the grid)."""
    return round(min(max(keep, 0.0), 1.0) * (1 << 24))


#: ``drop(name, global_offset, abs_bits, out) -> out``: int32 ``-1`` where an entry reverts to
#: ``W_old``, ``0`` where it keeps ``W_new``. ``abs_bits`` is the int32 bit pattern of ``|delta|``
#: of the chunk starting at ``global_offset``; ``out`` is an int32 buffer of the same size. A
#: :class:`Mask` whose ``uses_delta`` is False gets ``None`` for ``abs_bits``, sparing the caller
#: the delta.
DropFn = Callable[[str, int, "torch.Tensor | None", torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DropSpec:
    """What a mask computes, in a form the compiled swap of
    :mod:`~grail.trainer.analysis.kernels` evaluates itself: an entry is dropped where
    ``float32 |delta| <= threshold`` (``-inf``: never) or where its :func:`random_bits` drawn
    with ``seed`` are ``>= keep_limit`` (``2**24``: never). :class:`MagnitudeDrop` and
    :class:`RandomDrop` carry one (:attr:`Mask.spec`); other masks are evaluated by calling them.
    """

    threshold: float = -math.inf
    keep_limit: int = 1 << 24
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.keep_limit < 1 << 24


#: The spec of "nothing dropped": the parameters as trained (``W_new``).
NO_DROP = DropSpec()


class Mask(ABC):
    """Which entries of an update revert to ``W_old``: callable as a :data:`DropFn`, and
    declaring what it is (see module docstring).

    A subclass implements ``__call__``; it overrides :attr:`spec` when the compiled swap can
    evaluate it, and sets ``uses_delta = False`` when it depends on the position alone.
    """

    #: Whether the call reads ``abs_bits``; ``False``: it is passed ``None``.
    uses_delta: ClassVar[bool] = True

    @property
    def spec(self) -> DropSpec | None:
        """What the mask computes, for the compiled swap; ``None``: call it."""
        return None

    def spec_for(self, name: str, offset: int, numel: int) -> DropSpec | None:
        """What the mask computes on ``numel`` entries of ``name`` from global flat position
        ``offset`` (a whole local tensor): :attr:`spec`, unless the mask's rule differs between
        tensors (an exact top-k mask's threshold depends on where its ties fall)."""
        return self.spec

    @abstractmethod
    def __call__(
        self, name: str, offset: int, abs_bits: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor:
        """The int32 ``-1/0`` drop mask of a chunk, written into ``out`` (see :data:`DropFn`)."""


@dataclass(frozen=True)
class FunctionMask(Mask):
    """A mask known only by its function: no spec, and it is given ``|delta|``.

    >>> m = as_mask(lambda name, offset, bits, out: out.fill_(-1))
    >>> m.spec is None, m.uses_delta
    (True, True)
    """

    fn: DropFn

    def __call__(
        self, name: str, offset: int, abs_bits: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor:
        return self.fn(name, offset, abs_bits, out)


def as_mask(drop: Mask | DropFn) -> Mask:
    """``drop`` itself if it is a :class:`Mask`, else a :class:`FunctionMask` calling it (a
    function never inherits a spec, whatever attributes it carries)."""
    return drop if isinstance(drop, Mask) else FunctionMask(drop)


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:  # 1 << k as int32; 1 << 31 wraps to the sign bit
        w = torch.tensor([_as_int32(1 << k) for k in range(32)], dtype=torch.int32, device=device)
        _BIT_WEIGHTS[device] = w
    return w


def pack_mask(
    mask: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat int32 ``-1/0`` mask packed 32 entries to an int32 word, plus the unpacked tail
    (``scratch``: an optional int32 buffer as large as ``mask``).

    >>> m = -(torch.arange(70) % 3 == 0).int()
    >>> torch.equal(unpack_mask(pack_mask(m), torch.empty(70, dtype=torch.int32)), m)
    True
    """
    body = mask.numel() // 32 * 32
    scratch = torch.empty_like(mask) if scratch is None else scratch
    words = torch.bitwise_and(
        mask[:body].view(-1, 32), _bit_weights(mask.device), out=scratch[:body].view(-1, 32)
    )
    # distinct bits: the sum is their OR (wrapping into the sign bit for bit 31)
    return words.sum(dim=1, dtype=torch.int32), mask[body:].clone()


def unpack_mask(packed: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The int32 ``-1/0`` mask of :func:`pack_mask`, written into ``out``."""
    words, tail = packed
    body = words.numel() * 32
    if body:
        shifts = 31 - torch.arange(32, dtype=torch.int32, device=out.device)
        rows = out[:body].view(-1, 32)
        torch.bitwise_left_shift(words[:, None], shifts, out=rows)
        rows.bitwise_right_shift_(31)  # arithmetic: the moved bit fills the word
    out[body:].copy_(tail)
    return out


def _f32_bits(t: float) -> int:
    return int(np.float32(t).view(np.int32))


@dataclass(frozen=True)
class MagnitudeDrop(Mask):
    """Drop entries with ``|delta| <= threshold`` (NaN deltas are kept).

    >>> bits = torch.tensor([0.0, 1e-7, 1e-5]).view(torch.int32)
    >>> MagnitudeDrop(1e-6)("w", 0, bits, torch.empty_like(bits)).tolist()
    [-1, -1, 0]
    >>> MagnitudeDrop(1e-6).spec.threshold == f32_floor(1e-6)
    True
    """

    threshold: float
    # A negative or NaN threshold drops nothing (limit 0); its bit pattern would wrap around.
    # -0.0 counts as +0.0 (its bit pattern is the sign bit: the limit would wrap around too)
    _t32: float = field(init=False, repr=False, compare=False)
    _limit: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ok = self.threshold >= 0
        object.__setattr__(self, "_t32", f32_floor(self.threshold) + 0.0 if ok else -math.inf)
        object.__setattr__(self, "_limit", _f32_bits(self._t32) + 1 if ok else 0)

    @property
    def spec(self) -> DropSpec:
        return DropSpec(threshold=self._t32)

    def __call__(
        self, name: str, offset: int, abs_bits: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor:
        assert abs_bits is not None
        return torch.sub(abs_bits, self._limit, out=out).bitwise_right_shift_(31)


@dataclass(frozen=True)
class RandomDrop(Mask):
    """Drop each entry with probability ``1 - keep`` (:func:`random_bits` with ``seed``
    decides, by global position: no ``|delta|`` needed).

    >>> out = torch.empty(6, dtype=torch.int32)
    >>> RandomDrop(0.0, seed=1)("w", 0, None, out).tolist(), RandomDrop(0.5, 1).uses_delta
    ([-1, -1, -1, -1, -1, -1], False)
    """

    keep: float
    seed: int
    uses_delta: ClassVar[bool] = False
    _limit: int = field(init=False, repr=False, compare=False)
    _scratch: ScratchBuffers = field(
        default_factory=ScratchBuffers, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_limit", keep_threshold_bits(self.keep))

    @property
    def spec(self) -> DropSpec:
        return DropSpec(keep_limit=self._limit, seed=self.seed)

    def __call__(
        self, name: str, offset: int, abs_bits: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor:
        n = out.numel()
        tmp = self._scratch.get(out.device, n, out.dtype)
        bits = random_bits(n, self.seed, name, offset, out.device, out=out, tmp=tmp)
        # kept iff bits < limit  <=>  (limit - 1 - bits) >= 0; drop = sign bit of that
        return bits.neg_().add_(self._limit - 1).bitwise_right_shift_(31)


def magnitude_drop(threshold: float) -> MagnitudeDrop:
    """Drop entries with ``|delta| <= threshold`` (NaN deltas are kept):
    :class:`MagnitudeDrop`."""
    return MagnitudeDrop(threshold)


def random_drop(keep: float, seed: int) -> RandomDrop:
    """Drop each entry with probability ``1 - keep`` (:func:`random_bits` decides):
    :class:`RandomDrop`."""
    return RandomDrop(keep, seed)


def random_keep_mask(
    numel: int, keep: float, seed: int, name: str, offset: int, device: torch.device | str
) -> torch.Tensor:
    """Flat boolean mask keeping each entry with probability ``keep`` (see module docstring)."""
    return random_bits(numel, seed, name, offset, device) < keep_threshold_bits(keep)


from .select import keep_ratio_thresholds  # noqa: E402  (re-exported: the budget)
