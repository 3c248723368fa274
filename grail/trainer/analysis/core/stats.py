"""Streaming float64 accumulators: feed tensors one at a time, merge, all-reduce once, finalise.

:class:`StreamingStats` keeps, for each of ``G`` groups (the whole model, each layer, each
component, ...), a row of float64 sums (``count``, ``sum``, ``sum_sq``, ``sum_abs``,
``nonfinite``, the counts ``le[t]`` of ``abs(x) <= t``, then caller-defined extra sums) and a row
of maxima (``max_abs``, ``max``, ``-min``) that every statistic of this library is derived from.
Their columns are named by a :class:`~.layout.Layout` (built from the thresholds and the extra
sums; see :mod:`.layout` for each field's definition and reduction): this module, the compiled
kernels and the computers look columns up by name, never by position.

Each tensor is processed in fixed-size chunks of its flattened view, so the extra memory is a
chunk, never the whole tensor, and the chunk stays in cache for the dozen reductions applied to
it. Chunk reductions run in float32 with PyTorch's cascade summation (relative error ~1e-7) and
are accumulated across chunks in float64. Threshold counts are exact: ``t`` is compared in
float32 against the largest float32 not above ``t``, which selects exactly the float32 values
``v`` with ``v <= t`` in real arithmetic.

``std`` is the population standard deviation ``sqrt(sum_sq / n - mean^2)``: exact enough when
``std`` is not much smaller than ``|mean|`` (parameter updates), with an absolute error of about
``sqrt(eps32) * rms`` in the degenerate case of nearly constant values.

Example:
    >>> import torch
    >>> s = StreamingStats(thresholds=[0.5], groups=["all", "odd"])
    >>> s.update(torch.tensor([1.0, -2.0, 0.25]), groups=[0, 1])
    >>> s.update(torch.tensor([float("nan"), 0.0]), groups=[0])
    >>> r = s.result(0)
    >>> r.count, r.nonfinite, r.norm_l1, r.max, r.min, r.le[0.5]
    (4, 1, 3.25, 1.0, -2.0, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .distributed import all_reduce_
from .layout import LE, MAXES, MOMENTS, Layout, Summary, stack_row
from .scratch import ScratchBuffers

__all__ = [
    "CPU_CHUNK",
    "CUDA_CHUNK",
    "StreamingStats",
    "Summary",
    "chunk_moments",
    "chunk_numel",
    "count_zeros",
    "f32_floor",
]

#: Elements per chunk: 1 MiB of float32 fits in L2 on CPU; GPUs want fewer, larger launches.
CPU_CHUNK = 1 << 18
CUDA_CHUNK = 1 << 24

def chunk_numel(device: torch.device) -> int:
    """Chunk size used for streaming reductions on ``device``."""
    return CPU_CHUNK if device.type == "cpu" else CUDA_CHUNK


def f32_floor(t: float) -> float:
    """Largest float32 value that is <= ``t`` (so float32 ``v <= f32_floor(t)`` iff ``v <= t``)."""
    v = np.float32(t)
    if float(v) > t:
        v = np.nextafter(v, np.float32(-np.inf))
    return float(v)


def count_zeros(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Number of exact zeros of a float32 ``x`` as a 0-d tensor (NaN counts as non-zero).

    Float ops instead of ``x == 0``: on CPU, comparisons into bool tensors are several times
    slower than arithmetic, and this runs on every chunk. ``scratch`` is overwritten.
    """
    bits = torch.abs(x, out=scratch).view(torch.int32)  # NaN has a non-zero pattern too
    nonzero = -bits.neg_().bitwise_right_shift_(31).sum(dtype=torch.int32)
    return x.numel() - nonzero.float()


def _f32_bits(t: float) -> int:
    return int(np.float32(t).view(np.int32))


