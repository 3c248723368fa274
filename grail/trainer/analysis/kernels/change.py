"""Parameter-change statistics of ``(new, old)`` pairs in one loop per tensor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.layout import LE, MAXES, Columns, Layout, assign, stack_row
from .batch import Batch, Groups
from .policy import Kernel, constants, usable
from .sums import count, finite_sums, sums

__all__ = ["ChangeBatch"]

#: The row of :func:`_change_fast` (``le``: one column per threshold): the moments of ``d``,
#: its extremes, and the counts of :func:`_change_counts`.
FAST = ("sum", "sum_sq", "sum_abs", LE, "max", "min", "old_sq", "bf16_same", "flips")
#: The row of :func:`_change_masked`.
MASKED = ("count", *FAST)
#: The columns whose non-finite value sends a row to the masked rerun.
CHECKED = ("sum", "sum_sq", "sum_abs")


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 bit pattern of ``x`` rounded to nearest even, in int32 arithmetic (upper
    bits sign-extended): what ``x.to(torch.bfloat16).view(torch.int16)`` holds. Written out
    because Inductor drops a float -> bfloat16 -> float round trip as a no-op and does not
    vectorise a bitcast of bfloat16. Every NaN maps to the one pattern torch gives it."""
    x = x.float()
    b = x.view(torch.int32)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return torch.where(x != x, 0x7FC0, rounded)


def _change_counts(new: torch.Tensor, old: torch.Tensor) -> dict[str, torch.Tensor]:
    """``old_sq`` (sum old^2), ``bf16_same`` (bf16-unchanged count) and ``flips`` (sign-flip
    count) over every entry: the parameter change extras (bf16 rounding compared bit by bit,
    as the eager path does). For bfloat16 parameters the bf16 count is the exact-unchanged
    count, so it is not computed (0)."""
    od = old.float().double()
    if new.dtype == torch.bfloat16:
        same_bf16 = torch.zeros((), dtype=torch.float64)
    else:
        same_bf16 = count(_bf16_bits(new) == _bf16_bits(old))
    n, o = new.float(), old.float()
    flips = ((n > 0) & (o < 0)) | ((n < 0) & (o > 0))
    return {"old_sq": (od * od).sum(), "bf16_same": same_bf16, "flips": count(flips)}


