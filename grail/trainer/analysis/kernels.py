r"""Single-pass reductions compiled with ``torch.compile``, for the statistics read on every step.

The streaming path of :mod:`~grail.trainer.analysis.stats` applies a dozen eager ops to each
cache-sized chunk. On a CPU each op is a separate loop with its own dispatch, so the gradient and
Adam statistics cost many passes over the data. The kernels here compute every sum, count and
extreme of a whole tensor in one loop that ``torch.compile`` (Inductor) generates, vectorises and
parallelises; they read each input once and allocate nothing of the tensor's size.

Two batches collect one row per tensor, in the layout of
:class:`~grail.trainer.analysis.stats.StreamingStats` (fed at the end through
:meth:`~grail.trainer.analysis.stats.StreamingStats.accumulate_rows`). Each computes what its
computer reports and nothing more, because on a CPU every extra reduction in the loop costs
about as much as reading the data again:

* :class:`MomentsBatch` (gradients): finite count, sum, sum of squares, sum of absolute values,
  non-finite count, the counts ``|x| <= t`` and ``max |x|`` over the finite entries; the signed
  extremes are NaN.
* :class:`AdamBatch`: for Adam's normalised update ``u`` (:func:`adam_u`, the eager path's
  formula too) the finite count, sum of squares, sum of
  absolute values, non-finite count and counts ``|u| <= t``, plus the sign agreement of the
  gradient with ``m`` and the squared norm of the weights; the signed sum and the extremes are
  NaN.
* :func:`joint_rows` fills both from one loop when a gradient and Adam's state are read
  together, so the gradient is read once.

Each tensor first goes through a kernel that assumes every value is finite. Its float64 sums are
then finite exactly when that holds (a float64 sum of finite float32 values cannot overflow); when
they are not, a second kernel that masks the non-finite entries runs on that tensor alone.

Exactness: sums are accumulated in float64 inside the loop (more accurate than the eager path's
float32 chunk sums), counts in int32 over slices of at most ``2**30`` entries, so they are exact.
Inputs of any floating dtype are upcast to float32 in registers, as the eager path copies them.
Threshold counts compare float32 values with the float32 thresholds the caller passes (see
:func:`~grail.trainer.analysis.stats.f32_floor`).

When the kernels are used: for CPU tensors of at least :data:`MIN_NUMEL` entries, while
``torch.compile`` works in this process. The first call of each input signature (dtypes, number
of thresholds, thread count) compiles for a few seconds; shapes are dynamic, so every tensor size
reuses it (a compiled call costs tens of microseconds, less than the eager path for any size). If
compiling fails (no C++ compiler, an unsupported platform) a warning is logged once and the
callers use the eager path from then on. Accelerators keep the eager path, where each op is
already one bandwidth-bound kernel.

Example:
    >>> import torch
    >>> batch = MomentsBatch([0.5], min_numel=1)
    >>> batch.add(torch.tensor([1.0, -2.0, float("nan"), 0.0]))
    1
    >>> sums, maxes = batch.rows()
    >>> sums.tolist(), maxes.tolist()
    ([[3.0, -1.0, 5.0, 3.0, 1.0, 1.0]], [[2.0, nan, nan]])
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["MIN_NUMEL", "AdamBatch", "MomentsBatch", "adam_u", "disabled_reason", "joint_rows"]

logger = logging.getLogger(__name__)

#: Smaller tensors take the eager path (Dynamo specialises sizes 0 and 1 instead of sharing
#: the dynamic kernel).
MIN_NUMEL = 2
#: Entries per kernel call: int32 counts stay exact.
_SLICE = 1 << 30
#: Distinct input signatures compiled per kernel; later ones use the eager path. Dynamo keeps a
#: bounded cache per function and fails (``fullgraph``) beyond it.
_MAX_SIGNATURES = 6


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32).sum(dtype=torch.int32).double()


# --- kernels (traced by torch.compile; plain torch code) ---------------------------------------
def _moments_fast(x: torch.Tensor, t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[sum, sum_sq, sum_abs, le(t)..., max_abs]``, valid when every value is finite."""
    x = x.float()
    ax = x.abs()
    xd = x.double()
    return torch.stack(
        [
            xd.sum(),
            (xd * xd).sum(),
            xd.abs().sum(),
            *(_count(ax <= ti) for ti in t),
            ax.amax().double(),
        ]
    )


