r"""How different are two sets of logits: pure tensor functions with exact definitions.

For logits :math:`a, b \in \mathbb{R}^{N \times V}` (one row per compared position, already
restricted to unmasked tokens) and :math:`P = \mathrm{softmax}(a)`, :math:`Q = \mathrm{softmax}(b)`:

* ``kl``: :math:`\frac{1}{N}\sum_i \max(0, \sum_v P_{iv}(\log P_{iv} - \log Q_{iv}))`, from
  ``log_softmax`` in float32 (the clamp removes rounding noise around an exact 0);
* ``cosine``: :math:`\frac{1}{N}\sum_i \frac{a_i \cdot b_i}{\lVert a_i\rVert\lVert b_i\rVert}`;
* ``mse``: :math:`\frac{1}{NV}\sum_{i,v}(a_{iv} - b_{iv})^2`;
* ``top1_agree``: fraction of rows with :math:`\arg\max a_i = \arg\max b_i`.

Rows where either side has a non-finite logit are excluded and counted (``nonfinite_rows``); with
no finite row left every value is NaN, never a reassuring 1.0. Work is done in row blocks so the
temporaries stay small when the vocabulary is large.

Example:
    >>> import torch
    >>> a = torch.tensor([[2.0, 0.0, -1.0]])
    >>> r = LogitsReference(a).compare(a)
    >>> r["kl"], r["cosine"], r["mse"], r["top1_agree"]
    (0.0, 1.0, 0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .distributed import all_reduce_

__all__ = ["Comparisons", "LogitsReference", "compare_logits", "kl_divergence", "means"]

_BLOCK_ELEMENTS = 1 << 18  # logits per row block (1 MiB of float32)


class LogitsReference:
    """Logits of the full update, with what every comparison reuses computed once."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits.float()
        self.finite = torch.isfinite(self.logits).all(dim=-1)
        self.logp = torch.log_softmax(self.logits, dim=-1)
        # Squared norms by the same kernel as the dot products: identical rows give a cosine of
        # exactly 1, and the error stays ~1e-7 (float32 vector_norm errs by ~1e-6 at 150k
        # classes, a large part of the informative 1 - cosine).
        self.norm = torch.linalg.vecdot(self.logits, self.logits).double()
        self.top1 = self.logits.argmax(dim=-1)

    def compare_sums(self, other: torch.Tensor) -> list[float]:
        """Per-row sums ``[kl, cosine, squared error, top-1 agreements, rows, nonfinite rows]``.

        Sums, not means, so that comparisons over several batches (ranks) combine exactly;
        :func:`means` turns them into :meth:`compare`'s numbers.
        """
        other = other.float().to(self.logits.device)
        if other.shape != self.logits.shape:
            raise ValueError(
                f"logits shapes differ: {tuple(self.logits.shape)} vs {tuple(other.shape)}"
            )
        n, v = other.shape
        step = max(1, _BLOCK_ELEMENTS // max(v, 1))
        kl = cos = sq = agree = 0.0
        rows = 0
        nonfinite = 0
        for s in range(0, n, step):
            a, b = self.logits[s : s + step], other[s : s + step]
            ok = self.finite[s : s + step] & torch.isfinite(b).all(dim=-1)
            bad = int((~ok).sum())
            nonfinite += bad
            logp = self.logp[s : s + step]
            norm_a = self.norm[s : s + step]
            top_a = self.top1[s : s + step]
            if bad:
                a, b, logp, norm_a, top_a = a[ok], b[ok], logp[ok], norm_a[ok], top_a[ok]
            if a.shape[0] == 0:
                continue
            logq = torch.log_softmax(b, dim=-1)
            kl_rows = torch.linalg.vecdot(logp.exp(), logp - logq).clamp_(min=0.0)
            kl += float(kl_rows.double().sum())
            dots = torch.linalg.vecdot(a, b)
            norm_b = torch.linalg.vecdot(b, b).double()  # squared, like norm_a
            denom = (norm_a * norm_b).sqrt()
            both_zero = (norm_a == 0) & (norm_b == 0)  # identical zero vectors: similarity 1
            cos_rows = torch.where(denom > 0, dots.double() / denom, both_zero.to(denom.dtype))
            cos += float(cos_rows.double().sum())
            diff = a - b
            sq += float(torch.linalg.vecdot(diff, diff).double().sum())
            agree += float((b.argmax(dim=-1) == top_a).sum())
            rows += a.shape[0]
        return [kl, cos, sq / max(v, 1), agree, float(rows), float(nonfinite)]

    def compare(self, other: torch.Tensor) -> dict[str, float]:
        """``kl, cosine, mse, top1_agree, nonfinite_rows`` of ``other`` against the reference."""
        return means(self.compare_sums(other))


def means(sums: Sequence[float]) -> dict[str, float]:
    """Means from (possibly summed over batches) :meth:`LogitsReference.compare_sums` values;
    NaN when no finite row was compared."""
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

    >>> ref = LogitsReference(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> c = Comparisons(ref)
    >>> c.add("same", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> c.results()["same"]["kl"], c.reference_nonfinite
    (0.0, 0)
    """

    def __init__(self, reference: LogitsReference) -> None:
        self.reference = reference
        self._labels: list[str] = []  # after results(): reference counts summed over ranks
        self._sums: list[list[float]] = []
        self.reference_nonfinite = int((~reference.finite).sum())
        self.reference_rows = int(reference.logits.shape[0])

    def add(self, label: str, logits: torch.Tensor) -> None:
        self._labels.append(label)
        self._sums.append(self.reference.compare_sums(logits))

    def results(self) -> dict[str, dict[str, float]]:
        flat = [x for row in self._sums for x in row]
        flat += [float(self.reference_nonfinite), float(self.reference_rows)]
        total = all_reduce_(torch.tensor(flat, dtype=torch.float64), "sum").tolist()
        self.reference_nonfinite, self.reference_rows = int(total[-2]), int(total[-1])
        width = len(self._sums[0]) if self._sums else 0
        return {
            label: means(total[i * width : (i + 1) * width])
            for i, label in enumerate(self._labels)
        }


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """One-off :meth:`LogitsReference.compare` (``reference`` plays P in the KL)."""
    return LogitsReference(reference).compare(other)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), clamped at 0 per row."""
    return compare_logits(p_logits, q_logits)["kl"]
