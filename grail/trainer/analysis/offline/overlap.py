r"""``grail-analysis overlap``: do several fine-tunes of one BASE change the same weights?

For each run X, :math:`\Delta_X = W_X - W_{BASE}` (float32, rounded once) and its changed set
:math:`C_X` under one criterion (:mod:`~grail.trainer.analysis.ops.changed`): the stored value
differs (default), :math:`|\Delta_X| > T` (``threshold``), or the bf16-rounded value differs
(``bf16_view``). For every pair (A, B) of runs, in the order given, the document holds per scope
(``global``, each layer, each component, and each layer x component cell):

* ``density_a``, ``density_b``, ``intersection``, ``union``, ``num_params``;
* ``jaccard`` with ``jaccard_random`` = :math:`ab/(a+b-ab)` (independent random sets of the same
  densities) and ``jaccard_lift`` = their ratio;
* ``overlap_a_in_b`` = :math:`|C_A\cap C_B|/|C_A|` with ``_random`` = b, ``overlap_b_in_a`` with a;
* ``sign_agreement``: the fraction of :math:`C_A\cap C_B` where the deltas have the same sign
  (0.5 for unrelated signs; 1 minus it is the TIES conflict rate);
* ``cosine``: :math:`\cos(\Delta_A, \Delta_B)` over all entries (non-finite deltas left out);
* per keep ratio r, ``topk_jaccard_at_keep_{r}`` (and ``_random``, and the intersection and
  union counts): the Jaccard of the two runs' exact global top-k masks of :math:`|\Delta|`,
  :math:`k = \mathrm{round}(rN)`, ties broken by position
  (:func:`~grail.trainer.analysis.ops.budget.exact_budget_drops`).

Each pair also gets a ``contrast``: densities, counts, Jaccard and lift under the contrasting
criterion, the bf16 view (or, when the bf16 view is the criterion, exact changes), so the
report can say whether a shared set survives rounding or is made by it.

Memory: tensors are read one name at a time, BASE and every run together (memory-mapped), and
compared in chunks of :data:`CHUNK` entries, so the peak is about (runs + 1) times the largest
tensor plus some 40 bytes per chunk entry and run, never a checkpoint (measured: 50 MB beyond the
process for BASE and three runs of a 100 MB model whose largest tensor is 5 MB). The top-k masks
need three more reading passes per run before the main one (radix select and tie counts), one
tensor pair at a time.

Decisions where the spec is silent:

* Runs must hold BASE's names and shapes (each is checked as ``diff`` checks a pair); tensors that
  are not floating point in BASE or in some run are skipped with a note; a tensor stored in
  another dtype than BASE's is compared in float32 (exact for bf16/fp16 values), with a note.
* Labels default to the file or directory names; clashing names get the folders that tell them
  apart (``a/ckpt``, ``b/ckpt``), identical paths ``#2``.
* Parameters outside any layer (embeddings, final norm, output head) form the layer ``other``, so
  the per-layer counts partition the global ones exactly, as the components do.
* ``sign_agreement`` compares sign bits; ``cosine`` and ``sign_agreement`` use the stored deltas
  whatever the criterion (the criterion only decides membership of the sets).
* Ratios with a zero denominator (a scope where neither run changed anything) are ``null``.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> paths = [os.path.join(d, f"{n}.safetensors") for n in ("base", "a", "b")]
    >>> for p, w in zip(paths, ([0.0] * 4, [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, -1.0, 0.0])):
    ...     save_file({"w": torch.tensor(w)}, p)
    >>> doc = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=[], hash_files=False))
    >>> g = doc["pairs"][0]["global"]
    >>> doc["pairs"][0]["a"], doc["pairs"][0]["b"], g["intersection"], g["union"], g["jaccard_lift"]
    ('a', 'b', 1, 3, 1.0)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.mask_file import ChangeCriterion
from ..core.naming import ParameterNaming
from ..core.snapshot import ParameterDelta, float32_delta_
from ..keys import format_keep_ratio
from ..ops.budget import exact_budget_drops, subset_delta
from ..ops.changed import changed_flags
from .checkpoint import Checkpoint, CheckpointError, check_labels, number_repeats, open_checkpoint
from .diff import DEFAULT_KEEP_RATIOS, versions
from .inputs import describe, hash_files
from .overlap_counts import (
    Layout,
    TensorCounter,
    Totals,
    contrast_metrics,
    pair_metrics,
    run_summary,
)
from .pair import CheckpointPair, pair_checkpoints
from .stream import OTHER, CellStats

__all__ = ["OverlapOptions", "budget", "checkpoint_labels", "criterion_of", "run_overlap"]

logger = logging.getLogger(__name__)

#: Entries compared at once. Each costs about 40 bytes per run in temporaries; smaller chunks
#: cost only Python overhead (~1 ms a chunk), larger ones resident memory.
CHUNK = 1 << 16
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # dropped from default labels


@dataclass
class OverlapOptions:
    """Arguments of ``grail-analysis overlap`` (see the command's ``--help``)."""

    base: str
    runs: list[str]
    out: str = "."
    labels: list[str] | None = None
    threshold: float | None = None
    bf16_view: bool = False
    keep_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_KEEP_RATIOS))
    per_layer: bool = True
    hash_files: bool = True