def _moments_masked(x: torch.Tensor, t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[count, sum, sum_sq, sum_abs, le(t)..., max_abs]`` over the finite values."""
    x = x.float()
    ax = x.abs()
    finite = ax < math.inf  # False for NaN and +-inf
    xd = torch.where(finite, x, 0.0).double()
    return torch.stack(
        [
            _count(finite),
            xd.sum(),
            (xd * xd).sum(),
            xd.abs().sum(),
            *(_count(ax <= ti) for ti in t),
            torch.where(finite, ax, -math.inf).amax().double(),
        ]
    )


def adam_u(m: torch.Tensor, v: torch.Tensor, scale: Any, shift: Any) -> torch.Tensor:
    """Adam's normalised update ``u = (m * scale) / (sqrt(v) + shift)`` in float32, with
    ``scale = sqrt(1 - beta2^t) / (1 - beta1^t)`` and ``shift = eps * sqrt(1 - beta2^t)`` (see
    :func:`~grail.trainer.analysis.metrics.adam_sign.u_constants`); the one formula of both
    paths."""
    return (m.float() * scale) / (v.float().sqrt() + shift)


def _sign_counts(g: torch.Tensor, m: torch.Tensor) -> list[torch.Tensor]:
    g, m = g.float(), m.float()
    gp, gn, mp, mn = g > 0, g < 0, m > 0, m < 0  # NaN is neither
    return [_count((gp & mp) | (gn & mn)), _count((gp | gn) & (mp | mn))]


def _adam_fast(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    t: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``[sum_sq, sum_abs, w_sq, le(t)..., agree, pairs]`` of u, valid when u is finite."""
    u = adam_u(m, v, scale, shift)
    au = u.abs()
    ud, wd = u.double(), w.float().double()
    return torch.stack(
        [
            (ud * ud).sum(),
            ud.abs().sum(),
            (wd * wd).sum(),
            *(_count(au <= ti) for ti in t),
            *_sign_counts(g, m),
        ]
    )


def _adam_masked(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    t: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``[count, sum_sq, sum_abs, w_sq, le(t)..., agree, pairs]`` over the finite u."""
    u = adam_u(m, v, scale, shift)
    au = u.abs()
    finite = au < math.inf
    ud, wd = torch.where(finite, u, 0.0).double(), w.float().double()
    return torch.stack(
        [
            _count(finite),
            (ud * ud).sum(),
            ud.abs().sum(),
            (wd * wd).sum(),
            *(_count(au <= ti) for ti in t),
            *_sign_counts(g, m),
        ]
    )


def _joint_fast(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    t: tuple[torch.Tensor, ...],
    tg: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """:func:`_adam_fast` followed by :func:`_moments_fast` of ``g``: one read of the gradient."""
    return torch.cat([_adam_fast(m, v, g, w, scale, shift, t), _moments_fast(g, tg)])


# --- compilation --------------------------------------------------------------------------------
_failure: list[str] = []  # the first compiler failure of this process, if any


def disabled_reason() -> str | None:
    """Why the kernels are off for the rest of the process (a compiler error), else ``None``."""
    return _failure[0] if _failure else None


def _probe(arg: Any) -> Any:
    """A stand-in for a kernel argument: 2**20 ones for data, ones for scalars."""
    if isinstance(arg, tuple):
        return tuple(_probe(a) for a in arg)
    if arg.dim() == 1:
        return torch.ones(1 << 20, dtype=arg.dtype)
    return torch.ones((), dtype=arg.dtype)


def _signature(args: Sequence[Any]) -> tuple[object, ...]:
    key: list[object] = [torch.get_num_threads()]
    for a in args:
        key.append(len(a) if isinstance(a, tuple) else (a.dtype, a.dim()))
    return tuple(key)


class _Kernel:
    """A function compiled on first use, with a bounded set of input signatures.

    Arguments are 1-D data tensors (dynamic sizes), 0-d float32 scalars and tuples of them.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self._fn = fn
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._signatures: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> torch.Tensor | None:
        if _failure:
            return None
        key = _signature(args)
        if key not in self._signatures:
            with self._lock:
                if not self._compile_for(key, args):
                    return None
        return self._compiled(*args)  # type: ignore[misc]

    def _compile_for(self, key: tuple[object, ...], args: Sequence[Any]) -> bool:
        if key in self._signatures:
            return True
        if len(self._signatures) >= _MAX_SIGNATURES:
            return False
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
            # Inductor picks the loop form (parallel or not) from the sizes it first sees, so
            # compile on inputs as large as a typical weight, then check the result once.
            out = self._compiled(*(_probe(a) for a in args))
            if not bool(torch.isfinite(out).all()):
                raise RuntimeError("the compiled kernel returned non-finite values on its probe")
        except Exception as exc:  # any compiler failure means "use the eager path"
            _failure.append(f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            logger.warning(
                "grail-analysis: torch.compile failed (%s); gradient and Adam statistics use the "
                "eager path from now on, several times slower. AnalysisConfig(fused_kernels="
                "False) skips the attempt.",
                _failure[0],
            )
            return False
        self._signatures.add(key)
        return True


_MOMENTS_FAST = _Kernel(_moments_fast)
_MOMENTS_MASKED = _Kernel(_moments_masked)
_ADAM_FAST = _Kernel(_adam_fast)
_ADAM_MASKED = _Kernel(_adam_masked)
_JOINT_FAST = _Kernel(_joint_fast)


class _Scalars:
    """0-d float32 tensors for the scalars of one batch, made once per distinct value."""

    def __init__(self) -> None:
        self._cache: dict[float, torch.Tensor] = {}

    def __call__(self, values: Sequence[float]) -> tuple[torch.Tensor, ...]:
        out = []
        for v in values:
            t = self._cache.get(v)
            if t is None:
                t = self._cache[v] = torch.tensor(v, dtype=torch.float32)
            out.append(t)
        return tuple(out)


def _usable(x: torch.Tensor, min_numel: int) -> bool:
    return x.device.type == "cpu" and x.dim() == 1 and x.numel() >= max(min_numel, 2)


def _slices(n: int) -> list[slice]:
    return [slice(start, start + _SLICE) for start in range(0, n, _SLICE)]


# --- batches ------------------------------------------------------------------------------------
class MomentsBatch:
    """Moments of whole 1-D tensors through the compiled kernels, one row per tensor.

    A tensor of more than ``2**30`` entries gets one row per slice of that size. The inputs are
    referenced (not copied) until :meth:`rows`, which reruns the rare non-finite ones masked.

    Args:
        thresholds_f32: thresholds of the counts ``|x| <= t``, already as float32 values.
        min_numel: smaller tensors are refused (default :data:`MIN_NUMEL`).
    """

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        self._min = MIN_NUMEL if min_numel is None else min_numel
        self.thresholds = _Scalars()(thresholds_f32)
        self._raw: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, raw: torch.Tensor | None = None) -> int:
        """Add rows for ``x`` and return how many; 0 means the caller must go eager. ``raw``
        is the fast kernel's row when another kernel already computed it (:func:`joint_rows`)."""
        if not _usable(x, self._min):
            return 0
        parts = [x.detach()[sl] for sl in _slices(x.numel())]
        if raw is not None and len(parts) == 1:
            self._raw.append(raw)
            self._inputs.append(parts[0])
            return 1
        for part in parts:
            out = _MOMENTS_FAST(part, self.thresholds)
            if out is None:  # only ever for the first part (same signature for every slice)
                return 0
            self._raw.append(out)
            self._inputs.append(part)
        return len(parts)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums, maxes)``: float64 ``(P, 5 + T)`` and ``(P, 3)`` for the ``P`` rows added.
        Of the maxima only ``max |x|`` is computed (``-inf`` where a tensor had no finite
        value); ``max`` and ``-min`` are NaN."""
        nt = len(self.thresholds)
        p = len(self._raw)
        sums = torch.zeros(p, 5 + nt, dtype=torch.float64)
        maxes = torch.full((p, 3), math.nan, dtype=torch.float64)
        if not p:
            return sums, maxes
        raw = torch.stack(self._raw)  # sum, sum_sq, sum_abs, le(t)..., max_abs
        sums[:, 0] = torch.tensor([x.numel() for x in self._inputs], dtype=torch.float64)
        sums[:, 1:4] = raw[:, :3]
        sums[:, 5:] = raw[:, 3 : 3 + nt]
        maxes[:, 0] = raw[:, 3 + nt]
        for i in (~torch.isfinite(raw[:, :3]).all(1)).nonzero().flatten().tolist():
            x = self._inputs[i]
            masked = _MOMENTS_MASKED(x, self.thresholds)
            if masked is None:  # the compiler failed on it: the same code, eager
                masked = _moments_masked(x, self.thresholds)
            sums[i, :4] = masked[:4]
            sums[i, 4] = x.numel() - masked[0]
            sums[i, 5:] = masked[4 : 4 + nt]
            maxes[i, 0] = masked[4 + nt]
        return sums, maxes


class AdamBatch:
    """Statistics of Adam's normalised update through the compiled kernels, one row per tensor.

    Rows, slices and the non-finite rerun work as in :class:`MomentsBatch`.

    Args:
        thresholds_f32: thresholds of the counts ``|u| <= t``, already as float32 values.
        min_numel: smaller tensors are refused (default :data:`MIN_NUMEL`).
    """

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        self._min = MIN_NUMEL if min_numel is None else min_numel
        self._scalars = _Scalars()
        self.thresholds = self._scalars(thresholds_f32)
        self._raw: list[torch.Tensor] = []
        self._inputs: list[tuple[Any, ...]] = []
        self._factors: list[tuple[float, float]] = []

    def scalars(self, scale: float, shift: float) -> tuple[torch.Tensor, ...]:
        """The 0-d tensors of ``scale`` and ``shift`` (cached)."""
        return self._scalars([scale, shift])

    def add(
        self,
        m: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        w: torch.Tensor,
        scale: Any,
        shift: Any,
        sign: float = 1.0,
        lr: float = 1.0,
        raw: torch.Tensor | None = None,
    ) -> int:
        """Add rows for flat ``m`` (``exp_avg``), ``v`` (denominator state), dense gradient
        ``g`` (its sign agreement is multiplied by ``sign``: -1 for ``maximize``) and weights
        ``w``, with the constants of :func:`adam_u`; returns how many, 0 meaning the caller
        must go eager. ``raw`` is the fast kernel's row when :func:`joint_rows` computed it."""
        if not _usable(m, self._min) or not all(isinstance(c, float) for c in (scale, shift)):
            return 0
        scal = self.scalars(scale, shift)
        slices = _slices(m.numel())
        if raw is not None and len(slices) == 1:
            self._raw.append(raw)
            self._inputs.append((*(a.detach() for a in (m, v, g, w)), *scal))
            self._factors.append((sign, lr * lr))
            return 1
        for sl in slices:
            args = (*(a.detach()[sl] for a in (m, v, g, w)), *scal)
            out = _ADAM_FAST(*args, self.thresholds)
            if out is None:  # only ever for the first slice (same signature for every slice)
                return 0
            self._raw.append(out)
            self._inputs.append(args)
            self._factors.append((sign, lr * lr))
        return len(slices)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sums, maxes, extras)`` for the ``P`` rows added: float64 ``(P, 5 + T)``, ``(P, 3)``
        and ``(P, 4)`` of ``[sum sign(g) sign(m), non-zero pairs, sum w^2, lr^2 sum u^2]``.
        Adam's statistics use neither the signed sum of u nor its extremes: those are NaN."""
        nt = len(self.thresholds)
        p = len(self._raw)
        sums = torch.zeros(p, 5 + nt, dtype=torch.float64)
        maxes = torch.full((p, 3), math.nan, dtype=torch.float64)
        if not p:
            return sums, maxes, torch.zeros(0, 4, dtype=torch.float64)
        raw = torch.stack(self._raw)  # sum_sq, sum_abs, w_sq, le(t)..., agree, pairs
        sums[:, 0] = torch.tensor([a[0].numel() for a in self._inputs], dtype=torch.float64)
        sums[:, 1] = math.nan
        sums[:, 2:4] = raw[:, :2]
        sums[:, 5:] = raw[:, 3 : 3 + nt]
        pair = raw[:, 3 + nt :].clone()
        w_sq = raw[:, 2].clone()
        for i in (~torch.isfinite(raw[:, :2]).all(1)).nonzero().flatten().tolist():
            args = self._inputs[i]
            masked = _ADAM_MASKED(*args, self.thresholds)
            if masked is None:  # the compiler failed on it: the same code, eager
                masked = _adam_masked(*args, self.thresholds)
            sums[i, 0] = masked[0]
            sums[i, 2:4] = masked[1:3]
            sums[i, 4] = args[0].numel() - masked[0]
            sums[i, 5:] = masked[4 : 4 + nt]
            w_sq[i] = masked[3]
            pair[i] = masked[4 + nt :]
        sign, lr_sq = torch.tensor(self._factors, dtype=torch.float64).unbind(1)
        agree, pairs = pair.unbind(1)
        extras = torch.stack([(2 * agree - pairs) * sign, pairs, w_sq, sums[:, 2] * lr_sq], dim=1)
        return sums, maxes, extras


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
    that reads ``g`` once, to be passed as ``raw`` to their ``add``; ``None`` when the pair
    cannot be done jointly (then each batch computes its own)."""
    if not (_usable(m, adam._min) and _usable(g, moments._min)) or m.numel() > _SLICE:
        return None
    args = (*(a.detach() for a in (m, v, g, w)), *adam.scalars(scale, shift))
    out = _JOINT_FAST(*args, adam.thresholds, moments.thresholds)
    if out is None:
        return None
    n_adam = 5 + len(adam.thresholds)
    return out[:n_adam], out[n_adam:]
