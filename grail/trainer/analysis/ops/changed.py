r"""Changed sets of an update and how much two of them overlap, against random sets.

**Changed set.** For a run with :math:`\Delta = W_{tuned} - W_{base}` (float32, rounded once),
:func:`changed_flags` marks the entries of a chunk that changed under a
:class:`~grail.trainer.analysis.core.mask_file.ChangeCriterion`:

* ``exact``: the stored value differs, i.e. :math:`|\Delta| > 0` (+0 and -0 are equal; NaN counts
  as changed), as ``param_change/exact_unchanged_ratio`` counts;
* ``threshold`` T: :math:`|\Delta| > T`, T applied exactly to the float32 delta (NaN changed);
* ``bf16_view``: the bfloat16-rounded values differ bit for bit, as
  ``param_change/bf16_unchanged_ratio`` counts (so +0 to -0 is a change, and NaN to NaN is not).

``keep_ratio`` needs a global selection
(:func:`~grail.trainer.analysis.ops.budget.exact_budget_drops`) and is not a chunk-local rule.

**Overlap of two sets** of densities :math:`a = |A|/N`, :math:`b = |B|/N` (:func:`set_overlap`):

.. math::

    J = \frac{|A \cap B|}{|A \cup B|}, \qquad
    J_{random} = \frac{ab}{a + b - ab}, \qquad \mathrm{lift} = J / J_{random},

where :math:`J_{random}` is the Jaccard of independent random sets of the same densities (each
entry in A with probability a, in B with probability b: intersection :math:`abN`, union
:math:`(a + b - ab)N`), and :math:`|A \cap B| / |A|` (the share of A inside B) with its random
value b. A ratio whose denominator is zero (no changed entry in a scope) is NaN.

**Against a saved mask, piece by piece.** :func:`reference_counts` compares the changed flags of
a *piece* of a parameter - ``(name, global flat offset, flags)``, e.g. this rank's shard of an
FSDP2 parameter or one chunk of it - with the same entries of a
:class:`~grail.trainer.analysis.core.mask_file.SavedMask`, and returns the four counts
``[intersection, now, reference, entries]`` as an int64 tensor on the flags' device. Counts of
pieces that partition the parameters add up to the counts of the whole, whatever the sharding,
chunking or order; :func:`reference_overlap` turns the summed counts into the
``drift/overlap/{name}/*`` values (``jaccard``, ``jaccard_random``, ``overlap_now_in_ref``,
``overlap_ref_in_now``). :class:`ReferenceOverlap` accumulates the counts of one process.

How the online family (:mod:`~grail.trainer.analysis.metrics.drift_overlap`,
``AnalysisConfig.drift_reference_masks``) uses it: open each mask with
:func:`~grail.trainer.analysis.core.mask_file.load_mask` (header only); when the base is taken,
call ``mask.check_shapes({name: delta.shard(name).global_shape, ...})`` (a ``MaskFileError``
names what does not fit); at each measurement, for every chunk ``c`` of the base -> now delta
(``delta.stream()``, owned pieces only), ``flags = changed_flags(mask.criterion, c.old, c.new,
c.delta)`` (a ``keep_ratio`` mask: the live run's own exact top-k at that ratio, from
:func:`~grail.trainer.analysis.ops.budget.exact_budget_drops`) and add
``reference_counts(mask, c.name, delta.shard(c.name).offset + c.start, flags)``; sum the counts
of all masks in the measurement's one all-reduce, then ``reference_overlap(counts)`` gives the
values of ``drift/overlap/{name}/{value}``.

Example:
    >>> import torch
    >>> d = torch.tensor([0.0, 1e-7, -1e-3, float("nan")])
    >>> from grail.trainer.analysis.core.mask_file import ChangeCriterion
    >>> changed_flags(ChangeCriterion("threshold", 1e-6), None, None, d).tolist()
    [False, False, True, True]
    >>> s = set_overlap(num_params=100, count_a=10, count_b=20, intersection=5)
    >>> s["jaccard"], round(s["jaccard_random"], 4), round(s["jaccard_lift"], 2)
    (0.2, 0.0714, 2.8)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.mask_file import ChangeCriterion, SavedMask
from .masks import magnitude_keep_mask

__all__ = [
    "REFERENCE_KEYS",
    "ReferenceOverlap",
    "bf16_bits",
    "changed_flags",
    "reference_counts",
    "reference_overlap",
    "set_overlap",
]

#: The values :func:`reference_overlap` returns, in order (``drift/overlap/{name}/<value>``).
REFERENCE_KEYS = ("jaccard", "jaccard_random", "overlap_now_in_ref", "overlap_ref_in_now")


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns of ``x`` rounded to bfloat16 (round to nearest even)."""
    return (x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)).view(torch.int16)


