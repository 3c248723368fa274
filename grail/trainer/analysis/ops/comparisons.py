"""Comparisons of logits combined exactly: per-row sums over batches and ranks, then means.

:meth:`~.divergence.LogitsReference.compare_sums` returns sums, not means, so that comparisons
over several batches (ranks) combine exactly; :func:`means` turns such sums into the numbers of
:meth:`~.divergence.LogitsReference.compare`, and :class:`Comparisons` collects several
comparisons against one reference and sums them over ranks in one reduction (the only
collective of the divergences).

Example:
    >>> means([0.5, 2.0, 4.0, 1.0, 2.0, 0.0])
    {'kl': 0.25, 'cosine': 1.0, 'mse': 2.0, 'top1_agree': 0.5, 'nonfinite_rows': 0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..core.distributed import all_reduce_

if TYPE_CHECKING:
    from .divergence import LogitsReference

__all__ = ["Comparisons", "means"]


def means(sums: Sequence[float]) -> dict[str, float]:
    """Means from (possibly summed over batches)
    :meth:`~.divergence.LogitsReference.compare_sums` values; NaN when no finite row was
    compared."""
    kl, cos, sq, agree, rows, nonfinite = sums
    nan = math.nan
    return {
        "kl": kl / rows if rows else nan,
        "cosine": cos / rows if rows else nan,
        "mse": sq / rows if rows else nan,
        "top1_agree": agree / rows if rows else nan,
        "nonfinite_rows": int(nonfinite),
    }


class Comparisons:
    """Several comparisons against one reference, combined over ranks with one reduction.

    Each rank compares its own batch; :meth:`results` sums the per-row sums over ranks, so the
    means are token-weighted over every rank's batch and identical on every rank (one process:
    the batch's own means).

    >>> from grail.trainer.analysis.ops.divergence import LogitsReference
    >>> ref = LogitsReference(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> c = Comparisons(ref)
    >>> c.add("same", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> c.results()["same"]["kl"], c.reference_nonfinite
    (0.0, 0)
    """

    def __init__(
        self, reference: LogitsReference, kl_only: bool = False, top1: bool = False
    ) -> None:
        self.reference = reference
        self.kl_only = kl_only  # LogitsReference.kl_sums: the other means are NaN ...
        self.top1 = top1  # ... except the top-1 agreement, with top1
        self._labels: list[str] = []  # after results(): reference counts summed over ranks
        self._sums: list[list[float]] = []
        self.reference_nonfinite = int((~reference.finite).sum())
        self.reference_rows = int(reference.logits.shape[0])

    def add(self, label: str, logits: torch.Tensor, reverse: str | None = None) -> None:
        """Compare ``logits`` with the reference under ``label``; with ``reverse`` (KL-only
        comparisons), also KL(``logits`` || reference) under that label, from the same pass
        (:meth:`~.divergence.LogitsReference.kl_sums_both`; its ``top1_agree`` is NaN).
        A label already used raises ``ValueError`` before anything is compared (its results
        would overwrite the other's)."""
        new = [label] if reverse is None else [label, reverse]
        for i, name in enumerate(new):
            if name in self._labels or name in new[:i]:
                raise ValueError(f"comparison label {name!r} is used twice: give each its own")
        if reverse is not None:
            if not self.kl_only:
                raise ValueError("a reverse KL is computed by KL-only comparisons (kl_only=True)")
            sums = list(self.reference.kl_sums_both(logits, self.top1))
        elif self.kl_only:
            sums = [self.reference.kl_sums(logits, self.top1)]
        else:
            sums = [self.reference.compare_sums(logits)]
        self._labels += new  # after the comparison: a failed one adds nothing
        self._sums += sums

    def results(self) -> dict[str, dict[str, float]]:
        flat = [x for row in self._sums for x in row]
        flat += [float(self.reference_nonfinite), float(self.reference_rows)]
        total = all_reduce_(torch.tensor(flat, dtype=torch.float64), "sum").tolist()
        self.reference_nonfinite, self.reference_rows = int(total[-2]), int(total[-1])
        width = len(self._sums[0]) if self._sums else 0
        return {
            label: means(total[i * width : (i + 1) * width]) for i, label in enumerate(self._labels)
        }