def criterion_of(threshold: float | None, bf16_view: bool) -> ChangeCriterion:
    """The changed-set criterion of the options (one of the two at most)."""
    if threshold is not None and bf16_view:
        raise CheckpointError("give --threshold or --bf16-view, not both")
    try:
        if threshold is not None:
            return ChangeCriterion("threshold", threshold)
        return ChangeCriterion("bf16_view") if bf16_view else ChangeCriterion("exact")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def budget(keep: float, total: int) -> int:
    """Entries of a top-``keep`` mask among ``total``: ``round(keep * total)``, at least 1."""
    return max(1, min(total, round(keep * total)))


def checkpoint_labels(paths: list[str], given: list[str] | None = None) -> list[str]:
    """``given`` (checked), else the file stems or directory names made distinct."""
    if given is not None:
        return check_labels(given, len(paths), "runs")
    resolved = [Path(p).resolve() for p in paths]
    distinct = list(dict.fromkeys(resolved))  # the same path twice is told apart by "#2"
    stems = [p.stem if p.suffix in _SUFFIXES else p.name for p in distinct]
    names = list(stems)
    depth = 1
    while len(set(names)) < len(names) and depth < max(len(p.parts) for p in distinct):
        clash = {lab for lab in names if names.count(lab) > 1}
        for i, lab in enumerate(names):
            if lab in clash:
                names[i] = "/".join([*distinct[i].parts[-1 - depth : -1], stems[i]])
        depth += 1
    labels = [names[distinct.index(r)] for r in resolved]
    return number_repeats(labels)


def _contrast(criterion: ChangeCriterion) -> ChangeCriterion:
    return ChangeCriterion("exact" if criterion.kind == "bf16_view" else "bf16_view")


def _pairs(base: Checkpoint, runs: list[Checkpoint], labels: list[str]) -> list[CheckpointPair]:
    out = []
    for ckpt, label in zip(runs, labels, strict=True):
        try:
            out.append(pair_checkpoints(base, ckpt))
        except CheckpointError as err:
            msg = str(err).replace("only in TUNED", f"only in {label}")
            raise CheckpointError(f"{label} ({ckpt.path}) does not match BASE: {msg}") from None
    return out


class _Groups:
    """Totals of the global scope, each layer, each component and each cell."""

    def __init__(self, layout: Layout, naming: ParameterNaming, per_layer: bool) -> None:
        self.layout = layout
        self.naming = naming
        self.per_layer = per_layer
        self.all = Totals.zeros(layout)
        self.layers: dict[str, Totals] = {}
        self.components: dict[str, Totals] = {}
        self.cells: dict[tuple[str, str], Totals] = {}

    def add(self, name: str, t: Totals) -> None:
        self.all += t
        if not self.per_layer:
            return
        layer, comp = self.naming.layer(name) or OTHER, self.naming.component(name)
        for table, key in ((self.layers, layer), (self.components, comp),
                           (self.cells, (layer, comp))):
            table.setdefault(key, Totals.zeros(self.layout))  # type: ignore[arg-type]
            table[key] += t  # type: ignore[index]


def _cells(layout: Layout, groups: _Groups, p: int, rows: list[str], cols: list[str]
           ) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": rows, "components": cols}
    names = ("jaccard_lift", "jaccard", "intersection", "union")
    for n in names:
        out[n] = [[None] * len(cols) for _ in rows]
    for i, layer in enumerate(rows):
        for j, comp in enumerate(cols):
            t = groups.cells.get((layer, comp))
            if t is not None:
                m = pair_metrics(layout, t, p)
                for n in names:
                    out[n][i][j] = m[n]
    return out


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _top_k(pairs: list[CheckpointPair], names: list[str], total: int, keeps: list[float]
           ) -> list[list[Any]]:
    """Per run, one drop function per keep ratio (exact global top-k of |delta|)."""
    if not keeps:
        return [[] for _ in pairs]
    out = []
    for pair in pairs:
        delta = subset_delta(ParameterDelta(pair.old, pair.new), names)
        out.append(exact_budget_drops(delta, [budget(k, total) for k in keeps]))
        pair.base.close()
        pair.tuned.close()
    return out


