"""Training runs as time series: which series are drawn, how they share panels, which fold.

Everything here is plain data (no matplotlib); :mod:`.runs` turns it into HTML. Keys are read
with :func:`~grail.trainer.analysis.keys.parse_key` only.

Decisions where the design is silent:

* A ``null`` in the log (NaN) is a point whose value is NaN, drawn as a gap; a key that a run
  never logged is not a series of that run: it is *absent* (a legend entry says so), never zero.
* Drawn as lines: keys of the whole model (scope ``global``) and of an overlap reference.
  Per-layer and per-component series are too many for lines: the layer x step heatmap of
  ``mean_abs_delta`` shows the layers, and every key is in the last-measurement table.
* A series is *constant* when every value equals the first (NaN counts as equal to NaN); it is
  folded into one table row ("``param_change/nonfinite_count``: 0 at every step") instead of a
  plot, also when the run has a single measurement. With several runs a key is folded only when
  it is constant in every run that logs it.
* One run: keys that differ only by their label (threshold, kept fraction, rank) share a panel,
  one colour per label, the random/DARE baseline dashed/dash-dotted in its label's colour.
  Several runs: one colour per run, so a panel holds one label and every run's lines.

Example:
    >>> a = Run("a", "a.jsonl", [{"step": s, "metrics": {"x/n": 0.0, "x/kl_at_1e-06": s}}
    ...                          for s in (1, 2)])
    >>> sorted(a.series), is_constant(a.series["x/n"]), fold_text([(1, 0.0), (2, 0.0)])
    (['x/kl_at_1e-06', 'x/n'], True, '0 at every step (2 measurements)')
    >>> [p.title for p in line_panels([a], ["x/kl_at_1e-06"])]
    ['x/kl']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..keys import KeyParts, parse_key
from .plots import Line, Panel
from .text import number

__all__ = [
    "Points",
    "Run",
    "drawn_as_line",
    "fold_text",
    "is_constant",
    "layer_grid",
    "line_panels",
    "root_family",
]

Points = list[tuple[float, float]]
_LOG_NAMES = ("kl", "mse", "norm", "relative", "threshold")
_VARIANT_STYLE = {None: "solid", "random": "dashed", "dare": "dashdot"}


@dataclass(frozen=True)
class Run:
    """One training run: a label for the legend, where it was read from, its records."""

    label: str
    source: str
    records: Sequence[Mapping[str, Any]]
    series: dict[str, Points] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: dict[str, Points] = {}
        for rec in self.records:
            for key, value in rec.get("metrics", {}).items():
                v = math.nan if value is None else float(value)
                out.setdefault(key, []).append((rec["step"], v))
        object.__setattr__(self, "series", out)

    def last(self) -> dict[str, float]:
        """The last value logged for every key (a key's last record, not the run's)."""
        return {k: pts[-1][1] for k, pts in self.series.items()}


def root_family(key: str) -> str:
    """The section a key belongs to: its root family, or ``other`` outside the grammar."""
    parts = parse_key(key)
    return parts.root if parts else "other"


def drawn_as_line(key: str) -> bool:
    """Whether the run report draws ``key`` as a line (see module docstring)."""
    parts = parse_key(key)
    return parts is None or parts.scope in ("global", "reference")


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def is_constant(points: Sequence[tuple[float, float]]) -> bool:
    """Every value equals the first (NaN equal to NaN)."""
    return bool(points) and all(_same(v, points[0][1]) for _, v in points)


def fold_text(points: Sequence[tuple[float, float]]) -> str:
    """How a constant series reads in a table: ``0 at every step (3 measurements)``."""
    value = number(points[0][1])
    if len(points) == 1:
        return f"{value} at its only measurement (step {points[0][0]:g})"
    return f"{value} at every step ({len(points)} measurements)"


def _style(parts: KeyParts | None) -> str:
    return _VARIANT_STYLE.get(parts.variant if parts else None, "solid")


def _logy(parts: KeyParts | None, lines: Iterable[Line]) -> bool:
    if parts is None or not parts.name.startswith(_LOG_NAMES):
        return False
    values = [y for line in lines for _, y in line.points if math.isfinite(y)]
    return bool(values) and all(y > 0 for y in values)


def line_panels(runs: Sequence[Run], keys: Sequence[str]) -> list[Panel]:
    """The panels of ``keys`` (drawn, varying series) for one run or several overlaid."""
    many = len(runs) > 1
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        parts = parse_key(key)
        if parts is None:
            title = key
        elif many:
            title = parts.with_(variant=None).key
        else:
            title = parts.with_(label=None, variant=None).key
        groups.setdefault(title, []).append(key)
    panels = []
    for title, members in groups.items():
        lines: list[Line] = []
        labels: dict[str | None, int] = {}
        for key in members:
            parts = parse_key(key)
            tag = " ".join(t for t in (parts.label, parts.variant) if t) if parts else ""
            for i, run in enumerate(runs):
                points = run.series.get(key)
                if points is None:
                    continue
                if many:
                    name, color = " ".join(t for t in (run.label, parts and parts.variant) if t), i
                else:
                    label = parts.label if parts else None
                    color = labels.setdefault(label, len(labels))
                    name = tag or (parts.name if parts else key)
                lines.append(Line(name, points, color, _style(parts)))
        absent = [r.label for r in runs if many and not any(k in r.series for k in members)]
        panels.append(Panel(title, lines, _logy(parse_key(members[0]), lines), absent))
    return panels


def layer_grid(
    run: Run, family: str, name: str = "mean_abs_delta", max_steps: int = 60
) -> tuple[list[str], list[float], list[list[float | None]]] | None:
    """``(layers, steps, values)`` of ``{family}/layer_{i}/{name}`` over the last ``max_steps``
    measurement steps; None when the run has no such key."""
    layers: dict[str, dict[float, float]] = {}
    order: dict[str, tuple[str, int]] = {}  # trunk, then index: layer_2 before layer_10
    for key, points in run.series.items():
        parts = parse_key(key)
        if (parts and parts.scope == "layer" and parts.family == family and parts.name == name
                and parts.label is None and parts.variant is None and parts.group):
            layers[parts.group] = dict(points)
            index = parts.layer_index or 0
            order[parts.group] = (parts.group[: -len(f"layer_{index}")], index)
    if not layers:
        return None
    steps = sorted({s for pts in layers.values() for s in pts})[-max_steps:]
    names = sorted(layers, key=order.__getitem__)
    return names, steps, [[layers[n].get(s) for s in steps] for n in names]
