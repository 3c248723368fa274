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

:class:`ChangeBatch` does the same for parameter change. :func:`select_swap` is the one kernel
that writes: it exchanges the entries of a parameter and its snapshot where two masks
(magnitude, random) differ, evaluating both masks in the same loop, for the patching of
:mod:`~grail.trainer.analysis.patching`.

Each tensor first goes through a kernel that assumes every value is finite. Its float64 sums are
then finite exactly when that holds (a float64 sum of finite float32 values cannot overflow); when
they are not, a second kernel that masks the non-finite entries runs on that tensor alone.

Exactness: sums are accumulated in float64 inside the loop (more accurate than the eager path's
float32 chunk sums), counts in int32 over slices of at most ``2**30`` entries, so they are exact.
Inputs of any floating dtype are upcast to float32 in registers, as the eager path copies them.
Threshold counts compare float32 values with the float32 thresholds the caller passes (see
:func:`~grail.trainer.analysis.stats.f32_floor`).

When the kernels are used: for CPU tensors of at least :data:`MIN_NUMEL` entries, in
measurements of at least :data:`MIN_TOTAL_NUMEL` entries (models of ~17M parameters and up; a
smaller model's statistics take milliseconds eagerly), while ``torch.compile`` works in this
process. The first call of each input signature (dtypes, number
of thresholds, thread count) compiles for a few seconds; shapes are dynamic, so every tensor size
reuses it (a compiled call costs tens of microseconds, less than the eager path for any size). If
compiling fails (no C++ compiler, an unsupported platform) a warning is logged once and the
callers use the eager path from then on. Accelerators keep the eager path, where each op is
already one bandwidth-bound kernel.

Example:
    >>> import torch
    >>> batch = MomentsBatch([0.5])
    >>> batch.add(torch.tensor([1.0, -2.0, float("nan"), 0.0]), groups=[0])
    True
    >>> sums, maxes, groups = batch.rows()
    >>> sums.tolist(), maxes.tolist(), groups
    ([[3.0, -1.0, 5.0, 3.0, 1.0, 1.0]], [[2.0, nan, nan]], [(0,)])
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .masks import DropSpec, random_key

__all__ = [
    "MIN_NUMEL",
    "MIN_TOTAL_NUMEL",
    "POOL_NUMEL",
    "AdamBatch",
    "ChangeBatch",
    "MomentsBatch",
    "adam_u",
    "compare_rows",
    "disabled_reason",
    "joint_rows",
    "reference_rows",
    "select_swap",
]

logger = logging.getLogger(__name__)

#: Computers use the kernels only when a measurement covers at least this many entries: below
#: it the eager path takes tens of milliseconds, and compiling (seconds, more on a cold cache)
#: would take hundreds of measurements to pay back.
MIN_TOTAL_NUMEL = 1 << 24
#: Smaller tensors take the eager path (Dynamo specialises sizes 0 and 1 instead of sharing
#: the dynamic kernel).
MIN_NUMEL = 2
#: Entries per kernel call: int32 counts stay exact.
_SLICE = 1 << 30
#: Tensors below this size are concatenated per group and computed in one call (a call costs
#: tens of microseconds, as much as the loop over ~10**5 entries); queues flush at _POOL_FLUSH.
POOL_NUMEL = 1 << 16
_POOL_FLUSH = 1 << 20
#: Distinct input signatures compiled per kernel; later ones use the eager path. Dynamo keeps a
#: bounded cache per function and fails (``fullgraph``) beyond it.
_MAX_SIGNATURES = 6


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32).sum(dtype=torch.int32).double()


