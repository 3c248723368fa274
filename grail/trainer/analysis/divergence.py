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

import torch

__all__ = ["LogitsReference", "compare_logits", "kl_divergence"]

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

    def compare(self, other: torch.Tensor) -> dict[str, float]:
        """``kl, cosine, mse, top1_agree, nonfinite_rows`` of ``other`` against the reference."""
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
        if rows == 0:
            nan = math.nan
            return {
                "kl": nan,
                "cosine": nan,
                "mse": nan,
                "top1_agree": nan,
                "nonfinite_rows": nonfinite,
            }
        return {
            "kl": kl / rows,
            "cosine": cos / rows,
            "mse": sq / (rows * v),
            "top1_agree": agree / rows,
            "nonfinite_rows": nonfinite,
        }


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """One-off :meth:`LogitsReference.compare` (``reference`` plays P in the KL)."""
    return LogitsReference(reference).compare(other)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), clamped at 0 per row."""
    return compare_logits(p_logits, q_logits)["kl"]
