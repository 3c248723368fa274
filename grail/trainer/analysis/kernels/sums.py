"""Sum and count columns shared by the compiled reductions (traced by ``torch.compile``).

Each returns its values by column name (:mod:`~grail.trainer.analysis.core.layout`); a kernel
puts them into its declared row with :func:`~grail.trainer.analysis.core.layout.stack_row`.
"""

from __future__ import annotations

import math

import torch

from ..core.layout import LE

__all__ = ["count", "finite_sums", "sums"]

Named = dict[str, "torch.Tensor | list[torch.Tensor]"]


def count(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32).sum(dtype=torch.int32).double()


# --- kernels (traced by torch.compile; plain torch code) ---------------------------------------
# Constants (thresholds, Adam's scale and shift) come packed in one small float32 tensor of static
# size per call: every tensor argument costs guard checks on each call.
def sums(x: torch.Tensor, ax: torch.Tensor, t: torch.Tensor) -> Named:
    """``sum, sum_sq, sum_abs, le`` (one count per threshold) of float32 ``x`` (``ax = |x|``),
    all finite."""
    xd = x.double()
    return {
        "sum": xd.sum(),
        "sum_sq": (xd * xd).sum(),
        "sum_abs": xd.abs().sum(),
        LE: [count(ax <= t[i]) for i in range(t.shape[0])],
    }


def finite_sums(x: torch.Tensor, ax: torch.Tensor, t: torch.Tensor) -> Named:
    """``count, sum, sum_sq, sum_abs, le`` over the finite entries of float32 ``x``."""
    finite = ax < math.inf  # False for NaN and +-inf
    xd = torch.where(finite, x, 0.0).double()
    return {
        "count": count(finite),
        "sum": xd.sum(),
        "sum_sq": (xd * xd).sum(),
        "sum_abs": xd.abs().sum(),
        LE: [count(finite & (ax <= t[i])) for i in range(t.shape[0])],
    }