def chunk_moments(
    x: torch.Tensor,
    thresholds_f32: Sequence[float],
    ax: torch.Tensor,
    tmp: torch.Tensor,
    ibuf: torch.Tensor,
    sync_free: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base sums and maxima of one float32 chunk (layout of :class:`StreamingStats`).

    ``ax``, ``tmp`` (float32) and ``ibuf`` (int32) are scratch buffers of ``x``'s size; ``ax``
    holds ``|x|`` of the finite entries afterwards. Returns ``(sums, maxes)`` as float64
    tensors on ``x``'s device, in the columns of :attr:`.Layout.moments` and
    :attr:`.Layout.maxes` for these thresholds.

    Counting uses arithmetic rather than comparisons, which are several times slower on CPU:
    for non-negative floats the int32 bit pattern is monotone, so ``|x| <= t`` iff
    ``bits(|x|) - bits(t) - 1 < 0``, whose sign bit an arithmetic shift turns into -1 or 0.

    On accelerators (or with ``sync_free=True``) no value is read back to the host: non-finite
    entries are masked instead of removed, so kernels queue without waiting.
    """
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    if sync_free:
        return _chunk_moments_sync_free(x, thresholds_f32, ax, tmp)
    n = x.numel()
    total = x.sum()
    nonfinite = 0
    if not bool(torch.isfinite(total)):
        x = x[torch.isfinite(x)]
        nonfinite = n - x.numel()
        n = x.numel()
        ax, tmp, ibuf = ax[:n], tmp[:n], ibuf[:n]
        total = x.sum()
    if n == 0:
        layout = Layout(tuple(thresholds_f32))
        sums = layout.new_sums(device=x.device)
        sums[layout.moments["nonfinite"]] = nonfinite
        return sums, layout.new_maxes(device=x.device)
    torch.abs(x, out=ax)
    row = {
        "count": x.new_tensor(float(n)),
        "sum": total,
        "sum_sq": torch.mul(ax, ax, out=tmp).sum(),
        "sum_abs": ax.sum(),
        "nonfinite": x.new_tensor(float(nonfinite)),
    }
    bits = ax.view(torch.int32)
    le = []
    for t in thresholds_f32:
        if t == 0.0:
            le.append(n - torch.sign(ax, out=tmp).sum())
        else:
            neg = torch.sub(bits, _f32_bits(t) + 1, out=ibuf).bitwise_right_shift_(31)
            le.append(-neg.sum(dtype=torch.int32).float())  # exact: a chunk has < 2^24 entries
    row[LE] = le
    lo, hi = torch.aminmax(x)
    return _rows(row, hi, lo)


def _rows(
    sums: dict[str, torch.Tensor | list[torch.Tensor]], hi: torch.Tensor, lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 ``(sums, maxes)`` rows of named chunk sums and the chunk's extremes."""
    maxes = {"max_abs": torch.maximum(hi.abs(), lo.abs()), "max": hi, "neg_min": -lo}
    return stack_row(MOMENTS, sums).double(), stack_row(MAXES.fields, maxes).double()


def _chunk_moments_sync_free(
    x: torch.Tensor, thresholds_f32: Sequence[float], ax: torch.Tensor, tmp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(x)
    nonfinite = (~finite).sum(dtype=torch.float32)
    tmp.copy_(x).masked_fill_(~finite, 0.0)
    torch.abs(tmp, out=ax)
    row: dict[str, torch.Tensor | list[torch.Tensor]] = {
        "count": x.numel() - nonfinite,
        "sum": tmp.sum(),
        "sum_sq": torch.mul(ax, ax).sum(),
        "sum_abs": ax.sum(),
        "nonfinite": nonfinite,
    }
    row[LE] = [((ax <= t) & finite).sum(dtype=torch.float32) for t in thresholds_f32]
    hi = torch.where(finite, x, -math.inf).amax()
    lo = torch.where(finite, x, math.inf).amin()
    sums, maxes = _rows(row, hi, lo)
    empty = nonfinite == x.numel()  # no finite entry: maxima stay at -inf, like the CPU path
    maxes = torch.where(empty, torch.full_like(maxes, -math.inf), maxes)
    return sums, maxes


class StreamingStats:
    """float64 accumulators for ``len(groups)`` groups; see the module docstring.

    Args:
        thresholds: values ``t`` for the counts ``abs(x) <= t``.
        groups: group names; ``update(..., groups=[i, j])`` feeds rows ``i`` and ``j``.
        extra_sums: names of caller-defined sums fed through :meth:`add`.
        device: where the accumulators live (keep them next to the data: no sync per tensor).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (),
        groups: Sequence[str] = ("all",),
        extra_sums: Sequence[str] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.thresholds = sorted(float(t) for t in thresholds)
        self._t32 = [f32_floor(t) for t in self.thresholds]
        self.groups = list(groups)
        self.extra_names = list(extra_sums)
        #: the named columns of :attr:`sums` and :attr:`maxes`
        self.layout = Layout(tuple(self.thresholds), tuple(self.extra_names))
        self.device = torch.device(device)
        n = len(self.groups)
        self.sums = self.layout.new_sums(n, extras=True, device=self.device)
        self.maxes = self.layout.new_maxes(n, device=self.device)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self._scratch = ScratchBuffers(chunk_numel)

    # --- feeding ---------------------------------------------------------------------------
    def _rows(self, groups: Sequence[int] | int) -> torch.Tensor:
        key = (groups,) if isinstance(groups, int) else tuple(groups)
        idx = self._index.get(key)
        if idx is None:
            idx = torch.tensor(key, dtype=torch.long, device=self.device)
            self._index[key] = idx
        return idx

    def update(self, x: torch.Tensor, groups: Sequence[int] | int = 0) -> None:
        """Add every element of ``x`` (any floating dtype, any device) to the given groups."""
        flat = x.detach().reshape(-1)
        step = chunk_numel(flat.device)
        for start in range(0, flat.numel(), step):
            self.update_chunk(flat[start : start + step], groups)

    def update_chunk(self, x: torch.Tensor, groups: Sequence[int] | int = 0) -> None:
        """Like :meth:`update` for a 1-D tensor already small enough to be one chunk.

        A float32 ``x`` may be a scratch buffer of the caller: it is read, never kept.
        """
        self.accumulate(*self.moments(x), groups)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`chunk_moments` of one chunk with this accumulator's thresholds and scratch."""
        if x.dtype != torch.float32:
            x = x.float()
        ax, tmp, ibuf = self.scratch(x.device, x.numel())
        return chunk_moments(x, self._t32, ax, tmp, ibuf)

    def _with_extras(
        self,
        sums: torch.Tensor,
        extras: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``sums`` (columns of ``layout.moments``) followed by the extra sums, given by name
        or, as a sequence, in the order of :attr:`extra_names`."""
        if not extras:
            return sums
        if isinstance(extras, Mapping):
            return torch.cat([sums, self.layout.extra_columns(extras, sums)], dim=-1)
        if len(extras) != len(self.extra_names):
            raise ValueError(f"expected {len(self.extra_names)} extras, got {len(extras)}")
        return torch.cat([sums, torch.stack(list(extras)).to(sums)])

    def _columns(self, sums: torch.Tensor) -> slice:
        """The columns of :attr:`sums` that a row of ``sums``' width fills: the moments, or the
        moments and every extra sum (both lead with the same columns)."""
        width = sums.shape[-1]
        if width not in (len(self.layout.moments), len(self.layout.sums)):
            raise ValueError(
                f"rows of {width} sums fit neither {self.layout.moments.fields} nor "
                f"{self.layout.sums.fields} with {len(self.thresholds)} thresholds"
            )
        return slice(0, width)

    def accumulate(
        self,
        sums: torch.Tensor,
        maxes: torch.Tensor,
        groups: Sequence[int] | int = 0,
        extras: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] = (),
    ) -> None:
        """Add a row of sums (the columns of ``layout.moments``, e.g. from :meth:`moments`) and
        every extra sum (by name, or in the order of :attr:`extra_names`), and fold in a row of
        maxima.

        Passing the extras here instead of through :meth:`add` costs one small kernel per chunk
        instead of several, which matters when chunks are small.
        """
        rows = self._rows(groups)
        sums = self._with_extras(sums, extras).to(self.device, torch.float64)
        self.sums[:, self._columns(sums)].index_add_(0, rows, sums.expand(len(rows), -1))
        cur = self.maxes.index_select(0, rows)
        self.maxes.index_copy_(0, rows, torch.maximum(cur, maxes.to(self.device, torch.float64)))

    def accumulate_rows(
        self,
        sums: torch.Tensor,
        maxes: torch.Tensor,
        groups: Sequence[Sequence[int]],
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """:meth:`accumulate` for ``P`` rows at once: ``sums`` ``(P, len(layout.moments))``,
        ``maxes`` ``(P, len(layout.maxes))``, ``extras`` extra sum name -> ``(P,)`` (names not
        given add nothing), ``groups[i]`` the groups of row ``i``. Two scatter ops in all,
        instead of a few per row."""
        if len(groups) != sums.shape[0]:
            raise ValueError(f"expected {sums.shape[0]} group lists, got {len(groups)}")
        sums = self._with_extras(sums, extras)
        src = torch.tensor([i for i, gs in enumerate(groups) for _ in gs], dtype=torch.long)
        dst = torch.tensor([g for gs in groups for g in gs], dtype=torch.long, device=self.device)
        if not len(src):
            return
        sums = sums.to(self.device, torch.float64)[src.to(self.device)]
        maxes = maxes.to(self.device, torch.float64)[src.to(self.device)]
        self.sums[:, self._columns(sums)].index_add_(0, dst, sums)
        self.maxes.scatter_reduce_(0, dst[:, None].expand(-1, maxes.shape[1]), maxes, "amax")

    @property
    def thresholds_f32(self) -> list[float]:
        """The thresholds as compared in float32 (:func:`f32_floor` of each)."""
        return list(self._t32)

    def column(self, key: str | float) -> int:
        """Column of a field of :attr:`sums` by name (``"count"``, ``"sum"``, ..., an extra
        sum) or of the count at threshold ``t`` (see :class:`~.layout.Layout`)."""
        if isinstance(key, str):
            return self.layout.sums[key]
        return self.layout.le(key)

    def scratch(self, device: torch.device, n: int) -> tuple[torch.Tensor, ...]:
        """Two float32 and one int32 scratch buffer of ``n`` elements on ``device`` (reused)."""
        get = self._scratch.get
        return get(device, n, slot="ax"), get(device, n, slot="tmp"), get(device, n, torch.int32)

    def add(self, name: str, value: torch.Tensor | float, groups: Sequence[int] | int = 0) -> None:
        """Add ``value`` to the extra sum ``name`` of the given groups (no device sync)."""
        if name not in self.extra_names:
            raise ValueError(f"no extra sum {name!r}; the extra sums are {self.extra_names}")
        col = self.layout.sums[name]
        rows = self._rows(groups)
        if isinstance(value, torch.Tensor):
            value = value.to(device=self.device, dtype=torch.float64)
        value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        self.sums[:, col].index_add_(0, rows, value.expand(len(rows)))

    # --- combining -------------------------------------------------------------------------
    def merge(self, other: StreamingStats) -> StreamingStats:
        """Fold ``other`` (same thresholds, groups and extras) into ``self``; returns self."""
        if (other.layout, other.groups) != (self.layout, self.groups):
            raise ValueError("can only merge StreamingStats with the same layout")
        self.sums += other.sums.to(self.device)
        torch.maximum(self.maxes, other.maxes.to(self.device), out=self.maxes)
        return self

    def all_reduce(self) -> StreamingStats:
        """Sum/max over all ranks (two collectives for every group at once); returns self."""
        all_reduce_(self.sums, "sum")
        all_reduce_(self.maxes, "max")
        return self

    # --- results ---------------------------------------------------------------------------
    def results(self) -> list[Summary]:
        """One :class:`Summary` per group, in group order (a single device-to-host copy)."""
        sums, maxes = self.sums.cpu().tolist(), self.maxes.cpu().tolist()
        return [self.layout.summary(row, mx) for row, mx in zip(sums, maxes)]

    def result(self, group: int | str = 0) -> Summary:
        i = self.groups.index(group) if isinstance(group, str) else group
        return self.results()[i]
