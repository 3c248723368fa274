"""What the offline diff learns on the side while a computer streams the delta.

:class:`ObservedDelta` is a :class:`~grail.trainer.analysis.core.snapshot.ParameterDelta` whose
:meth:`~ObservedDelta.stream` also hands every chunk to observers, so the checkpoint is read once
for the parameter-change metrics *and* for:

* :class:`CellStats` - statistics per (layer, component) cell, for the report's heatmaps, and the
  fraction of changed entries at a log-spaced grid of thresholds, for its curve. It is a
  :class:`~grail.trainer.analysis.core.stats.StreamingStats` whose groups are ``"all"`` and one
  ``"layer|component"`` per cell (parameters outside any layer go to the row ``"other"``):

  * ``mean_abs_delta`` = :math:`\\sum|\\Delta| / n` over the cell's entries,
  * ``changed_ratio`` = fraction of the cell's entries with :math:`|\\Delta| > 0` (stored values
    differ; NaN/Inf deltas count as changed),
  * ``curve[T]`` = fraction of all entries with :math:`|\\Delta| > T`.

* :class:`Progress` - a tqdm bar of tensors done / total with the read rate in MB/s.

Each observer sees every chunk exactly once, however many computers stream the delta.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.naming import ParameterNaming
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model[1].weight.add_(torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    >>> new = ParameterSnapshot(model)
    >>> cells = CellStats(ParameterNaming(list(new.data)), thresholds=[0.0, 0.1])
    >>> delta = ObservedDelta(old, new, [cells])
    >>> _ = [c for c in delta.stream()] + [c for c in delta.stream()]  # two passes, seen once
    >>> r = cells.result()
    >>> r["layers"], r["components"], r["changed_ratio"]
    (['layer_0', 'layer_1'], ['weight', 'bias'], [[0.0, 0.0], [0.25, 0.0]])
    >>> r["curve"]["changed_ratio"]
    [0.08333333333333333, 0.08333333333333333]
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from ..core.naming import ParameterNaming, split_name
from ..core.snapshot import DeltaChunk, ParameterDelta, ParameterSnapshot
from ..core.stats import StreamingStats

__all__ = ["CURVE_THRESHOLDS", "CellStats", "ChunkObserver", "ObservedDelta", "Progress"]

logger = logging.getLogger(__name__)

#: 0 and the decades from 1e-10 to 1: where the changed-ratio curve is evaluated (each
#: threshold costs about as much as a third of the parameter-change statistics).
CURVE_THRESHOLDS = [0.0] + [float(f"1e{k}") for k in range(-10, 1)]
OTHER = "other"


class ChunkObserver(Protocol):
    def observe(self, chunk: DeltaChunk) -> None: ...


class ObservedDelta(ParameterDelta):
    """A delta whose stream feeds ``observers`` every chunk once (see module docstring)."""

    def __init__(
        self, old: ParameterSnapshot, new: ParameterSnapshot, observers: Sequence[ChunkObserver]
    ) -> None:
        super().__init__(old, new)
        self.observers = list(observers)
        self._next: dict[str, int] = {}

    def stream(
        self, names: list[str] | None = None, owned_only: bool = True
    ) -> Iterator[DeltaChunk]:
        for chunk in super().stream(names, owned_only):
            n = chunk.delta.numel()
            if n and self._next.get(chunk.name, 0) == chunk.start:
                self._next[chunk.name] = chunk.start + n
                for obs in self.observers:
                    obs.observe(chunk)
            yield chunk


def _layer_key(layer: str) -> tuple[Any, ...]:
    """Natural order: layer_2 before layer_10; ``other`` last."""
    if layer == OTHER:
        return (1,)
    return (0, *[int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer)])


class CellStats:
    """Streaming statistics per (layer, component) and the threshold curve (module docstring)."""

    def __init__(
        self,
        naming: ParameterNaming,
        thresholds: Sequence[float] = CURVE_THRESHOLDS,
        device: torch.device | str = "cpu",
    ) -> None:
        layers = {n: naming.layer(n) or OTHER for n in naming.names}
        self.layers = sorted(set(layers.values()), key=_layer_key)
        # columns in module order: attention and MLP parts grouped, non-layer parameters last
        first: dict[str, tuple[bool, str]] = {}
        for n in naming.names:
            key = (naming.layer(n) is None, split_name(n)[2])
            comp = naming.component(n)
            first[comp] = min(first.get(comp, key), key)
        self.components = sorted(first, key=lambda c: first[c])
        groups = ["all"]
        self._rows: dict[str, list[int]] = {}
        index: dict[str, int] = {}
        for n in naming.names:
            cell = f"{layers[n]}|{naming.component(n)}"
            if cell not in index:
                index[cell] = len(groups)
                groups.append(cell)
            self._rows[n] = [0, index[cell]]
        self.stats = StreamingStats(sorted({0.0, *thresholds}), groups=groups, device=device)

    def observe(self, chunk: DeltaChunk) -> None:
        self.stats.update_chunk(chunk.delta, self._rows[chunk.name])

    def result(self) -> dict[str, Any]:
        """Matrices ``[layer][component]`` (None where a cell is empty) and the curve."""
        results = self.stats.results()
        by_cell = dict(zip(self.stats.groups, results, strict=True))
        shape = [[None] * len(self.components) for _ in self.layers]
        mean_abs: list[list[float | None]] = [list(r) for r in shape]
        changed: list[list[float | None]] = [list(r) for r in shape]
        count: list[list[int]] = [[0] * len(self.components) for _ in self.layers]
        for i, layer in enumerate(self.layers):
            for j, comp in enumerate(self.components):
                r = by_cell.get(f"{layer}|{comp}")
                total = (r.count + r.nonfinite) if r is not None else 0
                if total:
                    mean_abs[i][j] = r.mean_abs
                    changed[i][j] = (total - r.le[0.0]) / total
                    count[i][j] = total
        everything = results[0]
        total = everything.count + everything.nonfinite
        ts = self.stats.thresholds
        return {
            "layers": self.layers,
            "components": self.components,
            "mean_abs_delta": mean_abs,
            "changed_ratio": changed,
            "num_params": count,
            "curve": {
                "thresholds": ts,
                "changed_ratio": [(total - everything.le[t]) / total if total else 0.0 for t in ts],
            },
        }


class Progress:
    """tqdm bar: tensors done / total and MB/s (silent when stderr is not a terminal)."""

    def __init__(self, total: int, nbytes: Callable[[str], int], enabled: bool | None = None):
        self._nbytes = nbytes
        self.done_bytes = 0
        self.start = time.perf_counter()
        self.bar: Any = None
        if enabled is False:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            logger.debug("tqdm is not installed; no progress bar")
            return
        # disable=None: tqdm turns itself off when the output is not a terminal
        self.bar = tqdm(total=total, unit="tensor", desc="diff", disable=None, leave=False)

    def observe(self, chunk: DeltaChunk) -> None:
        if not chunk.last:
            return
        self.done_bytes += self._nbytes(chunk.name)
        if self.bar is not None:
            rate = self.done_bytes / max(time.perf_counter() - self.start, 1e-9) / 1e6
            self.bar.set_postfix_str(f"{rate:.0f} MB/s", refresh=False)
            self.bar.update(1)

    def close(self) -> float:
        """Close the bar; returns the seconds since it started."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start
