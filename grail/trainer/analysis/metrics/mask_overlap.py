r"""Is the same subnetwork being trained? ``param_change/mask_overlap``.

At each measurement the *changed set* :math:`C_k` is the set of entries whose stored value
differs from the snapshot of the previous measurement (``delta != 0``; NaN counts as changed).
The computer reports the Jaccard overlap with the previous interval's changed set,

.. math:: J_k = \frac{|C_k \cap C_{k-1}|}{|C_k \cup C_{k-1}|}

(1.0 when both sets are empty), together with ``mask_overlap_prev_ratio``
:math:`|C_k \cap C_{k-1}| / |C_{k-1}|` - the fraction of last interval's changed entries that
changed again. The first measurement has no previous set and reports nothing.

Only one bit per analysed entry is kept between measurements (the previous changed set,
bit-packed into ``uint8``: memory = entries / 8 bytes), on the device of each parameter. A change
of the parameter set (architecture change) starts over.

Reading it: random, independent changed sets of densities ``a`` and ``b`` have an expected
Jaccard of ``ab / (a + b - ab)``; a value far above that means a fixed subnetwork keeps being
updated; with dense (fp32) updates both sets are nearly everything and the overlap is ~1.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.primitives import ParameterSnapshot
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> computer = MaskOverlapMetrics()
    >>> def step(idx):
    ...     old = ParameterSnapshot(model)
    ...     with torch.no_grad():
    ...         model.weight[0, idx] += 1.0
    ...     return computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
    >>> step([0, 1])
    {}
    >>> step([1, 2])["param_change/mask_overlap"]
    0.3333333333333333
"""

from __future__ import annotations

from typing import Any

import torch

from ..primitives import ParameterDelta
from ..stats import StreamingStats
from .base import MetricComputer

__all__ = ["MaskOverlapMetrics", "pack_bits", "unpack_bits"]

_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    w = _WEIGHTS.get(device)
    if w is None:
        w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
        _WEIGHTS[device] = w
    return w


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat boolean tensor into ``ceil(n / 8)`` bytes (bit ``i % 8`` of byte ``i // 8``)."""
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.reshape(-1)
    return (padded.view(-1, 8) * _weights(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for the first ``n`` bits."""
    bits = packed.unsqueeze(1).bitwise_and(_weights(packed.device)).ne(0)
    return bits.reshape(-1)[:n]


class MaskOverlapMetrics(MetricComputer):
    """Jaccard overlap of consecutive changed sets (see module docstring)."""

    name = "mask_overlap"

    def __init__(self) -> None:
        self._previous: dict[str, torch.Tensor] = {}
        self._names: tuple[str, ...] = ()

    def reset(self) -> None:
        self._previous = {}
        self._names = ()

    def compute(self, delta: ParameterDelta | None = None, **kwargs: Any) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            return {}
        names = tuple(delta.names)
        have_previous = names == self._names and bool(self._previous)
        device = next(iter(delta.new.data.values())).device
        stats = StreamingStats(extra_sums=("intersection", "union", "previous"), device=device)
        current: dict[str, list[torch.Tensor]] = {}
        for chunk in delta.stream():
            changed = chunk.delta != 0  # NaN != 0: a non-finite delta is a change
            packed = pack_bits(changed)
            current.setdefault(chunk.name, []).append(packed)
            if have_previous:
                start = chunk.start // 8
                prev = unpack_bits(self._previous[chunk.name][start : start + packed.numel()],
                                   changed.numel())
                stats.add("intersection", (changed & prev).sum())
                stats.add("union", (changed | prev).sum())
                stats.add("previous", prev.sum())
        self._previous = {n: torch.cat(parts) for n, parts in current.items()}
        self._names = names
        if not have_previous:
            return {}
        extra = stats.all_reduce().result(0).extra
        union, previous = extra["union"], extra["previous"]
        return {
            "param_change/mask_overlap": extra["intersection"] / union if union else 1.0,
            "param_change/mask_overlap_prev_ratio": (
                extra["intersection"] / previous if previous else 1.0
            ),
        }
