"""The global magnitude threshold that keeps a given fraction of all entries, exactly.

:func:`keep_ratio_thresholds` runs a two-pass radix select on the float32 bit pattern of
``|delta|`` (non-negative floats order like their bit patterns): the first pass histograms the
high 16 bits, the second the low 16 bits inside the bucket that holds the k-th largest value.
Two histograms of 2^15 and 2^16 counts, whatever the model's size; every chunk is read at most
twice. Used by ``sparse/*`` keep ratios and, through
:func:`~grail.trainer.analysis.ops.budget.exact_budget_drops`, by every exact top-k mask.

Example:
    >>> import torch
    >>> values = torch.tensor([0.1, -0.4, 0.3, 0.0, 0.2])
    >>> keep_ratio_thresholds(lambda: iter([values]), [0.4])  # |d| > T keeps 0.4 and 0.3
    {0.4: 0.29999998211860657}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

__all__ = ["keep_ratio_thresholds"]


_HI_BINS = 1 << 15  # non-negative finite float32 bit patterns are < 0x7F800000: high half < 2^15


def keep_ratio_thresholds(
    chunks: Callable[[], Iterable[torch.Tensor]],
    keep_ratios: Iterable[float],
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    device: torch.device | str = "cpu",
) -> dict[float, float]:
    """Global magnitude thresholds ``T`` such that ``|delta| > T`` keeps each target fraction.

    Args:
        chunks: called once per pass; yields float32 delta chunks covering every entry once.
        keep_ratios: targets in (0, 1].
        reduce: sums a histogram over ranks (identity in one process). Every rank issues the
            same reductions in the same order, whether or not it holds any entries.
        device: where the histograms live when this rank yields no chunk.

    The threshold keeps every entry at least as large as the k-th largest ``|delta|``
    (``k = round(keep * N)``), so the achieved ratio is the target up to ties; non-finite
    deltas are always kept and count towards ``N``. A target above the changed fraction gives
    ``T = 0`` (all changed entries).
    """
    ratios = sorted(set(keep_ratios))
    hist_hi: torch.Tensor | None = None
    n_total = 0
    for d in chunks():
        n_total += d.numel()
        h = torch.bincount(_abs_bits(d) >> 16, minlength=_HI_BINS)
        hist_hi = h if hist_hi is None else hist_hi + h
    if hist_hi is None:
        hist_hi = torch.zeros(_HI_BINS, dtype=torch.long, device=device)
    # every non-finite |delta| (high half >= that of +inf) goes to one extra, top bin
    hist_hi = torch.cat(
        [
            hist_hi[:_INF_HI],
            hist_hi.new_zeros(_HI_BINS - _INF_HI),
            hist_hi[_INF_HI:].sum(0, keepdim=True),
        ]
    )
    total = reduce(torch.tensor([n_total], dtype=torch.long, device=hist_hi.device))
    hist_hi = reduce(hist_hi)
    n = int(total.item())
    if n == 0:
        return dict.fromkeys(ratios, 0.0)
    # Walk bins from the largest values down; bin _HI_BINS collects non-finite (always kept).
    desc = hist_hi.flip(0).cumsum(0).cpu()
    targets = {}
    for r in ratios:
        k = max(1, min(n, round(r * n)))
        j = int(torch.searchsorted(desc, k))  # first position where the cumulative count >= k
        hi_bin = _HI_BINS - j
        above = int(desc[j - 1]) if j > 0 else 0
        targets[r] = (hi_bin, k - above)  # need the (k-above)-th largest inside hi_bin
    out: dict[float, float] = {}
    need = sorted({hb for hb, _ in targets.values() if hb < _HI_BINS})  # same order on all ranks
    hist_lo: dict[int, torch.Tensor] = {}
    if need:
        for d in chunks():
            bits = _abs_bits(d)
            hi = bits >> 16
            for hb in need:
                sel = bits[hi == hb] & 0xFFFF
                h = torch.bincount(sel, minlength=1 << 16)
                hist_lo[hb] = h if hb not in hist_lo else hist_lo[hb] + h
        for hb in need:
            if hb not in hist_lo:
                hist_lo[hb] = torch.zeros(1 << 16, dtype=torch.long, device=hist_hi.device)
            hist_lo[hb] = reduce(hist_lo[hb])
    for r, (hb, rank_in_bin) in targets.items():
        if hb >= _HI_BINS:  # the k largest are all non-finite: keep exactly those
            out[r] = float(np.finfo(np.float32).max)  # `|inf| > inf` is False: inf won't do
            continue
        desc_lo = hist_lo[hb].flip(0).cumsum(0).cpu()
        j = int(torch.searchsorted(desc_lo, rank_in_bin))
        value_bits = (hb << 16) | ((1 << 16) - 1 - j)
        value = torch.tensor([value_bits], dtype=torch.int32).view(torch.float32).item()
        if value <= 0.0:
            out[r] = 0.0
        else:
            below = torch.nextafter(torch.tensor(value), torch.tensor(0.0)).item()
            out[r] = float(below)
    return out


_INF_HI = 0x7F80  # high half of +inf; NaNs lie above it, every finite |x| below


def _abs_bits(d: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|d|`` (monotone in the value; non-finite ones at the top)."""
    return d.float().abs().view(torch.int32)
