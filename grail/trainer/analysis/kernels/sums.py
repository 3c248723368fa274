"""Sum and count columns shared by the compiled reductions (traced by ``torch.compile``)."""

from __future__ import annotations

import math

import torch

__all__ = ["count", "finite_sums", "sums"]


def count(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32).sum(dtype=torch.int32).double()


# --- kernels (traced by torch.compile; plain torch code) ---------------------------------------
# Constants (thresholds, Adam's scale and shift) come packed in one small float32 tensor of static
# size per call: every tensor argument costs guard checks on each call.
def sums(x: torch.Tensor, ax: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """``[sum, sum_sq, sum_abs, le(t)...]`` of float32 ``x`` (``ax = |x|``), all finite."""
    xd = x.double()
    return [
        xd.sum(),
        (xd * xd).sum(),
        xd.abs().sum(),
        *(count(ax <= t[i]) for i in range(t.shape[0])),
    ]


def finite_sums(x: torch.Tensor, ax: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """``[count, sum, sum_sq, sum_abs, le(t)...]`` over the finite entries of float32 ``x``."""
    finite = ax < math.inf  # False for NaN and +-inf
    xd = torch.where(finite, x, 0.0).double()
    return [
        count(finite),
        xd.sum(),
        (xd * xd).sum(),
        xd.abs().sum(),
        *(count(finite & (ax <= t[i])) for i in range(t.shape[0])),
    ]

