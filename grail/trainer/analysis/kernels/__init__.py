r"""Single-pass reductions compiled with ``torch.compile``, for the statistics read on every step.

The streaming path of :mod:`~grail.trainer.analysis.core.stats` applies a dozen eager ops to each
cache-sized chunk. On a CPU each op is a separate loop with its own dispatch, so the gradient and
Adam statistics cost many passes over the data. The kernels here compute every sum, count and
extreme of a whole tensor in one loop that ``torch.compile`` (Inductor) generates, vectorises and
parallelises; they read each input once and allocate nothing of the tensor's size.

Two batches collect one row per tensor, in the columns of
:class:`~grail.trainer.analysis.core.stats.StreamingStats` (fed at the end through
:meth:`~grail.trainer.analysis.core.stats.StreamingStats.accumulate_rows`). Each kernel declares
its raw row by field names next to it (``FAST``, ``MASKED``; see
:mod:`~grail.trainer.analysis.core.layout`) and builds it from named values, so ``rows()``
translates raw rows into the statistics' columns by name and returns the extra sums by name.
Each computes what its computer reports and nothing more, because on a CPU every extra reduction
in the loop costs about as much as reading the data again:

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
:mod:`~grail.trainer.analysis.patching.swaps`.

Each tensor first goes through a kernel that assumes every value is finite. Its float64 sums are
then finite exactly when that holds (a float64 sum of finite float32 values cannot overflow); when
they are not, a second kernel that masks the non-finite entries runs on that tensor alone.

Exactness: sums are accumulated in float64 inside the loop (more accurate than the eager path's
float32 chunk sums), counts in int32 over slices of at most ``2**30`` entries, so they are exact.
Inputs of any floating dtype are upcast to float32 in registers, as the eager path copies them.
Threshold counts compare float32 values with the float32 thresholds the caller passes (see
:func:`~grail.trainer.analysis.core.stats.f32_floor`).

When the kernels are used (:mod:`.policy`): for CPU tensors of at least ``settings.min_numel``
entries, in measurements of at least ``settings.min_total_numel`` entries (models of ~17M
parameters and up; a smaller model's statistics take milliseconds eagerly), while
``torch.compile`` works in this process, and - in the default mode ``"auto"`` - once a family's
measured eager cost says compiling pays for itself (``True`` compiles at the first measurement,
``False`` never). Computers ask :func:`use` per measurement and time the replaced work with
:func:`timed`. The first call of each input signature (dtypes, number of thresholds, thread
count) compiles for a few seconds; shapes are dynamic, so every tensor size reuses it (a
compiled call costs tens of microseconds, less than the eager path for any size). If compiling
fails (no C++ compiler, an unsupported platform) a warning is logged once and the callers use
the eager path from then on. Accelerators keep the eager path, where each op is already one
bandwidth-bound kernel.

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

from .adam import AdamBatch, adam_u, joint_rows
from .change import ChangeBatch
from .moments import MomentsBatch
from .policy import (
    MODES,
    KernelSettings,
    Use,
    disabled_reason,
    report,
    settings,
    timed,
    use,
    worth_it,
)
from .rows import compare_rows, reference_rows
from .swap import select_swap

__all__ = [
    "MODES",
    "AdamBatch",
    "ChangeBatch",
    "KernelSettings",
    "MomentsBatch",
    "Use",
    "adam_u",
    "compare_rows",
    "disabled_reason",
    "joint_rows",
    "reference_rows",
    "report",
    "select_swap",
    "settings",
    "timed",
    "use",
    "worth_it",
]
