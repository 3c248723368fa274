"""Named columns of the float64 rows that statistics travel in: the one place of column indices.

Every statistic of this library is accumulated as rows of float64 values (see
:mod:`.stats`): a row of sums and a row of maxima per group, and every compiled kernel
(:mod:`~grail.trainer.analysis.kernels`) returns a raw row of its own. Code never indexes these
rows by position; it asks a :class:`Columns` for the column of a name:

* :class:`Columns` - ordered field names of one kind of row. The field :data:`LE` stands for
  the threshold counts ``#{|x| <= t}``, one column per threshold, in the order of the sorted
  thresholds; every other field is one column.
* :class:`Layout` - the rows of :class:`~.stats.StreamingStats`, built from its thresholds and
  extra sums: ``moments`` (the base sums and threshold counts that :func:`~.stats.chunk_moments`
  and the kernels produce), ``sums`` (``moments`` followed by the extra sums) and ``maxes``.
* :func:`stack_row` builds a row from named values in a declared field order, and
  :func:`assign` copies named columns between rows of two layouts (the translation from a
  kernel's raw row to the statistics' columns).
* :class:`Summary` is one group's finalised statistics, read from its rows by
  :meth:`Layout.summary`.

=================  ==========================================  ==========
sums field         definition over the finite values x         reduction
=================  ==========================================  ==========
``count``          number of finite values                     SUM
``sum``            sum x                                       SUM
``sum_sq``         sum x^2                                     SUM
``sum_abs``        sum abs(x)                                  SUM
``nonfinite``      number of NaN/Inf values (excluded above)   SUM
``le``             number of finite values with abs(x) <= t    SUM
extra sums         caller-defined (e.g. sum of W_old^2)        SUM
=================  ==========================================  ==========

The maxima are ``max_abs`` (max abs(x)), ``max`` (max x) and ``neg_min`` (-min x), all reduced
with MAX, so that one element-wise maximum merges every column.

Decisions: an extra sum may not reuse a base name or ``"le"`` (a :class:`ValueError` at
construction, never a silently shadowed column); extra sums passed by name must exist (unknown
names raise) and those not passed add 0; :func:`stack_row` and the kernels that call it are
plain Python over tuples of names, so ``torch.compile`` resolves every name at trace time and
the traced graph holds only the tensor ops.

Example:
    >>> import torch
    >>> layout = Layout(thresholds=(0.0, 0.5), extras=("old_sq",))
    >>> layout.sums["sum_sq"], layout.sums.span(LE), layout.le(0.5), layout.sums["old_sq"]
    (2, slice(5, 7, None), 6, 7)
    >>> raw_cols = Columns(("sum", LE), n_thresholds=2)
    >>> raw = stack_row(raw_cols.fields, {"sum": torch.tensor(3.0), LE: [torch.tensor(1.0)] * 2})
    >>> row = layout.new_sums(extras=True)
    >>> assign(row, layout.sums, raw, raw_cols, ("sum", LE)).tolist()
    [0.0, 3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "BASE_SUMS",
    "LE",
    "MAXES",
    "MOMENTS",
    "Columns",
    "Layout",
    "Summary",
    "assign",
    "stack_row",
]

#: The field of the threshold counts: one column per threshold.
LE = "le"
#: The base sums every :class:`Layout` starts with.
BASE_SUMS = ("count", "sum", "sum_sq", "sum_abs", "nonfinite")
#: The fields of the sums of one chunk or tensor: the base sums, then the threshold counts.
MOMENTS = (*BASE_SUMS, LE)


@dataclass(frozen=True)
class Columns:
    """Ordered field names of a row and the columns they occupy.

    >>> c = Columns(("sum", LE, "max_abs"), n_thresholds=2)
    >>> c["sum"], c.span(LE), c["max_abs"], len(c), c.indices("sum", "max_abs")
    (0, slice(1, 3, None), 3, 4, [0, 3])
    """

    fields: tuple[str, ...]
    n_thresholds: int = 0
    _spans: dict[str, slice] = field(init=False, repr=False, compare=False)
    _width: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spans: dict[str, slice] = {}
        start = 0
        for name in self.fields:
            if name in spans:
                raise ValueError(f"column {name!r} appears twice in {self.fields}")
            width = self.n_thresholds if name == LE else 1
            spans[name] = slice(start, start + width)
            start += width
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "_spans", spans)
        object.__setattr__(self, "_width", start)

    def __len__(self) -> int:
        return self._width

    def __contains__(self, name: object) -> bool:
        return name in self._spans

    def __getitem__(self, name: str) -> int:
        """The column of a one-column field."""
        span = self.span(name)
        if name == LE:
            raise KeyError(f"{LE!r} spans {self.n_thresholds} columns: use span({LE!r})")
        return span.start

    def span(self, name: str) -> slice:
        """The columns of ``name`` as a slice (one column, or every threshold count)."""
        try:
            return self._spans[name]
        except KeyError:
            raise KeyError(f"no column {name!r}; the columns are {self.fields}") from None

    def indices(self, *names: str) -> list[int]:
        """Every column of ``names``, in that order."""
        return [i for name in names for i in range(*self.span(name).indices(self._width))]


def stack_row(
    fields: Sequence[str],
    values: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    dim: int = 0,
) -> torch.Tensor:
    """``torch.stack`` of the tensors in ``values`` along ``dim``, in the order of ``fields``;
    a field mapped to a sequence (the threshold counts) contributes each of its tensors. 0-d
    values give a row; ``(P,)`` values stacked along ``dim=1`` give ``P`` rows."""
    parts: list[torch.Tensor] = []
    for name in fields:
        value = values[name]
        if isinstance(value, torch.Tensor):
            parts.append(value)
        else:
            parts.extend(value)
    return torch.stack(parts, dim)


def assign(
    dst: torch.Tensor,
    dst_cols: Columns,
    src: torch.Tensor,
    src_cols: Columns,
    names: Iterable[str],
) -> torch.Tensor:
    """Copy the columns ``names`` of ``src`` (last dimension in ``src_cols``) into ``dst``
    (last dimension in ``dst_cols``); returns ``dst``. Rows (leading dimensions) must match."""
    for name in names:
        dst[..., dst_cols.span(name)] = src[..., src_cols.span(name)]
    return dst


@dataclass(frozen=True)
class Summary:
    """Finalised statistics of one group (plain Python numbers)."""

    count: int
    nonfinite: int
    sum: float
    sum_sq: float
    sum_abs: float
    max_abs: float
    max: float
    min: float
    le: dict[float, int]
    extra: dict[str, float]

    @property
    def norm_l2(self) -> float:
        return math.sqrt(self.sum_sq)

    @property
    def norm_l1(self) -> float:
        return self.sum_abs

    @property
    def norm_max(self) -> float:
        return self.max_abs

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        mean = self.sum / self.count
        return math.sqrt(max(self.sum_sq / self.count - mean * mean, 0.0))

    def fraction_le(self, t: float) -> float:
        """Fraction of all values (non-finite included in the denominator) with abs(x) <= t."""
        total = self.count + self.nonfinite
        return self.le[t] / total if total else 0.0

    def five_numbers(self) -> dict[str, float]:
        """``norm_l2, norm_l1, norm_max, mean, std, min, max`` as floats."""
        return {
            "norm_l2": self.norm_l2,
            "norm_l1": self.norm_l1,
            "norm_max": self.norm_max,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
        }


#: The maxima of every :class:`Layout`.
MAXES = Columns(("max_abs", "max", "neg_min"))


@dataclass(frozen=True)
class Layout:
    """The columns of :class:`~.stats.StreamingStats`' rows (see module docstring).

    Args:
        thresholds: the thresholds of the counts, in column order (ascending).
        extras: names of the caller-defined sums, after the threshold counts.
    """

    thresholds: tuple[float, ...]
    extras: tuple[str, ...] = ()
    moments: Columns = field(init=False, compare=False)
    sums: Columns = field(init=False, compare=False)
    maxes: Columns = field(init=False, compare=False, default=MAXES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "extras", tuple(self.extras))
        n = len(self.thresholds)
        reserved = set(BASE_SUMS) | {LE}
        clash = [e for e in self.extras if e in reserved]
        if clash:
            raise ValueError(f"extra sums {clash} reuse reserved names {sorted(reserved)}")
        object.__setattr__(self, "moments", Columns(MOMENTS, n))
        object.__setattr__(self, "sums", Columns((*MOMENTS, *self.extras), n))

    def le(self, t: float) -> int:
        """The column of the count ``abs(x) <= t``."""
        return self.sums.span(LE).start + self.thresholds.index(float(t))

    def new_sums(
        self, rows: int | None = None, extras: bool = False, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """float64 zeros for one row (``rows=None``) or ``rows`` rows of :attr:`moments` (of
        :attr:`sums` with ``extras``)."""
        width = len(self.sums if extras else self.moments)
        shape = (width,) if rows is None else (rows, width)
        return torch.zeros(shape, dtype=torch.float64, device=device)

    def new_maxes(
        self, rows: int | None = None, fill: float = -math.inf, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One row (``rows=None``) or ``rows`` rows of maxima filled with ``fill`` (float64)."""
        shape = (len(self.maxes),) if rows is None else (rows, len(self.maxes))
        return torch.full(shape, fill, dtype=torch.float64, device=device)

    def extra_columns(self, extras: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The extra sums given by name as columns in :attr:`extras` order (``(rows, E)``, or
        ``(E,)`` for 0-d values); names not given are 0, unknown names a :class:`ValueError`."""
        unknown = sorted(set(extras) - set(self.extras))
        if unknown:
            raise ValueError(f"unknown extra sums {unknown}; this layout has {list(self.extras)}")
        zero = None
        parts = []
        for name in self.extras:
            value = extras.get(name)
            if value is None:
                if zero is None:
                    zero = torch.zeros(like.shape[:-1], dtype=like.dtype, device=like.device)
                value = zero
            parts.append(value.to(like))
        return torch.stack(parts, dim=-1)

    def summary(self, sums: Sequence[float], maxes: Sequence[float]) -> Summary:
        """The :class:`Summary` of one group's rows (plain floats in :attr:`sums` and
        :attr:`maxes` columns); the extremes of a group without finite values are 0."""
        s, m = self.sums, self.maxes
        count = int(sums[s["count"]])
        empty = count == 0
        return Summary(
            count=count,
            nonfinite=int(sums[s["nonfinite"]]),
            sum=sums[s["sum"]],
            sum_sq=sums[s["sum_sq"]],
            sum_abs=sums[s["sum_abs"]],
            max_abs=0.0 if empty else maxes[m["max_abs"]],
            max=0.0 if empty else maxes[m["max"]],
            min=0.0 if empty else -maxes[m["neg_min"]],
            le={t: int(c) for t, c in zip(self.thresholds, sums[s.span(LE)])},
            extra={name: sums[s[name]] for name in self.extras},
        )