def _change_fast(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:data:`FAST` of ``d = float32(new) - float32(old)``, valid when every ``d`` is finite."""
    d = new.float() - old.float()
    extremes = {"max": d.amax().double(), "min": d.amin().double()}
    return stack_row(FAST, {**sums(d, d.abs(), t), **extremes, **_change_counts(new, old)})


def _change_masked(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:data:`MASKED` with the moments over the finite ``d`` and the extras over every entry."""
    d = new.float() - old.float()
    ad = d.abs()
    finite = ad < math.inf
    extremes = {
        "max": torch.where(finite, d, -math.inf).amax().double(),
        "min": torch.where(finite, d, math.inf).amin().double(),
    }
    return stack_row(MASKED, {**finite_sums(d, ad, t), **extremes, **_change_counts(new, old)})


_CHANGE_FAST = Kernel(_change_fast, 2)
_CHANGE_MASKED = Kernel(_change_masked, 2)


class ChangeBatch(Batch):
    """Parameter-change statistics of ``(new, old)`` pairs through the compiled kernels.

    ``d = float32(new) - float32(old)`` for parameters stored in the same float32, bfloat16 or
    float16 dtype on both sides (a lossless snapshot: the float32 difference is exact, so the
    count of ``|d| <= 0`` is the exact-unchanged count). Rows follow
    :class:`~grail.trainer.analysis.core.stats.StreamingStats` (maxima ``[max |d|, max, -min]``)
    with the extras ``[sum old^2, exact unchanged, bf16 unchanged, sign flips]``; groups,
    pooling, slices and the non-finite rerun work as in :class:`MomentsBatch`.

    Args:
        thresholds_f32: thresholds of the counts ``|d| <= t``, float32 values; must hold 0.0.
        min_numel: smaller tensors are refused (default :attr:`~.policy.KernelSettings.min_numel`).
    """

    _DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    #: The extra sums of :meth:`rows`, by name.
    EXTRAS = ("old_sum_sq", "exact_unchanged", "bf16_unchanged", "sign_flips")

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self.thresholds = constants(thresholds_f32)
        #: the columns of the rows this batch returns
        self.layout = Layout(tuple(thresholds_f32), self.EXTRAS)
        if 0.0 not in self.layout.thresholds:
            raise ValueError(f"ChangeBatch needs the threshold 0.0, got {list(thresholds_f32)}")
        n = len(self.layout.thresholds)
        self.fast, self.masked = Columns(FAST, n), Columns(MASKED, n)

    def _fast(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        return _CHANGE_FAST, _change_fast

    def _masked(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        return _CHANGE_MASKED, _change_masked

    def _consts(self, pool_key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        return (self.thresholds,)

    def add(
        self, new: torch.Tensor, old: torch.Tensor, groups: Sequence[int], bf16_param: bool = False
    ) -> bool:
        """Take flat ``new`` and ``old`` (same dtype); ``False`` means the caller goes eager.
        ``bf16_param``: the parameter itself is bfloat16 (whatever the stored dtype), so its
        bf16-unchanged count is its exact-unchanged count, as on the eager path."""
        if new.dtype != old.dtype or new.dtype not in self._DTYPES:
            return False
        if not usable(self._min, new, old):
            return False
        bf16_param = bf16_param or new.dtype == torch.bfloat16  # (its kernel skips the count)
        pool_key = (tuple(groups), bf16_param, new.dtype)
        return self._take((new.detach(), old.detach()), pool_key)

    def rows(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[Groups]]:
        """``(sums, maxes, extras, groups)``: float64 ``(P, len(layout.moments))`` and
        ``(P, len(layout.maxes))``, the extra sums :data:`EXTRAS` by name (``(P,)`` each) and
        the groups of each of the ``P`` rows."""
        stacked = self._stacked()
        p = len(self._raw)
        cols, fast, masked = self.layout.moments, self.fast, self.masked
        sums = self.layout.new_sums(p)
        if stacked is None:
            extras = {k: torch.zeros(0, dtype=torch.float64) for k in self.EXTRAS}
            return sums, self.layout.new_maxes(0), extras, []
        raw, counts = stacked
        sums[:, cols["count"]] = counts
        assign(sums, cols, raw, fast, ("sum", "sum_sq", "sum_abs", LE))
        tail = ("max", "min", "old_sq", "bf16_same", "flips")
        hi, lo, old_sq, bf16_same, flips = (raw[:, fast[k]].clone() for k in tail)
        for i, row in self._reruns(raw, fast.indices(*CHECKED)):
            sums[i, cols["nonfinite"]] = sums[i, cols["count"]] - row[masked["count"]]
            assign(sums[i], cols, row, masked, ("count", "sum", "sum_sq", "sum_abs", LE))
            hi[i], lo[i], old_sq[i], bf16_same[i], flips[i] = (row[masked[k]] for k in tail)
        extremes = {"max_abs": torch.maximum(hi, -lo), "max": hi, "neg_min": -lo}
        maxes = stack_row(MAXES.fields, extremes, dim=1)
        bf16_params = torch.tensor(self._meta, dtype=torch.bool)
        exact = sums[:, self.layout.le(0.0)].clone()  # lossless: |d| <= 0 iff values are equal
        extras = {
            "old_sum_sq": old_sq,
            "exact_unchanged": exact,
            "bf16_unchanged": torch.where(bf16_params, exact, bf16_same),  # as the eager path
            "sign_flips": flips,
        }
        return sums, maxes, extras, list(self._groups)
