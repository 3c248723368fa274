"""The one kernel that writes: exchange a parameter's entries with its snapshot where two masks
(magnitude, random) differ, evaluating both masks in the same loop (for the patching of
:mod:`~grail.trainer.analysis.patching.swaps`)."""

from __future__ import annotations

from typing import Any

import torch

from ..ops.masks import DropSpec, random_key
from .policy import Kernel, constants, settings, usable

__all__ = ["select_swap"]


# lowbias32 in int64 arithmetic masked to 32 bits (defined wrap-around, unlike int32 in C++).
_M1, _M2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # masks._lowbias32_'s; M2 signed: no overflow


def _random24(n: Any, key: torch.Tensor) -> torch.Tensor:
    """The 24 random bits of positions ``0 .. n-1`` (masks.random_bits with its key)."""
    x = (torch.arange(n, dtype=torch.int64) + key) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * _M1) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * _M2) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return x >> 8


def _swap_where(p: torch.Tensor, s: torch.Tensor, swap: torch.Tensor) -> None:
    """Exchange ``p`` and ``s`` where ``swap``, in place (a select moves bits, NaN payloads
    included)."""
    p_new, s_new = torch.where(swap, s, p), torch.where(swap, p, s)
    p.copy_(p_new)
    s.copy_(s_new)


def _nan_count(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Entries where ``p`` or ``s`` is NaN (``x != x``: Inductor vectorises it, not isnan)."""
    pf, sf = p.float(), s.float()
    return ((pf != pf) | (sf != sf)).sum(dtype=torch.int32)


def _swap(
    p: torch.Tensor, s: torch.Tensor, t: torch.Tensor, k: torch.Tensor | None, changed: bool
) -> torch.Tensor:
    """The select swap from one mask to another: ``t = [threshold before, threshold after]``
    and, for random masks, ``k = [random key, keep limit before, keep limit after]`` (one seed
    for both sides). Returns ``[dropped after]``, plus ``[changed]`` when counted: that count
    makes Inductor add a second loop over the data, so only the first swap asks for it."""
    ad = (p.float() - s.float()).abs()
    before, after = ad <= t[0], ad <= t[1]
    if k is not None:
        bits = _random24(p.shape[0], k[0])
        before, after = before | (bits >= k[1]), after | (bits >= k[2])
    _swap_where(p, s, before ^ after)
    counts = [after.sum(dtype=torch.int32)]
    if changed:
        counts.append((ad != 0).sum(dtype=torch.int32))
    return torch.stack(counts)


# One function (code object) per variant: Dynamo bounds recompiles per code object, and four
# variants of three dtypes would exceed its limit if they shared one.
def _swap_magnitude(p: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _swap(p, s, t, None, False)


def _swap_magnitude_changed(p: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _swap(p, s, t, None, True)


def _swap_random(
    p: torch.Tensor, s: torch.Tensor, t: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    return _swap(p, s, t, k, False)


def _swap_random_changed(
    p: torch.Tensor, s: torch.Tensor, t: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    return _swap(p, s, t, k, True)



_NAN_COUNT = Kernel(_nan_count, 2)

_SWAP = {  # (random, count changed) -> kernel
    (False, False): Kernel(_swap_magnitude, 2),
    (False, True): Kernel(_swap_magnitude_changed, 2),
    (True, False): Kernel(_swap_random, 2),
    (True, True): Kernel(_swap_random_changed, 2),
}


_SWAP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_swap(
    p: torch.Tensor,
    s: torch.Tensor,
    before: DropSpec,
    after: DropSpec,
    name: str,
    offset: int,
    count_changed: bool = False,
) -> torch.Tensor | None:
    """Move parameter ``p`` (flat, local) from the mask ``before`` to ``after`` (the specs the
    masks declare, :attr:`~grail.trainer.analysis.ops.masks.Mask.spec`) by exchanging
    entries with its snapshot ``s`` where the two masks differ, in one compiled pass:
    :class:`~grail.trainer.analysis.patching.swaps.SelectPatch`'s XOR swap, masks included
    (``|delta|`` is symmetric in ``p`` and ``s``, so the same call with the specs exchanged
    undoes it).
    ``offset`` is the global flat position of ``p[0]`` (random bits depend on it).

    Returns int32 ``[entries after drops]`` (and ``[entries changed]`` with ``count_changed``),
    or ``None`` without touching anything where the caller must swap eagerly: other dtypes or
    devices, tensors of more than ``2**30`` entries or crossing a ``2**32`` block of random
    counters, random masks with two seeds, NaN in a half-precision pair, kernels off.
    """
    if p.dtype != s.dtype or p.dtype not in _SWAP_DTYPES or p.numel() > settings.slice_numel:
        return None
    if not usable(settings.min_numel, p, s):
        return None
    p, s = p.detach(), s.detach()  # requires_grad would be one more guard
    if p.dtype != torch.float32:
        # The select moves half-precision values through float32 and back, which keeps every
        # value but a NaN's payload (a select on integer views keeps it too, but does not
        # vectorise: 3x slower). A read of both, ~a tenth of the swap.
        nans = _NAN_COUNT(p, s)
        if nans is None or int(nans) > 0:
            return None
    t = constants([before.threshold, after.threshold])
    seeds = {spec.seed for spec in (before, after) if spec.is_random}
    if not seeds:
        return _SWAP[False, count_changed](p, s, t)
    if len(seeds) > 1 or (offset & 0xFFFFFFFF) + p.numel() > 1 << 32:
        return None  # two seeds, or random counters from two blocks
    key = random_key(seeds.pop(), name, offset)  # type: ignore[arg-type]
    k = torch.tensor([key, before.keep_limit, after.keep_limit], dtype=torch.int64)
    torch._dynamo.mark_static(k)
    return _SWAP[True, count_changed](p, s, t, k)

