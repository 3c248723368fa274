"""An exact top-k magnitude mask over a chosen set of parameters: the equal-budget sparse update.

:func:`exact_budget_drops` turns a budget of ``k`` entries into a drop function for
:class:`~grail.trainer.analysis.patching.SelectPatch` that keeps exactly the ``k`` entries of
largest ``|delta|`` over the parameters of a delta (jointly, not per tensor):

1. the k-th largest value ``v`` is found exactly by radix select
   (:func:`~grail.trainer.analysis.masks.keep_ratio_thresholds`, two histogram passes);
2. one pass counts, per tensor, the entries above ``v`` and those equal to it;
3. every entry above ``v`` is kept, and entries equal to ``v`` (ties) are kept in a fixed order -
   tensors in the delta's name order, then flat position - until ``k`` is reached. The last
   tensor that keeps only part of its ties is located by one more pass over that tensor alone.

So the count is exactly ``k`` whatever the ties, and the mask depends only on ``|delta|`` and the
position (as :class:`SelectPatch` requires to undo it). ``k >= N`` keeps everything, ``k <= 0``
nothing. Memory: two histograms and a few counters per tensor. The deltas must be finite and the
tensors unsharded (positions are local flat indices); every tensor of the delta is read, on every
rank, with no collective.

:func:`subset_delta` gives a :class:`~grail.trainer.analysis.primitives.ParameterDelta` that covers
only some parameters (a shallow copy with a filtered name list), so that a patch touches only them.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.patching import SelectPatch
    >>> from grail.trainer.analysis.primitives import ParameterSnapshot
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> old = ParameterSnapshot(model)
    >>> w_old = model.weight.detach().clone()
    >>> with torch.no_grad():
    ...     model.weight += torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> with SelectPatch(delta, exact_budget_drops(delta, [2])[0]) as patch:
    ...     changed = (model.weight != w_old).sum().item()
    >>> changed, 4 - patch.dropped_count()
    (2, 2)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .masks import DropFn, keep_ratio_thresholds
from .primitives import ParameterDelta

__all__ = ["exact_budget_drops", "subset_delta"]

def subset_delta(delta: ParameterDelta, names: Sequence[str]) -> ParameterDelta:
    """A view of ``delta`` restricted to ``names`` (same snapshots; nothing is copied)."""
    view = copy.copy(delta)  # shares snapshots and scratch buffers; only the name list differs
    view.names = list(names)
    return view


def exact_budget_drops(delta: ParameterDelta, budgets: Sequence[int]) -> list[DropFn]:
    """For each budget ``k``, a drop function keeping exactly the ``k`` largest ``|delta|``
    entries over ``delta.names`` jointly (rule and tie order in the module docstring)."""
    sizes = {n: delta.new.data[n].numel() for n in delta.names}
    total = sum(sizes.values())

    def chunks() -> Iterator[torch.Tensor]:
        return (c.delta for c in delta.stream(owned_only=False))

    live = [k for k in budgets if 0 < k < total]
    found = keep_ratio_thresholds(chunks, [k / total for k in live]) if live else {}
    value_bits: dict[int, int] = {}
    for k in live:
        t = found[k / total]
        value_bits[k] = int(np.float32(t).view(np.int32)) + 1 if t > 0 else -1
    if any(v < 0 for v in value_bits.values()):  # k-th largest is 0 or the smallest subnormal
        nonzero = sum(int(torch.count_nonzero(c)) for c in chunks())
        for k, v in value_bits.items():
            if v < 0:
                value_bits[k] = 1 if nonzero >= k else 0
    # counts stay on the device until the pass is over: one synchronisation, not one per chunk
    counts: dict[str, list[torch.Tensor]] = {}
    for c in delta.stream(owned_only=False) if live else ():
        bits = c.delta.abs().view(torch.int32)
        row = torch.stack(
            [t for k in live for t in ((bits > value_bits[k]).sum(), (bits == value_bits[k]).sum())]
        )
        counts.setdefault(c.name, []).append(row)
    per_name = {n: torch.stack(rows).sum(0).tolist() for n, rows in counts.items()}
    gt = {k: {n: per_name[n][2 * i] for n in per_name} for i, k in enumerate(live)}
    eq = {k: {n: per_name[n][2 * i + 1] for n in per_name} for i, k in enumerate(live)}
    drops: list[DropFn] = []
    for k in budgets:
        if k >= total:
            drops.append(lambda name, off, bits, out: out.zero_())
        elif k <= 0:
            drops.append(lambda name, off, bits, out: out.fill_(-1))
        else:
            need = k - sum(gt[k].values())
            cut = _tie_cutoffs(delta, value_bits[k], eq[k], need)
            drops.append(_budget_drop(value_bits[k], cut))
    return drops


def _tie_cutoffs(delta: ParameterDelta, vb: int, eq: dict[str, int], need: int) -> dict[str, int]:
    """``name -> last flat position whose tie is kept`` (absent: no tie kept)."""
    cut: dict[str, int] = {}
    for name, count in eq.items():
        if need <= 0:
            break
        if count <= need:
            cut[name] = delta.new.data[name].numel()
            need -= count
            continue
        seen = 0
        for c in delta.stream([name], owned_only=False):
            pos = (c.delta.abs().view(torch.int32) == vb).nonzero().squeeze(1)
            if seen + pos.numel() >= need:
                cut[name] = c.start + int(pos[need - seen - 1])
                break
            seen += pos.numel()
        need = 0
    return cut


def _budget_drop(vb: int, cut: dict[str, int]) -> DropFn:
    def drop(name: str, offset: int, abs_bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        keep = abs_bits > vb
        last = cut.get(name, -1)
        if last >= offset:
            hi = min(last - offset + 1, abs_bits.numel())
            keep[:hi] |= abs_bits[:hi] == vb
        return out.copy_(keep).sub_(1)

    return drop