def changed_flags(
    criterion: ChangeCriterion,
    old: torch.Tensor | None,
    new: torch.Tensor | None,
    delta: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean flags of the entries of one chunk that changed (module docstring).

    ``old`` and ``new`` are the stored values (any float dtype; needed for ``bf16_view``),
    ``delta`` is ``new - old`` in float32 (needed for ``exact`` and ``threshold``).
    """
    if criterion.kind == "bf16_view":
        if old is None or new is None:
            raise ValueError("the bf16 view compares the stored values: pass old and new")
        return bf16_bits(new) != bf16_bits(old)
    if criterion.kind == "keep_ratio":
        raise ValueError("a keep-ratio changed set is a global top-k selection, not a chunk rule "
                         "(see ops.budget.exact_budget_drops)")
    if delta is None:
        raise ValueError(f"criterion {criterion.kind!r} needs the float32 delta")
    return magnitude_keep_mask(delta, criterion.value or 0.0)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def jaccard_random(a: float, b: float) -> float:
    """Expected Jaccard of independent random sets of densities ``a`` and ``b`` (NaN if both
    are empty)."""
    return _ratio(a * b, a + b - a * b)


def set_overlap(num_params: int, count_a: int, count_b: int, intersection: int) -> dict[str, Any]:
    """Overlap of two sets of ``count_a`` and ``count_b`` among ``num_params`` entries.

    Returns ``density_a``, ``density_b``, ``intersection``, ``union`` (ints), ``jaccard``,
    ``jaccard_random``, ``jaccard_lift``, ``overlap_a_in_b`` (with ``_random`` = density b) and
    ``overlap_b_in_a`` (with ``_random`` = density a).
    """
    a, b = _ratio(count_a, num_params), _ratio(count_b, num_params)
    union = count_a + count_b - intersection
    j = _ratio(intersection, union)
    jr = jaccard_random(a, b)
    return {
        "density_a": a,
        "density_b": b,
        "intersection": int(intersection),
        "union": int(union),
        "jaccard": j,
        "jaccard_random": jr,
        "jaccard_lift": _ratio(j, jr) if math.isfinite(j) and math.isfinite(jr) else math.nan,
        "overlap_a_in_b": _ratio(intersection, count_a),
        "overlap_a_in_b_random": b,
        "overlap_b_in_a": _ratio(intersection, count_b),
        "overlap_b_in_a_random": a,
    }


def reference_counts(
    mask: SavedMask, name: str, offset: int, changed: torch.Tensor
) -> torch.Tensor:
    """``[intersection, now, reference, entries]`` (int64, on ``changed.device``) of the flags
    ``changed`` of the flat entries ``offset ..`` of ``name`` against the saved mask.

    Nothing is synchronised with the host: sum the tensors of every piece (and across ranks),
    then call :func:`reference_overlap`.
    """
    flat = changed.reshape(-1).bool()
    n = flat.numel()
    numel = math.prod(mask.shapes[name])
    if offset < 0 or offset + n > numel:
        raise ValueError(f"entries {offset}..{offset + n - 1} of {name!r} are outside its "
                         f"{numel} entries in {mask.path}")
    ref = mask.flags(name, offset, n, flat.device)
    return torch.stack([
        (flat & ref).sum(dtype=torch.int64),
        flat.sum(dtype=torch.int64),
        ref.sum(dtype=torch.int64),
        torch.tensor(n, dtype=torch.int64, device=flat.device),
    ])


def reference_overlap(counts: torch.Tensor | list[int]) -> dict[str, float]:
    """``jaccard``, ``jaccard_random``, ``overlap_now_in_ref``, ``overlap_ref_in_now`` from the
    summed :func:`reference_counts` (NaN where a denominator is zero)."""
    inter, now, ref, n = (int(c) for c in (counts.tolist() if torch.is_tensor(counts) else counts))
    s = set_overlap(n, now, ref, inter)
    return {
        "jaccard": s["jaccard"],
        "jaccard_random": s["jaccard_random"],
        "overlap_now_in_ref": s["overlap_a_in_b"],
        "overlap_ref_in_now": s["overlap_b_in_a"],
    }


class ReferenceOverlap:
    """Counts of one process against one saved mask; :meth:`result` gives the four values.

    >>> import os, tempfile, torch
    >>> from grail.trainer.analysis.core.mask_file import MaskWriter, load_mask
    >>> path = os.path.join(tempfile.mkdtemp(), "ref.safetensors")
    >>> w = MaskWriter(path, {"w": (4,)}, ChangeCriterion("exact"))
    >>> w.write("w", torch.tensor([True, True, False, False]))
    >>> _ = w.finish()
    >>> acc = ReferenceOverlap(load_mask(path))
    >>> acc.update("w", 2, torch.tensor([True, False]))  # entries 2, 3 of a shard
    >>> acc.update("w", 0, torch.tensor([False, True]))  # entries 0, 1
    >>> acc.result()["jaccard"]  # {1, 2} against {0, 1}
    0.3333333333333333
    """

    def __init__(self, mask: SavedMask) -> None:
        self.mask = mask
        self.counts: torch.Tensor | None = None

    def update(self, name: str, offset: int, changed: torch.Tensor) -> None:
        c = reference_counts(self.mask, name, offset, changed)
        self.counts = c if self.counts is None else self.counts + c.to(self.counts.device)

    def result(self) -> dict[str, float]:
        return reference_overlap([0, 0, 0, 0] if self.counts is None else self.counts)
