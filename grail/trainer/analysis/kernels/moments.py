"""Moments of whole tensors (the gradient family): sums, counts and ``max |x|`` in one loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.layout import LE, MAXES, Columns, Layout, assign, stack_row
from .batch import Batch, Groups
from .policy import Kernel, constants, usable
from .sums import finite_sums, sums

__all__ = ["MomentsBatch"]

#: The row of :func:`_moments_fast` (``le``: one column per threshold).
FAST = ("sum", "sum_sq", "sum_abs", LE, "max_abs")
#: The row of :func:`_moments_masked`.
MASKED = ("count", *FAST)
#: The columns whose non-finite value sends a row to the masked rerun.
CHECKED = ("sum", "sum_sq", "sum_abs")


def _moments_fast(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:data:`FAST`, valid when every value is finite."""
    x = x.float()
    ax = x.abs()
    return stack_row(FAST, {**sums(x, ax, t), "max_abs": ax.amax().double()})


def _moments_masked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:data:`MASKED` over the finite values."""
    x = x.float()
    ax = x.abs()
    max_abs = torch.where(ax < math.inf, ax, -math.inf).amax().double()
    return stack_row(MASKED, {**finite_sums(x, ax, t), "max_abs": max_abs})



_MOMENTS_FAST = Kernel(_moments_fast, 1)
_MOMENTS_MASKED = Kernel(_moments_masked, 1)


class MomentsBatch(Batch):
    """Moments of whole 1-D tensors through the compiled kernels, one row per tensor.

    Each row feeds the groups given with its tensor. Tensors below ``settings.pool_numel``
    entries with the same groups and dtype are concatenated into one row (one kernel call for
    all the norms and biases of a layer instead of one each); a tensor of more than ``2**30``
    entries gets one row per slice of that size. The inputs are referenced (small ones copied) until
    :meth:`rows`, which reruns the rare non-finite ones masked.

    Args:
        thresholds_f32: thresholds of the counts ``|x| <= t``, already as float32 values.
        min_numel: smaller tensors are refused (default :attr:`~.policy.KernelSettings.min_numel`).
    """

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self.thresholds = constants(thresholds_f32)
        #: the columns of the rows this batch returns
        self.layout = Layout(tuple(thresholds_f32))
        n = len(self.layout.thresholds)
        self.fast, self.masked = Columns(FAST, n), Columns(MASKED, n)

    def _fast(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        return _MOMENTS_FAST, _moments_fast

    def _masked(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        return _MOMENTS_MASKED, _moments_masked

    def _consts(self, pool_key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        return (self.thresholds,)

    def add(self, x: torch.Tensor, groups: Sequence[int], raw: torch.Tensor | None = None) -> bool:
        """Take ``x`` (its rows feed ``groups``); ``False`` means the caller must go eager.
        ``raw`` is the fast kernel's row when :func:`joint_rows` already computed it."""
        if raw is not None:  # from joint_rows, which checked the inputs
            self._push(raw, (x.detach(), self.thresholds), tuple(groups), None)
            return True
        if not usable(self._min, x):
            return False
        x = x.detach()
        return self._take((x,), (tuple(groups), None, x.dtype))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, list[Groups]]:
        """``(sums, maxes, groups)``: float64 ``(P, len(layout.moments))`` and
        ``(P, len(layout.maxes))`` and the groups of each of the ``P`` rows. Of the maxima only
        ``max_abs`` is computed (``-inf`` where no value was finite); ``max`` and ``neg_min``
        are NaN."""
        stacked = self._stacked()
        p = len(self._raw)
        cols, fast, masked = self.layout.moments, self.fast, self.masked
        sums = self.layout.new_sums(p)
        maxes = self.layout.new_maxes(p, math.nan)
        if stacked is None:
            return sums, maxes, []
        raw, counts = stacked
        sums[:, cols["count"]] = counts
        assign(sums, cols, raw, fast, ("sum", "sum_sq", "sum_abs", LE))
        assign(maxes, MAXES, raw, fast, ("max_abs",))
        for i, row in self._reruns(raw, fast.indices(*CHECKED)):
            sums[i, cols["nonfinite"]] = sums[i, cols["count"]] - row[masked["count"]]
            assign(sums[i], cols, row, masked, ("count", "sum", "sum_sq", "sum_abs", LE))
            assign(maxes[i], MAXES, row, masked, ("max_abs",))
        return sums, maxes, list(self._groups)