# --- kernels (traced by torch.compile; plain torch code) ---------------------------------------
# Constants (thresholds, Adam's scale and shift) come packed in one small float32 tensor of static
# size per call: every tensor argument costs guard checks on each call.
def _sums(x: torch.Tensor, ax: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """``[sum, sum_sq, sum_abs, le(t)...]`` of float32 ``x`` (``ax = |x|``), all finite."""
    xd = x.double()
    return [
        xd.sum(),
        (xd * xd).sum(),
        xd.abs().sum(),
        *(_count(ax <= t[i]) for i in range(t.shape[0])),
    ]


def _finite_sums(x: torch.Tensor, ax: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """``[count, sum, sum_sq, sum_abs, le(t)...]`` over the finite entries of float32 ``x``."""
    finite = ax < math.inf  # False for NaN and +-inf
    xd = torch.where(finite, x, 0.0).double()
    return [
        _count(finite),
        xd.sum(),
        (xd * xd).sum(),
        xd.abs().sum(),
        *(_count(finite & (ax <= t[i])) for i in range(t.shape[0])),
    ]


def _moments_fast(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[sum, sum_sq, sum_abs, le(t)..., max_abs]``, valid when every value is finite."""
    x = x.float()
    ax = x.abs()
    return torch.stack([*_sums(x, ax, t), ax.amax().double()])


def _moments_masked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[count, sum, sum_sq, sum_abs, le(t)..., max_abs]`` over the finite values."""
    x = x.float()
    ax = x.abs()
    max_abs = torch.where(ax < math.inf, ax, -math.inf).amax().double()
    return torch.stack([*_finite_sums(x, ax, t), max_abs])


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
            *(_count(au <= c[i]) for i in range(2, c.shape[0])),
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
            _count(finite),
            (ud * ud).sum(),
            ud.abs().sum(),
            (wd * wd).sum(),
            *(_count(finite & (au <= c[i])) for i in range(2, c.shape[0])),
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
        same_bf16 = _count(_bf16_bits(new) == _bf16_bits(old))
    n, o = new.float(), old.float()
    flips = ((n > 0) & (o < 0)) | ((n < 0) & (o > 0))
    return [(od * od).sum(), same_bf16, _count(flips)]


def _change_fast(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[sum, sum_sq, sum_abs, le(t)..., max, min, old_sq, bf16_same, flips]`` of
    ``d = float32(new) - float32(old)``, valid when every ``d`` is finite."""
    d = new.float() - old.float()
    extremes = [d.amax().double(), d.amin().double()]
    return torch.stack([*_sums(d, d.abs(), t), *extremes, *_change_counts(new, old)])


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
    return torch.stack([*_finite_sums(d, ad, t), *extremes, *_change_counts(new, old)])


# The select swap of SelectPatch (see select_swap). t = [threshold before, threshold after]
# (float32), k = [random key, keep limit before, keep limit after] (int64). The hash is
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


def _expm1(x: torch.Tensor) -> torch.Tensor:
    """``expm1`` of float32 ``x`` to a few ulp. Inductor's vectorised CPU ``expm1`` is
    ``exp(x) - 1``, which returns 0 for ``|x| < 6e-8`` and loses all digits the KL lives on; so
    ``|x| < 1/2`` takes the Taylor series to ``x^9/9!`` (remainder below 1e-9 relative) in
    Horner form, and the rest ``exp(x) - 1`` (at most ~2 ulp lost there)."""
    poly = torch.full_like(x, 1.0 / math.factorial(9))
    for k in range(8, 0, -1):
        poly = poly * x + 1.0 / math.factorial(k)
    return torch.where(x.abs() < 0.5, poly * x, torch.exp(x) - 1.0)


def _reference(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``softmax(a)`` (float32) and, in float64, its row sums and the rows' squared norms."""
    e = torch.exp(a - a.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    return p, p.double().sum(-1), (a * a).double().sum(-1)


def _compare(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Row sums of :meth:`~grail.trainer.analysis.divergence.LogitsReference.compare_sums` for
    reference logits ``a``, other logits ``b``, ``p = softmax(a)`` and its row sums ``mass``
    (float64): ``[sum d^2, a.b, a.a, b.b, min dc, p.dc, p.expm1(-dc)]`` (float64, one column per
    row) with ``d = a - b`` and ``dc = d`` centred on its P-mean. Products are float32 like the
    eager path's, sums float64: Inductor accumulates a row in a few vector lanes, whose float32
    error (~1e-6 of a centre of 10) would swamp a KL of 1e-7."""
    d = a - b
    centre = ((p * d).double().sum(-1) / mass).float()
    dc = d - centre[:, None]
    return torch.stack(
        [
            (d * d).double().sum(-1),
            (a * b).double().sum(-1),
            (a * a).double().sum(-1),
            (b * b).double().sum(-1),
            dc.amin(-1).double(),
            (p * dc).double().sum(-1),
            (p * _expm1(-dc)).double().sum(-1),
        ]
    )


# --- compilation --------------------------------------------------------------------------------
_failure: list[str] = []  # the first compiler failure of this process, if any


def worth_it(numel: int) -> bool:
    """Whether a measurement of ``numel`` entries should use the kernels (see
    :data:`MIN_TOTAL_NUMEL`)."""
    return numel >= MIN_TOTAL_NUMEL


def disabled_reason() -> str | None:
    """Why the kernels are off for the rest of the process (a compiler error), else ``None``."""
    return _failure[0] if _failure else None


def constants(values: Sequence[float]) -> torch.Tensor:
    """A packed-constants argument: float32, its size static for the compiler."""
    t = torch.tensor(list(values), dtype=torch.float32)
    torch._dynamo.mark_static(t)
    return t


class _Kernel:
    """A function compiled on first use, with a bounded set of input signatures.

    Its first ``n_data`` arguments are 1-D data tensors (dynamic sizes), the rest packed
    constants from :func:`constants` (static sizes).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        n_data: int,
        probe: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> None:
        self._fn = fn
        self._n_data = n_data
        self._probe = probe
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._signatures: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor | None:
        """The compiled result, or ``None`` where the caller must compute it otherwise.

        Any error here (a graph variant Dynamo compiles on its own, for a guard the signature
        does not cover) turns the kernels off like a failed compile: results never depend on
        the compiler working.
        """
        if not self.ready(*args):
            return None
        try:
            with torch.no_grad():
                return self._compiled(*args)  # type: ignore[misc]
        except Exception as exc:  # a recompile the signature did not foresee, or worse
            _fail(exc)
            return None

    def ready(self, *args: torch.Tensor) -> bool:
        """Whether a call with these arguments' signature will run compiled (compiles now if
        needed); lets a batch queue small tensors knowing the queue will not be refused."""
        if _failure:
            return False
        n = self._n_data
        # what Dynamo guards on besides shapes: thread count, inference mode, dtypes, and the
        # constants' static sizes (grad mode is always off: calls run under no_grad)
        key = (torch.get_num_threads(), torch.is_inference_mode_enabled())
        key += (*(a.dtype for a in args[:n]), *(a.numel() for a in args[n:]))
        if self._probe is not None:  # row-wise kernels: Inductor guards on the row width
            key += (args[0].shape[-1] > _WIDE_ROWS,)
        if key in self._signatures:
            return True
        with self._lock:
            return self._compile_for(key, args)

    def _compile_for(self, key: tuple[object, ...], args: Sequence[torch.Tensor]) -> bool:
        if key in self._signatures:
            return True
        if len(self._signatures) >= _MAX_SIGNATURES:
            return False
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
            # Inductor picks the loop form (parallel or not) from the sizes it first sees, so
            # compile on inputs as large as a typical weight, then check the result once.
            n = self._n_data
            if self._probe is not None:
                probe = self._probe(args)
            else:
                probe = [torch.ones(1 << 20, dtype=a.dtype) for a in args[:n]] + list(args[n:])
            with torch.no_grad():
                out = self._compiled(*probe)
            outs = out if isinstance(out, tuple) else (out,)
            if not all(bool(torch.isfinite(o).all()) for o in outs):
                raise RuntimeError("the compiled kernel returned non-finite values on its probe")
        except Exception as exc:  # any compiler failure means "use the eager path"
            _fail(exc)
            return False
        self._signatures.add(key)
        return True


def _fail(exc: Exception) -> None:
    """Turn the kernels off for the rest of the process, with one warning."""
    if _failure:
        return
    _failure.append(f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    logger.warning(
        "grail-analysis: torch.compile failed (%s); parameter change, gradient and Adam "
        "statistics and sparse-quality swaps and comparisons use the eager path from now on, "
        "several times slower. AnalysisConfig(fused_kernels=False) skips the attempt.",
        _failure[0],
    )


_MOMENTS_FAST = _Kernel(_moments_fast, 1)
_MOMENTS_MASKED = _Kernel(_moments_masked, 1)
_ADAM_FAST = _Kernel(_adam_fast, 4)
_ADAM_MASKED = _Kernel(_adam_masked, 4)
_JOINT_FAST = _Kernel(_joint_fast, 4)
_CHANGE_FAST = _Kernel(_change_fast, 2)
_CHANGE_MASKED = _Kernel(_change_masked, 2)
_NAN_COUNT = _Kernel(_nan_count, 2)


#: Inductor picks another reduction form for rows wider than this and guards on the choice:
#: row-wise kernels are compiled (and counted as a signature) once for each side of it.
_WIDE_ROWS = 4096


def _rows_probe(args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A few rows of the caller's width for each 2-D argument (float64 row sums for 1-D ones):
    the compiled form then suits the real rows, and no guard of the probe fails on them."""
    rows, width = min(args[0].shape[0], 8), args[0].shape[-1]
    return [
        torch.ones(rows, width) if a.dim() == 2 else torch.ones(rows, dtype=torch.float64)
        for a in args
    ]


_COMPARE = _Kernel(_compare, 4, _rows_probe)
_REFERENCE = _Kernel(_reference, 1, _rows_probe)  # type: ignore[arg-type]
_SWAP = {  # (random, count changed) -> kernel
    (False, False): _Kernel(_swap_magnitude, 2),
    (False, True): _Kernel(_swap_magnitude_changed, 2),
    (True, False): _Kernel(_swap_random, 2),
    (True, True): _Kernel(_swap_random_changed, 2),
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
    """Move parameter ``p`` (flat, local) from the mask ``before`` to ``after`` by exchanging
    entries with its snapshot ``s`` where the two masks differ, in one compiled pass:
    :class:`~grail.trainer.analysis.patching.SelectPatch`'s XOR swap, masks included (``|delta|``
    is symmetric in ``p`` and ``s``, so the same call with the specs exchanged undoes it).
    ``offset`` is the global flat position of ``p[0]`` (random bits depend on it).

    Returns int32 ``[entries after drops]`` (and ``[entries changed]`` with ``count_changed``),
    or ``None`` without touching anything where the caller must swap eagerly: other dtypes or
    devices, tensors of more than ``2**30`` entries or crossing a ``2**32`` block of random
    counters, random masks with two seeds, NaN in a half-precision pair, kernels off.
    """
    if p.dtype != s.dtype or p.dtype not in _SWAP_DTYPES or p.numel() > _SLICE:
        return None
    if not _usable(MIN_NUMEL, p, s):
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


def reference_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`_reference` in one compiled call, or ``None`` where the caller computes it
    eagerly (not contiguous float32 CPU rows, or kernels off)."""
    n, v = a.shape
    if n < 2 or v < 2 or n * v >= _SLICE or a.dtype != torch.float32:
        return None
    if a.device.type != "cpu" or not a.is_contiguous():
        return None
    return _REFERENCE(a)  # type: ignore[return-value]


def compare_rows(
    a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, mass: torch.Tensor
) -> torch.Tensor | None:
    """:func:`_compare` in one compiled call: float64 ``[7, rows]``, or ``None`` where the
    caller compares eagerly (not float32 CPU rows of one contiguous shape, or kernels off)."""
    n, v = a.shape
    if n < 2 or v < 2 or n * v >= _SLICE or mass.dtype != torch.float64:
        return None
    for x in (a, b, p):
        if x.shape != (n, v) or x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        if not x.is_contiguous():
            return None
    if mass.shape != (n,) or mass.device.type != "cpu":
        return None
    storages = {x.untyped_storage().data_ptr() for x in (a, b, p, mass)}
    if len(storages) < 4:  # aliased inputs (logits compared with themselves): one more guard
        return None
    return _COMPARE(a, b, p, mass)


def _usable(min_numel: int, *tensors: torch.Tensor) -> bool:
    """CPU, 1-D, contiguous, of one size of at least ``min_numel`` (and 2: Dynamo specialises
    sizes 0 and 1)."""
    n = tensors[0].numel()
    if n < max(min_numel, 2):
        return False
    for t in tensors:  # a plain loop: this runs for every parameter of every measurement
        if t.dim() != 1 or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
            return False
    return True


def _floats(*values: Any) -> bool:
    """Python floats (a bias correction held on a device is not: that run is not on CPU)."""
    return all(isinstance(v, float) for v in values)


def _slices(n: int) -> list[slice]:
    """At most ``_SLICE`` entries each, of equal sizes (no tiny tail)."""
    parts = -(-n // _SLICE)
    size = -(-n // parts)
    return [slice(start, start + size) for start in range(0, n, size)]


# --- batches ------------------------------------------------------------------------------------
Groups = tuple[int, ...]


class _Pool:
    """Small tensors waiting to be concatenated into one kernel call, per key."""

    def __init__(self) -> None:
        self.parts: dict[tuple[Any, ...], list[tuple[torch.Tensor, ...]]] = {}
        self.numel: dict[tuple[Any, ...], int] = {}

    def put(self, key: tuple[Any, ...], tensors: tuple[torch.Tensor, ...]) -> bool:
        """Queue ``tensors``; ``True`` when the key's queue is full and should be flushed."""
        self.parts.setdefault(key, []).append(tensors)
        self.numel[key] = self.numel.get(key, 0) + tensors[0].numel()
        return self.numel[key] >= _POOL_FLUSH

    def take(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """The queued tensors of ``key`` concatenated (one copy of small tensors)."""
        parts = self.parts.pop(key)
        del self.numel[key]
        return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))


class _Batch:
    """What the batches share: one row per kernel call, kept with the call's arguments for the
    rare masked rerun; small tensors queued per pool key and computed in one call, large ones
    in equal slices (all or nothing). Pool keys are ``(groups, meta, ...)`` (``meta``: what a
    row carries besides its groups); a subclass names its kernels (looked up when called: module
    globals), derives the constants of a call from its pool key, and lays out its rows."""

    def __init__(self, min_numel: int | None) -> None:
        self._min = MIN_NUMEL if min_numel is None else min_numel
        self._raw: list[torch.Tensor] = []
        self._inputs: list[tuple[torch.Tensor, ...]] = []  # each row's kernel arguments
        self._groups: list[Groups] = []
        self._meta: list[Any] = []
        self._pool = _Pool()

    def _fast(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
        """The kernel that assumes finite values, and its plain function."""
        raise NotImplementedError

    def _masked(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
        """The kernel that masks non-finite values, and its plain function."""
        raise NotImplementedError

    def _consts(self, pool_key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """The packed constants of the calls for ``pool_key``."""
        raise NotImplementedError

    def _push(
        self, raw: torch.Tensor, args: tuple[torch.Tensor, ...], key: Groups, meta: Any
    ) -> None:
        self._raw.append(raw)
        self._inputs.append(args)
        self._groups.append(key)
        self._meta.append(meta)

    def _take(self, data: tuple[torch.Tensor, ...], pool_key: tuple[Any, ...]) -> bool:
        """Pool ``data`` (small) or compute it now (large); ``False``: the caller goes eager."""
        kernel, consts = self._fast()[0], self._consts(pool_key)
        n = data[0].numel()
        if n < POOL_NUMEL:
            if not kernel.ready(*data, *consts):
                return False
            if self._pool.put(pool_key, data):
                self._flush(pool_key)
            return True
        outs = []
        for sl in _slices(n):
            args = (*(a[sl] for a in data), *consts)
            out = kernel(*args)
            if out is None:
                return False
            outs.append((out, args))
        for out, args in outs:  # only once every slice succeeded
            self._push(out, args, pool_key[0], pool_key[1])
        return True

    def _flush(self, pool_key: tuple[Any, ...]) -> None:
        kernel, fn = self._fast()
        args = (*self._pool.take(pool_key), *self._consts(pool_key))
        out = kernel(*args)
        if out is None:  # the compiler failed after accepting: the same code, eager
            out = fn(*args)
        self._push(out, args, pool_key[0], pool_key[1])

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every pool flushed: the rows stacked and each row's entry count, or ``None``."""
        for pool_key in list(self._pool.parts):
            self._flush(pool_key)
        if not self._raw:
            return None
        counts = torch.tensor([a[0].numel() for a in self._inputs], dtype=torch.float64)
        return torch.stack(self._raw), counts

    def _reruns(self, raw: torch.Tensor, sums: int) -> list[tuple[int, torch.Tensor]]:
        """``(row, masked row)`` for the rows whose first ``sums`` columns are not finite."""
        kernel, fn = self._masked()
        out = []
        for i in (~torch.isfinite(raw[:, :sums]).all(1)).nonzero().flatten().tolist():
            masked = kernel(*self._inputs[i])
            out.append((i, fn(*self._inputs[i]) if masked is None else masked))
        return out


class MomentsBatch(_Batch):
    """Moments of whole 1-D tensors through the compiled kernels, one row per tensor.

    Each row feeds the groups given with its tensor. Tensors below :data:`POOL_NUMEL` entries
    with the same groups and dtype are concatenated into one row (one kernel call for all the
    norms and biases of a layer instead of one each); a tensor of more than ``2**30`` entries
    gets one row per slice of that size. The inputs are referenced (small ones copied) until
    :meth:`rows`, which reruns the rare non-finite ones masked.

    Args:
        thresholds_f32: thresholds of the counts ``|x| <= t``, already as float32 values.
        min_numel: smaller tensors are refused (default :data:`MIN_NUMEL`).
    """

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self.thresholds = constants(thresholds_f32)

    def _fast(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
        return _MOMENTS_FAST, _moments_fast

    def _masked(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
        return _MOMENTS_MASKED, _moments_masked

    def _consts(self, pool_key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        return (self.thresholds,)

    def add(self, x: torch.Tensor, groups: Sequence[int], raw: torch.Tensor | None = None) -> bool:
        """Take ``x`` (its rows feed ``groups``); ``False`` means the caller must go eager.
        ``raw`` is the fast kernel's row when :func:`joint_rows` already computed it."""
        if raw is not None:  # from joint_rows, which checked the inputs
            self._push(raw, (x.detach(), self.thresholds), tuple(groups), None)
            return True
        if not _usable(self._min, x):
            return False
        x = x.detach()
        return self._take((x,), (tuple(groups), None, x.dtype))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, list[Groups]]:
        """``(sums, maxes, groups)``: float64 ``(P, 5 + T)`` and ``(P, 3)`` and the groups of
        each of the ``P`` rows. Of the maxima only ``max |x|`` is computed (``-inf`` where no
        value was finite); ``max`` and ``-min`` are NaN."""
        nt = self.thresholds.numel()
        stacked = self._stacked()
        p = len(self._raw)
        sums = torch.zeros(p, 5 + nt, dtype=torch.float64)
        maxes = torch.full((p, 3), math.nan, dtype=torch.float64)
        if stacked is None:
            return sums, maxes, []
        raw, counts = stacked  # raw: sum, sum_sq, sum_abs, le(t)..., max_abs
        sums[:, 0] = counts
        sums[:, 1:4] = raw[:, :3]
        sums[:, 5:] = raw[:, 3 : 3 + nt]
        maxes[:, 0] = raw[:, 3 + nt]
        for i, masked in self._reruns(raw, 3):
            sums[i, 4] = sums[i, 0] - masked[0]
            sums[i, :4] = masked[:4]
            sums[i, 5:] = masked[4 : 4 + nt]
            maxes[i, 0] = masked[4 + nt]
        return sums, maxes, list(self._groups)


class AdamBatch(_Batch):
    """Statistics of Adam's normalised update through the compiled kernels, one row per tensor.

    Groups, pooling of small tensors (same groups, constants, sign, lr and dtypes), slices and
    the non-finite rerun work as in :class:`MomentsBatch`.

    Args:
        thresholds_f32: thresholds of the counts ``|u| <= t``, already as float32 values.
        min_numel: smaller tensors are refused (default :data:`MIN_NUMEL`).
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

    def _fast(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
        return _ADAM_FAST, _adam_fast

    def _masked(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
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
        if not _usable(self._min, m, v, g, w) or not _floats(scale, shift):
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


class ChangeBatch(_Batch):
    """Parameter-change statistics of ``(new, old)`` pairs through the compiled kernels.

    ``d = float32(new) - float32(old)`` for parameters stored in the same float32, bfloat16 or
    float16 dtype on both sides (a lossless snapshot: the float32 difference is exact, so the
    count of ``|d| <= 0`` is the exact-unchanged count). Rows follow
    :class:`~grail.trainer.analysis.stats.StreamingStats` (maxima ``[max |d|, max, -min]``)
    with the extras ``[sum old^2, exact unchanged, bf16 unchanged, sign flips]``; groups,
    pooling, slices and the non-finite rerun work as in :class:`MomentsBatch`.

    Args:
        thresholds_f32: thresholds of the counts ``|d| <= t``, float32 values; must hold 0.0.
        min_numel: smaller tensors are refused (default :data:`MIN_NUMEL`).
    """

    _DTYPES = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, thresholds_f32: Sequence[float], min_numel: int | None = None) -> None:
        super().__init__(min_numel)
        self.thresholds = constants(thresholds_f32)
        self._zero = list(thresholds_f32).index(0.0)

    def _fast(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
        return _CHANGE_FAST, _change_fast

    def _masked(self) -> tuple[_Kernel, Callable[..., torch.Tensor]]:
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
        if not _usable(self._min, new, old):
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
    usable = _usable(max(adam._min, moments._min), m, v, g, w) and _floats(scale, shift)
    if not usable or not POOL_NUMEL <= n <= _SLICE:
        return None
    args = (*(a.detach() for a in (m, v, g, w)), adam.constants(scale, shift))
    out = _JOINT_FAST(*args, moments.thresholds)
    if out is None:
        return None
    n_adam = 5 + adam.n_thresholds
    return out[:n_adam], out[n_adam:]