def _compare(name: str, base: Checkpoint, runs: list[Checkpoint], criterion: ChangeCriterion,
             contrast: ChangeCriterion, drops: list[list[Any]], counter: TensorCounter) -> None:
    """Stream one tensor of BASE and every run through ``counter`` in chunks."""
    b = base.load(name).reshape(-1)
    tensors = [r.load(name).reshape(-1) for r in runs]
    n = b.numel()
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        bc = b[start:stop]
        for i, (t, run_drops) in enumerate(zip(tensors, drops, strict=True)):
            tc = t[start:stop]
            d = float32_delta_(torch.empty(stop - start, dtype=torch.float32), tc, bc)
            bits = d.abs().view(torch.int32)
            out = torch.empty_like(bits)
            topk = [drop(name, start, bits, out) == 0 for drop in run_drops]
            counter.add_run(i, d, changed_flags(criterion, bc, tc, d),
                            changed_flags(contrast, bc, tc, d), topk)
        counter.add_pairs()


def run_overlap(opts: OverlapOptions) -> dict[str, Any]:
    """Compare every pair of runs; returns the content of ``metrics.json`` (module docstring)."""
    start = time.perf_counter()
    if len(opts.runs) < 2:
        raise CheckpointError(f"overlap needs BASE and at least two runs; got {len(opts.runs)} "
                              "run")
    criterion = criterion_of(opts.threshold, opts.bf16_view)
    contrast = _contrast(criterion)
    keeps = sorted(set(opts.keep_ratios))
    bad = [k for k in keeps if not 0.0 < k <= 1.0]
    if bad:
        raise CheckpointError(f"--keep-ratios must be in (0, 1]; got {bad[0]!r}")
    labels = checkpoint_labels(opts.runs, opts.labels)
    base = open_checkpoint(opts.base)
    runs = [open_checkpoint(p) for p in opts.runs]
    pairs = _pairs(base, runs, labels)
    compared = [set(p.names) for p in pairs]
    names = [n for n in base.specs if all(n in c for c in compared)]
    if not names:
        raise CheckpointError("the checkpoints hold no floating-point tensors to compare")
    notes = list(dict.fromkeys(note for p in pairs for note in p.notes))
    upcast = sorted({n for p in pairs for n in p.upcast})
    total = sum(base.specs[n].numel for n in names)
    naming = ParameterNaming(names)
    order = CellStats(naming, thresholds=[0.0])  # the report's row and column order
    layout = Layout(len(runs), [format_keep_ratio(k) for k in keeps])
    groups = _Groups(layout, naming, opts.per_layer)
    with hash_files([base, *runs], opts.hash_files) as hashes:
        t0 = time.perf_counter()
        if keeps:
            logger.info("selecting the exact top-k of %d runs (%d entries each)", len(runs), total)
        drops = _top_k(pairs, names, total, keeps)
        t1 = time.perf_counter()
        logger.info("comparing %d tensors of BASE and %d runs", len(names), len(runs))
        for name in names:
            counter = TensorCounter(layout, torch.device("cpu"))
            _compare(name, base, runs, criterion, contrast, drops, counter)
            groups.add(name, counter.totals())
        t2 = time.perf_counter()
        for ckpt in (base, *runs):
            ckpt.close()
        digests = hashes.result()
    rows = [r for r in order.layers if opts.per_layer]
    cols = [c for c in order.components if opts.per_layer]
    out_pairs = []
    for p, (a, b) in enumerate(layout.pairs):
        out_pairs.append({
            "a": labels[a],
            "b": labels[b],
            "global": pair_metrics(layout, groups.all, p),
            "contrast": {"criterion": contrast.to_dict(),
                         **contrast_metrics(layout, groups.all, p)},
            "layers": {k: pair_metrics(layout, groups.layers[k], p) for k in rows},
            "components": {k: pair_metrics(layout, groups.components[k], p) for k in cols},
            "cells": _cells(layout, groups, p, rows, cols) if opts.per_layer else None,
        })
    col = layout.run_col("nonfinite")
    nonfinite = [lab for i, lab in enumerate(labels) if groups.all.runs[i][col]]
    if nonfinite:
        notes.append(f"non-finite deltas in {', '.join(nonfinite)}: they count as changed and "
                     "are left out of cosine")
    doc = {
        "kind": "grail-analysis overlap",
        "criterion": criterion.to_dict(),
        "keep_ratios": keeps,
        "runs": {
            lab: {"path": path, **run_summary(layout, groups.all, i)}
            for i, (lab, path) in enumerate(zip(labels, opts.runs, strict=True))
        },
        "pairs": out_pairs,
        "layers": rows,
        "components": cols,
        "compared": {"tensors": len(names), "num_params": total,
                     "skipped": sorted({s for p in pairs for s in p.skipped}),
                     "compared_in_float32": upcast},
        "notes": notes,
        "arguments": asdict(opts),
        "versions": versions(),
        "inputs": {"base": describe(base, digests, opts.base),
                   "runs": {lab: describe(r, digests, p)
                            for lab, r, p in zip(labels, runs, opts.runs, strict=True)}},
        "timing": {"top_k_seconds": t1 - t0, "stream_seconds": t2 - t1,
                   "total_seconds": time.perf_counter() - start},
    }
    return _finite(doc)
