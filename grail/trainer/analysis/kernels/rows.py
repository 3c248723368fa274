"""Row-wise reductions of logits for the forward-pass comparisons: softmax with its row sums,
and the seven row sums of a comparison, in float64 (see
:class:`~grail.trainer.analysis.ops.divergence.LogitsReference`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.layout import stack_row
from .policy import Kernel, settings

__all__ = ["COMPARE", "compare_rows", "reference_rows"]

#: The rows of :func:`_compare`, one per compared logits row: ``sq`` = sum d^2, ``dots`` = a.b,
#: ``norm_a`` = a.a, ``norm_b`` = b.b, ``min_diff`` = min dc, ``pd`` = p.dc and ``pe`` =
#: p.expm1(-dc).
COMPARE = ("sq", "dots", "norm_a", "norm_b", "min_diff", "pd", "pe")


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
    """Row sums of :meth:`~grail.trainer.analysis.ops.divergence.LogitsReference.compare_sums` for
    reference logits ``a``, other logits ``b``, ``p = softmax(a)`` and its row sums ``mass``
    (float64): the :data:`COMPARE` rows (float64, one column per compared row) with
    ``d = a - b`` and ``dc = d`` centred on its P-mean. Products are float32 like the eager
    path's, sums float64: Inductor accumulates a row in a few vector lanes, whose float32 error
    (~1e-6 of a centre of 10) would swamp a KL of 1e-7."""
    d = a - b
    centre = ((p * d).double().sum(-1) / mass).float()
    dc = d - centre[:, None]
    return stack_row(
        COMPARE,
        {
            "sq": (d * d).double().sum(-1),
            "dots": (a * b).double().sum(-1),
            "norm_a": (a * a).double().sum(-1),
            "norm_b": (b * b).double().sum(-1),
            "min_diff": dc.amin(-1).double(),
            "pd": (p * dc).double().sum(-1),
            "pe": (p * _expm1(-dc)).double().sum(-1),
        },
    )



def _rows_probe(args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A few rows of the caller's width for each 2-D argument (float64 row sums for 1-D ones):
    the compiled form then suits the real rows, and no guard of the probe fails on them."""
    rows, width = min(args[0].shape[0], 8), args[0].shape[-1]
    return [
        torch.ones(rows, width) if a.dim() == 2 else torch.ones(rows, dtype=torch.float64)
        for a in args
    ]


_COMPARE = Kernel(_compare, 4, _rows_probe)
_REFERENCE = Kernel(_reference, 1, _rows_probe)  # type: ignore[arg-type]


def reference_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`_reference` in one compiled call, or ``None`` where the caller computes it
    eagerly (not contiguous float32 CPU rows, or kernels off)."""
    n, v = a.shape
    if n < 2 or v < 2 or n * v >= settings.slice_numel or a.dtype != torch.float32:
        return None
    if a.device.type != "cpu" or not a.is_contiguous():
        return None
    return _REFERENCE(a)  # type: ignore[return-value]


def compare_rows(
    a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, mass: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """:func:`_compare` in one compiled call: the :data:`COMPARE` row sums by name (float64,
    one value per row), or ``None`` where the caller compares eagerly (not float32 CPU rows of
    one contiguous shape, or kernels off)."""
    n, v = a.shape
    if n < 2 or v < 2 or n * v >= settings.slice_numel or mass.dtype != torch.float64:
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
    out = _COMPARE(a, b, p, mass)
    return None if out is None else dict(zip(COMPARE, out.unbind(0), strict=True))

