r"""The counts behind ``grail-analysis overlap``: per chunk on the device, per tensor on the host.

For R runs compared with one BASE, every chunk of every tensor adds to named columns (no
positional layout):

* per run X: ``changed`` :math:`|C_X|`, ``contrast`` (the changed set under the contrasting
  criterion, see :mod:`.overlap`), ``nonfinite`` (NaN/Inf deltas), ``topk/{keep}`` (entries of
  the exact global top-k mask that fall here), and the float64 ``sumsq`` :math:`\sum\Delta_X^2`
  over finite deltas;
* per pair (A, B): ``intersection`` :math:`|C_A \cap C_B|`, ``same_sign`` (entries of the
  intersection where :math:`\Delta_A` and :math:`\Delta_B` have the same sign bit),
  ``contrast``, ``topk/{keep}`` intersections, and the float64 ``dot``
  :math:`\sum \Delta_A\Delta_B` over entries where both deltas are finite.

:class:`TensorCounter` takes a chunk run by run (:meth:`~TensorCounter.add_run`, then
:meth:`~TensorCounter.add_pairs`, so only what the pairs need is held: about 7 bytes an entry per
run plus one per keep ratio), keeps a tensor's counts on the compute device (no synchronisation
per chunk) and hands them to the host once per tensor as a :class:`Totals`: Python integers, so the
counts of layers, components and cells add up exactly to the global ones. :func:`pair_metrics`
turns the totals of a scope into the metrics of one pair, :func:`run_summary` into those of one
run.

Example:
    >>> import torch
    >>> layout = Layout(runs=2, keep_labels=[])
    >>> counter = TensorCounter(layout, torch.device("cpu"))
    >>> d = [torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 0.0, 0.0])]
    >>> changed = [x != 0 for x in d]
    >>> for i in range(2):
    ...     counter.add_run(i, d[i], changed[i], changed[i], [])
    >>> counter.add_pairs()
    >>> t = counter.totals()
    >>> m = pair_metrics(layout, t, 0)
    >>> m["intersection"], m["union"], m["sign_agreement"], m["jaccard"]
    (2, 3, 0.5, 0.6666666666666666)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch

from ..ops.changed import set_overlap

__all__ = ["Layout", "TensorCounter", "Totals", "contrast_metrics", "pair_metrics", "run_summary"]


class Layout:
    """The named count columns of R runs and their pairs (module docstring)."""

    def __init__(self, runs: int, keep_labels: Sequence[str]) -> None:
        self.runs = runs
        self.keep_labels = list(keep_labels)
        self.pairs = list(combinations(range(runs), 2))
        topk = [f"topk/{k}" for k in self.keep_labels]
        self.run_columns = ["changed", "contrast", "nonfinite", *topk]
        self.pair_columns = ["intersection", "same_sign", "contrast", *topk]

    def run_col(self, name: str) -> int:
        return self.run_columns.index(name)

    def pair_col(self, name: str) -> int:
        return self.pair_columns.index(name)


@dataclass
class Totals:
    """Counts (Python ints) and float64 sums of one scope; ``+=`` merges two scopes."""

    numel: int
    runs: list[list[int]]
    sumsq: list[float]
    pairs: list[list[int]]
    dot: list[float]
    tensors: int = 0

    @classmethod
    def zeros(cls, layout: Layout) -> Totals:
        return cls(
            numel=0,
            runs=[[0] * len(layout.run_columns) for _ in range(layout.runs)],
            sumsq=[0.0] * layout.runs,
            pairs=[[0] * len(layout.pair_columns) for _ in layout.pairs],
            dot=[0.0] * len(layout.pairs),
        )

    def __iadd__(self, other: Totals) -> Totals:
        self.numel += other.numel
        self.tensors += other.tensors
        for mine, theirs in zip(self.runs + self.pairs, other.runs + other.pairs, strict=True):
            for k, v in enumerate(theirs):
                mine[k] += v
        self.sumsq = [a + b for a, b in zip(self.sumsq, other.sumsq, strict=True)]
        self.dot = [a + b for a, b in zip(self.dot, other.dot, strict=True)]
        return self


@dataclass
class TensorCounter:
    """Accumulates the chunks of one tensor on ``device``; :meth:`totals` reads them once."""

    layout: Layout
    device: torch.device
    numel: int = 0
    _runs: torch.Tensor = field(init=False)
    _pairs: torch.Tensor = field(init=False)
    _sums: torch.Tensor = field(init=False)
    _held: dict[int, tuple[Any, ...]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        lay = self.layout
        self._runs = torch.zeros(lay.runs, len(lay.run_columns), dtype=torch.int64,
                                 device=self.device)
        self._pairs = torch.zeros(len(lay.pairs), len(lay.pair_columns), dtype=torch.int64,
                                  device=self.device)
        self._sums = torch.zeros(lay.runs + len(lay.pairs), dtype=torch.float64,
                                 device=self.device)

    def add_run(
        self,
        i: int,
        delta: torch.Tensor,
        changed: torch.Tensor,
        contrast: torch.Tensor,
        topk: Sequence[torch.Tensor],
    ) -> None:
        """Run ``i``'s part of one chunk: its float32 delta, changed and contrast flags and one
        kept-flag tensor per keep ratio. What the pairs need is held until :meth:`add_pairs`."""
        finite = torch.isfinite(delta)
        clean = delta.masked_fill(~finite, 0.0)  # non-finite deltas add to no sum or product
        self._runs[i] += torch.stack([
            changed.sum(dtype=torch.int64),
            contrast.sum(dtype=torch.int64),
            delta.numel() - finite.sum(dtype=torch.int64),
            *[k.sum(dtype=torch.int64) for k in topk],
        ])
        wide = clean.double()
        self._sums[i] += torch.dot(wide, wide)
        self._held[i] = (changed, contrast, list(topk), torch.signbit(delta), clean)

    def add_pairs(self) -> None:
        """Close the chunk: the pair counts of the runs added since the last call."""
        if len(self._held) != self.layout.runs:
            raise RuntimeError(f"add_pairs after {len(self._held)} of {self.layout.runs} runs")
        held = self._held
        self.numel += held[0][0].numel()
        rows, dots = [], []
        for a, b in self.layout.pairs:
            ca, xa, ka, sa, da = held[a]
            cb, xb, kb, sb, db = held[b]
            both = ca & cb
            rows.append(torch.stack([
                both.sum(dtype=torch.int64),
                (both & (sa == sb)).sum(dtype=torch.int64),
                (xa & xb).sum(dtype=torch.int64),
                *[(u & v).sum(dtype=torch.int64) for u, v in zip(ka, kb, strict=True)],
            ]))
            dots.append(torch.dot(da.double(), db.double()))
        if rows:
            self._pairs += torch.stack(rows)
            self._sums[self.layout.runs :] += torch.stack(dots)
        self._held = {}

    def totals(self) -> Totals:
        """The tensor's counts on the host (one synchronisation)."""
        sums = self._sums.tolist()
        r = self.layout.runs
        return Totals(numel=self.numel, runs=self._runs.tolist(), sumsq=sums[:r],
                      pairs=self._pairs.tolist(), dot=sums[r:], tensors=1)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def pair_metrics(layout: Layout, t: Totals, p: int) -> dict[str, Any]:
    """The metrics of pair ``p`` (``layout.pairs[p]``) over the scope ``t``.

    ``set_overlap`` of the changed sets plus ``num_params``, ``sign_agreement`` (same sign bit
    over the intersection), ``cosine`` of the deltas over all entries (non-finite ones left out),
    and per keep ratio ``topk_jaccard_at_keep_{r}`` with its ``_random`` value and the
    ``topk_intersection_at_keep_{r}`` / ``topk_union_at_keep_{r}`` counts.
    """
    a, b = layout.pairs[p]
    ra, rb, pr = t.runs[a], t.runs[b], t.pairs[p]
    ch = layout.run_col("changed")
    out: dict[str, Any] = {"num_params": t.numel}
    out.update(set_overlap(t.numel, ra[ch], rb[ch], pr[layout.pair_col("intersection")]))
    out["sign_agreement"] = _ratio(pr[layout.pair_col("same_sign")], out["intersection"])
    out["cosine"] = _ratio(t.dot[p], math.sqrt(t.sumsq[a] * t.sumsq[b]))
    for label in layout.keep_labels:
        col = f"topk/{label}"
        s = set_overlap(t.numel, ra[layout.run_col(col)], rb[layout.run_col(col)],
                        pr[layout.pair_col(col)])
        out[f"topk_jaccard_at_{label}"] = s["jaccard"]
        out[f"topk_jaccard_at_{label}_random"] = s["jaccard_random"]
        out[f"topk_intersection_at_{label}"] = s["intersection"]
        out[f"topk_union_at_{label}"] = s["union"]
    return out


def contrast_metrics(layout: Layout, t: Totals, p: int) -> dict[str, Any]:
    """Densities, counts, Jaccard, its random value and lift of pair ``p`` under the
    contrasting criterion."""
    a, b = layout.pairs[p]
    col = layout.run_col("contrast")
    inter = t.pairs[p][layout.pair_col("contrast")]
    s = set_overlap(t.numel, t.runs[a][col], t.runs[b][col], inter)
    keep = ("density_a", "density_b", "intersection", "union", "jaccard", "jaccard_random",
            "jaccard_lift")
    return {k: s[k] for k in keep}


def run_summary(layout: Layout, t: Totals, i: int) -> dict[str, Any]:
    """``density``, ``changed``, ``num_params``, ``nonfinite``, ``norm_l2`` and
    ``contrast_density`` of run ``i`` over the scope ``t``."""
    r = t.runs[i]
    return {
        "density": _ratio(r[layout.run_col("changed")], t.numel),
        "changed": r[layout.run_col("changed")],
        "num_params": t.numel,
        "nonfinite": r[layout.run_col("nonfinite")],
        "norm_l2": math.sqrt(t.sumsq[i]),
        "contrast_density": _ratio(r[layout.run_col("contrast")], t.numel),
    }
