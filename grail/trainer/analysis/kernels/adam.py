"""Statistics of Adam's normalised update ``u`` in one loop, optionally fused with the
gradient's moments (:func:`joint_rows`: one read of the gradient for both families)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .batch import Batch, Groups
from .moments import MomentsBatch, _moments_fast
from .policy import Kernel, constants, floats, settings, usable
from .sums import count

__all__ = ["AdamBatch", "adam_u", "joint_rows"]


def adam_u(m: torch.Tensor, v: torch.Tensor, scale: Any, shift: Any) -> torch.Tensor:
    """Adam's normalised update ``u = (m * scale) / (sqrt(v) + shift)`` in float32, with
    ``scale = sqrt(1 - beta2^t) / (1 - beta1^t)`` and ``shift = eps * sqrt(1 - beta2^t)`` (see
    :func:`~grail.trainer.analysis.metrics.adam_sign.u_constants`); the one formula of both
    paths."""
    return (m.float() * scale) / (v.float().sqrt() + shift)


def _sign_counts(g: torch.Tensor, m: torch.Tensor) -> list[torch.Tensor]:
    g, m = g.float(), m.float()
    gp, gn, mp, mn = g > 0, g < 0, m > 0, m < 0  # NaN is neither
    return [count((gp & mp) | (gn & mn)), count((gp | gn) & (mp | mn))]


def _adam_fast(
    m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``[sum_sq, sum_abs, w_sq, le(t)..., agree, pairs]`` of u with ``c = [scale, shift,
    t...]``, valid when u is finite."""
    u = adam_u(m, v, c[0], c[1])
    au = u.abs()
    ud, wd = u.double(), w.float().double()
    return torch.stack(
        [
            (ud * ud).sum(),
            ud.abs().sum(),
            (wd * wd).sum(),
            *(count(au <= c[i]) for i in range(2, c.shape[0])),
            *_sign_counts(g, m),
        ]
    )


def _adam_masked(
    m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``[count, sum_sq, sum_abs, w_sq, le(t)..., agree, pairs]`` over the finite u."""
    u = adam_u(m, v, c[0], c[1])
    au = u.abs()
    finite = au < math.inf
    ud, wd = torch.where(finite, u, 0.0).double(), w.float().double()
    return torch.stack(
        [
            count(finite),
            (ud * ud).sum(),
            ud.abs().sum(),
            (wd * wd).sum(),
            *(count(finite & (au <= c[i])) for i in range(2, c.shape[0])),
            *_sign_counts(g, m),
        ]
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

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self._t = [float(t) for t in thresholds_f32]
        self._constants: dict[tuple[float, float], torch.Tensor] = {}

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

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Groups]]:
        """``(sums, maxes, extras, groups)`` for the ``P`` rows added: float64 ``(P, 5 + T)``,
        ``(P, 3)`` and ``(P, 4)`` of ``[sum sign(g) sign(m), non-zero pairs, sum w^2,
        lr^2 sum u^2]``, and each row's groups. Adam's statistics use neither the signed sum
        of u nor its extremes: those are NaN."""
        nt = self.n_thresholds
        stacked = self._stacked()
        p = len(self._raw)
        sums = torch.zeros(p, 5 + nt, dtype=torch.float64)
        maxes = torch.full((p, 3), math.nan, dtype=torch.float64)
        if stacked is None:
            return sums, maxes, torch.zeros(0, 4, dtype=torch.float64), []
        raw, counts = stacked  # raw: sum_sq, sum_abs, w_sq, le(t)..., agree, pairs
        sums[:, 0] = counts
        sums[:, 1] = math.nan
        sums[:, 2:4] = raw[:, :2]
        sums[:, 5:] = raw[:, 3 : 3 + nt]
        pair = raw[:, 3 + nt :].clone()
        w_sq = raw[:, 2].clone()
        for i, masked in self._reruns(raw, 2):
            sums[i, 4] = sums[i, 0] - masked[0]  # from the entry count, before it is replaced
            sums[i, 0] = masked[0]
            sums[i, 2:4] = masked[1:3]
            sums[i, 5:] = masked[4 : 4 + nt]
            w_sq[i] = masked[3]
            pair[i] = masked[4 + nt :]
        sign, lr_sq = torch.tensor(self._meta, dtype=torch.float64).unbind(1)
        agree, pairs = pair.unbind(1)
        extras = torch.stack([(2 * agree - pairs) * sign, pairs, w_sq, sums[:, 2] * lr_sq], dim=1)
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
    n_adam = 5 + adam.n_thresholds
    return out[:n_adam], out[n_adam:]
