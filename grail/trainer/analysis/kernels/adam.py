"""Statistics of Adam's normalised update ``u`` in one loop, optionally fused with the
gradient's moments (:func:`joint_rows`: one read of the gradient for both families)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.layout import LE, Columns, Layout, assign, stack_row
from .batch import Batch, Groups
from .moments import MomentsBatch, _moments_fast
from .policy import Kernel, constants, floats, settings, usable
from .sums import count

__all__ = ["AdamBatch", "adam_u", "joint_rows"]

#: The row of :func:`_adam_fast` (``le``: one column per threshold): Adam's normalised update's
#: sums and counts, the weights' squared norm and the sign agreement of the gradient and ``m``.
FAST = ("sum_sq", "sum_abs", "w_sq", LE, "agree", "pairs")
#: The row of :func:`_adam_masked`.
MASKED = ("count", *FAST)
#: The columns whose non-finite value sends a row to the masked rerun (the weights' norm does
#: not: a NaN weight is reported, not masked).
CHECKED = ("sum_sq", "sum_abs")


def adam_u(m: torch.Tensor, v: torch.Tensor, scale: Any, shift: Any) -> torch.Tensor:
    """Adam's normalised update ``u = (m * scale) / (sqrt(v) + shift)`` in float32, with
    ``scale = sqrt(1 - beta2^t) / (1 - beta1^t)`` and ``shift = eps * sqrt(1 - beta2^t)`` (see
    :func:`~grail.trainer.analysis.metrics.adam_sign.u_constants`); the one formula of both
    paths."""
    return (m.float() * scale) / (v.float().sqrt() + shift)


def _sign_counts(g: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    g, m = g.float(), m.float()
    gp, gn, mp, mn = g > 0, g < 0, m > 0, m < 0  # NaN is neither
    return {"agree": count((gp & mp) | (gn & mn)), "pairs": count((gp | gn) & (mp | mn))}


def _adam_fast(
    m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """:data:`FAST` of u with ``c = [scale, shift, t...]``, valid when u is finite."""
    u = adam_u(m, v, c[0], c[1])
    au = u.abs()
    ud, wd = u.double(), w.float().double()
    return stack_row(
        FAST,
        {
            "sum_sq": (ud * ud).sum(),
            "sum_abs": ud.abs().sum(),
            "w_sq": (wd * wd).sum(),
            LE: [count(au <= c[i]) for i in range(2, c.shape[0])],
            **_sign_counts(g, m),
        },
    )


def _adam_masked(
    m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """:data:`MASKED` over the finite u (the weights' norm and the signs over every entry)."""
    u = adam_u(m, v, c[0], c[1])
    au = u.abs()
    finite = au < math.inf
    ud, wd = torch.where(finite, u, 0.0).double(), w.float().double()
    return stack_row(
        MASKED,
        {
            "count": count(finite),
            "sum_sq": (ud * ud).sum(),
            "sum_abs": ud.abs().sum(),
            "w_sq": (wd * wd).sum(),
            LE: [count(finite & (au <= c[i])) for i in range(2, c.shape[0])],
            **_sign_counts(g, m),
        },
    )


def _joint_fast(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    tg: torch.Tensor,
) -> torch.Tensor:
    """:func:`_adam_fast` followed by :func:`_moments_fast` of ``g``: one read of the gradient."""
    return torch.cat([_adam_fast(m, v, g, w, c), _moments_fast(g, tg)])



_ADAM_FAST = Kernel(_adam_fast, 4)
_ADAM_MASKED = Kernel(_adam_masked, 4)
_JOINT_FAST = Kernel(_joint_fast, 4)


class AdamBatch(Batch):
    """Statistics of Adam's normalised update through the compiled kernels, one row per tensor.

    Groups, pooling of small tensors (same groups, constants, sign, lr and dtypes), slices and
    the non-finite rerun work as in :class:`MomentsBatch`.

    Args:
        thresholds_f32: thresholds of the counts ``|u| <= t``, already as float32 values.
        min_numel: smaller tensors are refused (default :attr:`~.policy.KernelSettings.min_numel`).
    """

    #: The extra sums of :meth:`rows`, by name.
    EXTRAS = ("sign_sum", "sign_nonzero", "w_sq", "lr_u_sq")

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self._t = [float(t) for t in thresholds_f32]
        self._constants: dict[tuple[float, float], torch.Tensor] = {}
        #: the columns of the rows this batch returns
        self.layout = Layout(tuple(self._t), self.EXTRAS)
        self.fast, self.masked = Columns(FAST, len(self._t)), Columns(MASKED, len(self._t))

    @property
    def n_thresholds(self) -> int:
        return len(self._t)

    def constants(self, scale: float, shift: float) -> torch.Tensor:
        """The packed ``[scale, shift, t...]`` of the Adam kernels (cached per value)."""
        c = self._constants.get((scale, shift))
        if c is None:
            c = self._constants[(scale, shift)] = constants([scale, shift, *self._t])
        return c

    def _fast(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        return _ADAM_FAST, _adam_fast

    def _masked(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        return _ADAM_MASKED, _adam_masked

    def _consts(self, pool_key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        return (self.constants(pool_key[2], pool_key[3]),)

    def add(
        self,
        m: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        w: torch.Tensor,
        scale: Any,
        shift: Any,
        groups: Sequence[int],
        sign: float = 1.0,
        lr: float = 1.0,
        raw: torch.Tensor | None = None,
    ) -> bool:
        """Take flat ``m`` (``exp_avg``), ``v`` (denominator state), dense gradient ``g`` (its
        sign agreement is multiplied by ``sign``: -1 for ``maximize``) and weights ``w``, with
        the constants of :func:`adam_u`; the rows feed ``groups``. ``False`` means the caller
        must go eager. ``raw`` is the fast kernel's row when :func:`joint_rows` computed it."""
        data = tuple(a.detach() for a in (m, v, g, w))
        factors = (sign, lr * lr)
        if raw is not None:  # from joint_rows, which checked the inputs
            self._push(raw, (*data, self.constants(scale, shift)), tuple(groups), factors)
            return True
        if not usable(self._min, m, v, g, w) or not floats(scale, shift):
            return False
        pool_key = (tuple(groups), factors, scale, shift, *(a.dtype for a in data))
        return self._take(data, pool_key)

    def rows(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[Groups]]:
        """``(sums, maxes, extras, groups)`` for the ``P`` rows added: float64
        ``(P, len(layout.moments))`` and ``(P, len(layout.maxes))``, the extra sums
        :data:`EXTRAS` by name (``(P,)`` each: ``sign_sum`` = sum sign(g) sign(m),
        ``sign_nonzero`` = non-zero pairs, ``w_sq`` = sum w^2, ``lr_u_sq`` = lr^2 sum u^2), and
        each row's groups. Adam's statistics use neither the signed sum of u nor its extremes:
        those are NaN."""
        stacked = self._stacked()
        p = len(self._raw)
        cols, fast, masked = self.layout.moments, self.fast, self.masked
        sums = self.layout.new_sums(p)
        maxes = self.layout.new_maxes(p, math.nan)
        if stacked is None:
            return sums, maxes, {k: torch.zeros(0, dtype=torch.float64) for k in self.EXTRAS}, []
        raw, counts = stacked
        sums[:, cols["count"]] = counts
        sums[:, cols["sum"]] = math.nan
        assign(sums, cols, raw, fast, ("sum_sq", "sum_abs", LE))
        w_sq, agree, pairs = (raw[:, fast[name]].clone() for name in ("w_sq", "agree", "pairs"))
        for i, row in self._reruns(raw, fast.indices(*CHECKED)):
            # non-finite from the entry count, before the count is replaced
            sums[i, cols["nonfinite"]] = sums[i, cols["count"]] - row[masked["count"]]
            assign(sums[i], cols, row, masked, ("count", "sum_sq", "sum_abs", LE))
            w_sq[i], agree[i], pairs[i] = (row[masked[k]] for k in ("w_sq", "agree", "pairs"))
        sign, lr_sq = torch.tensor(self._meta, dtype=torch.float64).unbind(1)
        extras = {
            "sign_sum": (2 * agree - pairs) * sign,
            "sign_nonzero": pairs,
            "w_sq": w_sq,
            "lr_u_sq": sums[:, cols["sum_sq"]] * lr_sq,
        }
        return sums, maxes, extras, list(self._groups)


def joint_rows(
    adam: AdamBatch,
    moments: MomentsBatch,
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fast rows of ``adam`` and of ``moments`` (for the gradient ``g``) from one kernel
    that reads ``g`` once, to be passed as ``raw`` to their ``add``; ``None`` when the pair is
    better done apart (small tensors, which each batch pools, or huge ones) or cannot be done."""
    n = m.numel()
    ok = usable(max(adam._min, moments._min), m, v, g, w) and floats(scale, shift)
    if not ok or not settings.pool_numel <= n <= settings.slice_numel:
        return None
    args = (*(a.detach() for a in (m, v, g, w)), adam.constants(scale, shift))
    out = _JOINT_FAST(*args, moments.thresholds)
    if out is None:
        return None
    n_adam = len(adam.fast)  # the joint row: the Adam row, then the gradient's
    return out[:n_adam], out[n_adam:]
