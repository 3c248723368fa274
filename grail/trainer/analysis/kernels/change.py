"""Parameter-change statistics of ``(new, old)`` pairs in one loop per tensor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .batch import Batch, Groups
from .policy import Kernel, constants, usable
from .sums import count, finite_sums, sums

__all__ = ["ChangeBatch"]


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 bit pattern of ``x`` rounded to nearest even, in int32 arithmetic (upper
    bits sign-extended): what ``x.to(torch.bfloat16).view(torch.int16)`` holds. Written out
    because Inductor drops a float -> bfloat16 -> float round trip as a no-op and does not
    vectorise a bitcast of bfloat16. Every NaN maps to the one pattern torch gives it."""
    x = x.float()
    b = x.view(torch.int32)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return torch.where(x != x, 0x7FC0, rounded)


def _change_counts(new: torch.Tensor, old: torch.Tensor) -> list[torch.Tensor]:
    """``[sum old^2, bf16-unchanged count, sign-flip count]`` over every entry: the parameter
    change extras (bf16 rounding compared bit by bit, as the eager path does). For bfloat16
    parameters the bf16 count is the exact-unchanged count, so it is not computed (0)."""
    od = old.float().double()
    if new.dtype == torch.bfloat16:
        same_bf16 = torch.zeros((), dtype=torch.float64)
    else:
        same_bf16 = count(_bf16_bits(new) == _bf16_bits(old))
    n, o = new.float(), old.float()
    flips = ((n > 0) & (o < 0)) | ((n < 0) & (o > 0))
    return [(od * od).sum(), same_bf16, count(flips)]


def _change_fast(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[sum, sum_sq, sum_abs, le(t)..., max, min, old_sq, bf16_same, flips]`` of
    ``d = float32(new) - float32(old)``, valid when every ``d`` is finite."""
    d = new.float() - old.float()
    extremes = [d.amax().double(), d.amin().double()]
    return torch.stack([*sums(d, d.abs(), t), *extremes, *_change_counts(new, old)])


def _change_masked(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[count, sum, sum_sq, sum_abs, le(t)..., max, min, old_sq, bf16_same, flips]`` with the
    moments over the finite ``d`` and the extras over every entry."""
    d = new.float() - old.float()
    ad = d.abs()
    finite = ad < math.inf
    extremes = [
        torch.where(finite, d, -math.inf).amax().double(),
        torch.where(finite, d, math.inf).amin().double(),
    ]
    return torch.stack([*finite_sums(d, ad, t), *extremes, *_change_counts(new, old)])


# The select swap of SelectPatch (see select_swap). t = [threshold before, threshold after]
# (float32), k = [random key, keep limit before, keep limit after] (int64). The hash is
# lowbias32 in int64 arithmetic masked to 32 bits (defined wrap-around, unlike int32 in C++).


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

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self.thresholds = constants(thresholds_f32)
        self._zero = list(thresholds_f32).index(0.0)

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

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Groups]]:
        """``(sums, maxes, extras, groups)``: float64 ``(P, 5 + T)``, ``(P, 3)``, ``(P, 4)``
        and the groups of each of the ``P`` rows."""
        nt = self.thresholds.numel()
        stacked = self._stacked()
        p = len(self._raw)
        sums = torch.zeros(p, 5 + nt, dtype=torch.float64)
        extras = torch.zeros(p, 4, dtype=torch.float64)
        if stacked is None:
            return sums, torch.zeros(0, 3, dtype=torch.float64), extras, []
        raw, counts = stacked  # raw: sum, sum_sq, sum_abs, le(t)..., max, min, 3 extras
        sums[:, 0] = counts
        sums[:, 1:4] = raw[:, :3]
        sums[:, 5:] = raw[:, 3 : 3 + nt]
        hi, lo = raw[:, 3 + nt].clone(), raw[:, 4 + nt].clone()
        tail = raw[:, 5 + nt :].clone()  # old_sq, bf16 same, flips
        for i, masked in self._reruns(raw, 3):
            sums[i, 4] = sums[i, 0] - masked[0]
            sums[i, :4] = masked[:4]
            sums[i, 5:] = masked[4 : 4 + nt]
            hi[i], lo[i] = masked[4 + nt], masked[5 + nt]
            tail[i] = masked[6 + nt :]
        maxes = torch.stack([torch.maximum(hi, -lo), hi, -lo], dim=1)
        bf16_params = torch.tensor(self._meta, dtype=torch.bool)
        exact = sums[:, 5 + self._zero]  # lossless: |d| <= 0 iff the stored values are equal
        extras[:, 0] = tail[:, 0]
        extras[:, 1] = exact
        extras[:, 2] = torch.where(bf16_params, exact, tail[:, 1])  # as the eager path counts
        extras[:, 3] = tail[:, 2]
        return sums, maxes, extras, list(self._groups)

