r"""Is the same subnetwork being trained? ``param_change/mask_overlap``.

At each measurement the *changed set* :math:`C_k` is the set of entries whose stored value
differs from the snapshot of the previous measurement (``delta != 0``; NaN counts as changed).
The computer reports the Jaccard overlap with the previous interval's changed set,

.. math:: J_k = \frac{|C_k \cap C_{k-1}|}{|C_k \cup C_{k-1}|}

(1.0 when both sets are empty), together with ``mask_overlap_prev_ratio``
:math:`|C_k \cap C_{k-1}| / |C_{k-1}|` - the fraction of last interval's changed entries that
changed again. The first measurement has no previous set and reports NaN.

Only one bit per analysed entry is kept between measurements (the previous changed set,
bit-packed into ``uint8``: memory = entries / 8 bytes), on the device of each parameter. A change
of the parameter set (architecture change) starts over.

Checkpoints: :meth:`MaskOverlapMetrics.state_dict` returns the packed previous set (the tensors
themselves, not copies) and :meth:`~MaskOverlapMetrics.load_state_dict` restores it, so a
resumed run reports the same overlap as an uninterrupted one. Under DDP/FSDP2 every rank keeps
and saves only its own local part; restore each rank's state on the same rank of a group of the
same size. If a restored part does not fit the parameters it meets (another world size, another
model), every rank reports NaN for that measurement and starts over; ranks never disagree about
the collective (there is one reduction per measurement, also at the first one).

Reading it: random, independent changed sets of densities ``a`` and ``b`` have an expected
Jaccard of ``ab / (a + b - ab)``; a value far above that means a fixed subnetwork keeps being
updated; with dense (fp32) updates both sets are nearly everything and the overlap is ~1.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> computer = MaskOverlapMetrics()
    >>> def step(idx):
    ...     old = ParameterSnapshot(model)
    ...     with torch.no_grad():
    ...         model.weight[0, idx] += 1.0
    ...     return computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
    >>> step([0, 1])["param_change/mask_overlap"]
    nan
    >>> step([1, 2])["param_change/mask_overlap"]
    0.3333333333333333
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import AnalysisConfig
from ..core.snapshot import ParameterDelta
from ..core.stats import StreamingStats
from .base import MetricComputer

__all__ = ["MaskOverlapMetrics", "pack_bits", "unpack_bits"]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat 0/1 tensor into ``ceil(n / 8)`` bytes (bit ``i % 8`` of byte ``i // 8``).

    Eight 0/1 bytes are read as one little-endian int64 (element ``j`` at bit ``8j``) and their
    bits shifted into place: a few integer ops on n/8 words instead of a reduction per byte.
    """
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.reshape(-1)
    words = padded.view(torch.int64) if sys.byteorder == "little" else None
    if words is None:  # pragma: no cover - big-endian hosts
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], device=mask.device)
        return (padded.view(-1, 8).long() * weights).sum(dim=1).to(torch.uint8)
    out = words & 1
    for j in range(1, 8):
        out |= (words >> (7 * j)) & (1 << j)
    return out.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for the first ``n`` bits, as a boolean tensor."""
    b = packed.to(torch.int64)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        shifts = torch.arange(8, device=packed.device)
        return ((b.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)[:n]
    words = b & 1
    for j in range(1, 8):
        words |= (b & (1 << j)) << (7 * j)
    return words.view(torch.uint8)[:n].view(torch.bool)


def _popcount_table(device: torch.device) -> torch.Tensor:
    table = _POPCOUNT.get(device)
    if table is None:
        table = torch.tensor([bin(i).count("1") for i in range(256)], device=device)
        _POPCOUNT[device] = table
    return table


_POPCOUNT: dict[torch.device, torch.Tensor] = {}


def _changed(delta: torch.Tensor) -> torch.Tensor:
    """0/1 bytes: 1 where ``delta != 0`` (NaN included), via the sign bit of ``-bits(|delta|)``."""
    bits = delta.abs().view(torch.int32)
    return bits.neg_().bitwise_right_shift_(31).neg_().to(torch.uint8)


class MaskOverlapMetrics(MetricComputer):
    """Jaccard overlap of consecutive changed sets (see module docstring)."""

    name = "mask_overlap"

    def __init__(self) -> None:
        self._previous: dict[str, torch.Tensor] = {}
        self._names: tuple[str, ...] = ()  # non-empty once a changed set has been recorded

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> MaskOverlapMetrics:
        return cls()  # nothing to configure: param_change_track_mask_overlap turns it on

    def reset(self) -> None:
        self._previous = {}
        self._names = ()

    def compute(self, delta: ParameterDelta | None = None, **kwargs: Any) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            return {}
        names = tuple(delta.names)
        # Decided from the names alone, never from local data: a rank that owns no tensor
        # (DDP, rank > 0) issues the same reduction as the others.
        have_previous = names == self._names
        device = next(iter(delta.new.data.values())).device
        stats = StreamingStats(
            extra_sums=("intersection", "union", "previous", "missing"), device=device
        )
        if not have_previous:
            stats.add("missing", 1.0)
        current: dict[str, list[torch.Tensor]] = {}
        prev: torch.Tensor | None = None
        for chunk in delta.stream():
            packed = pack_bits(_changed(chunk.delta))  # NaN counts as a change
            current.setdefault(chunk.name, []).append(packed)
            if not have_previous:
                continue
            if chunk.first:
                prev = self._previous_part(chunk.name, delta.new.data[chunk.name].numel())
                if prev is None:
                    stats.add("missing", 1.0)
                elif prev.device != packed.device:
                    prev = prev.to(packed.device)  # restored from a checkpoint on the CPU
            if prev is None:
                continue
            start = chunk.start // 8  # chunks start at multiples of 8
            part = prev[start : start + packed.numel()]
            count = _popcount_table(packed.device)
            stats.add("intersection", count[(packed & part).long()].sum())
            stats.add("union", count[(packed | part).long()].sum())
            stats.add("previous", count[part.long()].sum())
        self._previous = {n: torch.cat(parts) for n, parts in current.items()}
        self._names = names
        # One reduction per measurement on every rank, also at the first: a rank without a
        # previous set (or with one that does not fit) makes every rank report NaN.
        extra = stats.all_reduce().result(0).extra
        if extra["missing"]:  # no previous interval yet: NaN keeps the keys stable
            return dict.fromkeys(
                ("param_change/mask_overlap", "param_change/mask_overlap_prev_ratio"), math.nan
            )
        union, previous = extra["union"], extra["previous"]
        return {
            "param_change/mask_overlap": extra["intersection"] / union if union else 1.0,
            "param_change/mask_overlap_prev_ratio": (
                extra["intersection"] / previous if previous else 1.0
            ),
        }

    def _previous_part(self, name: str, numel: int) -> torch.Tensor | None:
        """This rank's previous packed set of ``name`` if it fits ``numel`` local entries."""
        prev = self._previous.get(name)
        if prev is None or prev.numel() != -(-numel // 8):
            self.log_once("a restored changed set does not fit the parameters; starting over")
            return None
        return prev

    def state_dict(self) -> dict[str, Any]:
        """``{"names": [...], "previous": {name: packed uint8}}``; ``{}`` before any measurement.

        ``names`` are all analysed parameters (every rank's), ``previous`` holds this rank's
        local parts only.
        """
        if not self._names:
            return {}
        return {"names": list(self._names), "previous": dict(self._previous)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (``{}`` forgets the previous set)."""
        if not state:
            self.reset()
            return
        names, previous = state.get("names"), state.get("previous")
        ok = (
            isinstance(names, (list, tuple))
            and all(isinstance(n, str) for n in names)
            and isinstance(previous, Mapping)
            and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                for t in previous.values()
            )
        )
        if not ok:
            raise ValueError(
                f"{self.name}: a state must be {{'names': [str], 'previous': {{name: 1-D uint8 "
                f"tensor}}}} as returned by state_dict(); got keys {sorted(map(str, state))}"
            )
        self._previous = dict(previous)
        self._names = tuple(names)
