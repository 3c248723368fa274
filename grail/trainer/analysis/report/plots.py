"""The report's figures, each returned as a ``data:image/png;base64,...`` URI.

matplotlib is imported only here and only when a figure is drawn (``pip install
'grail-analysis[plot]'``); figures are built on :class:`matplotlib.figure.Figure` with the Agg
canvas, so no pyplot state, GUI backend or display is involved.

Example:
    >>> uri = threshold_curve([0.0, 1e-6, 1e-3], [0.9, 0.5, 0.01])
    >>> uri.startswith("data:image/png;base64,")
    True
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Line",
    "Panel",
    "attribution_bars",
    "energy_curves",
    "heatmap",
    "kl_vs_kept",
    "line_panels",
    "principal_energy",
    "require_matplotlib",
    "threshold_curve",
]

Series = Mapping[str, Sequence[tuple[float, float]]]
_STYLES = {"solid": "-", "dashed": "--", "dashdot": "-.", "dotted": ":"}


@dataclass(frozen=True)
class Line:
    """One time series of a panel: ``points`` are ``(step, value)``; ``color`` indexes the
    palette (``C0``, ``C1``, ...); ``style`` is ``solid``, ``dashed`` (random baselines),
    ``dashdot`` (DARE baselines) or ``dotted``."""

    label: str
    points: Sequence[tuple[float, float]]
    color: int = 0
    style: str = "solid"


@dataclass(frozen=True)
class Panel:
    """One plot of :func:`line_panels`; ``absent`` names the runs that did not log it;
    ``percent`` labels the y axis in percent (the values are fractions)."""

    title: str
    lines: Sequence[Line]
    logy: bool = False
    absent: Sequence[str] = field(default_factory=tuple)
    percent: bool = False


def require_matplotlib() -> Any:
    """The ``matplotlib.figure.Figure`` class; ImportError naming the extra if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the report needs matplotlib: pip install 'grail-analysis[plot]'"
        ) from None
    return Figure


def _figure(width: float, height: float) -> Any:
    return require_matplotlib()(figsize=(width, height), layout="constrained")


def _uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _positive(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if x > 0 and y is not None and math.isfinite(y) and y > 0]


def threshold_curve(
    thresholds: Sequence[float],
    changed: Sequence[float],
    bf16_changed: float | None = None,
    marks: Sequence[float] = (),
) -> str:
    """Fraction of entries with ``|dW| > T`` against ``T`` (log x); ``T = 0`` as a dashed line."""
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    pts = [(t, c) for t, c in zip(thresholds, changed, strict=True) if t > 0]
    ax.plot([t for t, _ in pts], [c for _, c in pts], marker=".", label="|dW| > T")
    zero = dict(zip(thresholds, changed, strict=True)).get(0.0)
    if zero is not None:
        ax.axhline(zero, color="C2", ls="--", lw=1, label=f"stored values differ ({zero:.1%})")
    if bf16_changed is not None:
        ax.axhline(bf16_changed, color="C3", ls=":", lw=1.2,
                   label=f"differ after bf16 rounding ({bf16_changed:.1%})")
    for t in marks:
        if t > 0:
            ax.axvline(t, color="0.8", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("threshold T on |dW|")
    ax.set_ylabel("fraction of entries changed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _uri(fig)


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    label: str,
    log: bool = False,
    limits: tuple[float, float] | None = None,
) -> str:
    """Rows x columns colour map; empty cells (None) are left blank; ``limits`` fixes the scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.array([[np.nan if v is None else float(v) for v in r] for r in values], dtype=float)
    fig = _figure(min(2.5 + 0.55 * len(cols), 16), min(1.5 + 0.28 * len(rows), 22))
    ax = fig.add_subplot()
    positive = data[np.isfinite(data) & (data > 0)]
    norm = None
    if log and positive.size:
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
        data = np.where(data > 0, data, np.nan)
    vmin, vmax = limits if limits is not None and norm is None else (None, None)
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", norm=norm,
                      vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    if len(rows) * len(cols) <= 120:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(data[i, j]):
                    bright = image.norm(data[i, j]) > 0.6  # dark text on the yellow end
                    ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", fontsize=6,
                            color="black" if bright else "white")
    fig.colorbar(image, ax=ax, label=label)
    return _uri(fig)


def kl_vs_kept(panels: Sequence[tuple[str, str, Series]]) -> str:
    """One log-log panel per ``(title, x label, {series: [(kept, kl), ...]})``."""
    fig = _figure(5.2 * len(panels), 3.8)
    for k, (title, xlabel, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for i, (name, points) in enumerate(series.items()):
            pts = sorted(_positive(points))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=4, label=name, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KL(tuned || masked), nats/token")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    return _uri(fig)


def energy_curves(curves: Series) -> str:
    """Share of update energy kept by rank r (log2 x), one line per group."""
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(curves.items()):
        pts = sorted((r, e) for r, e in points if e is not None and math.isfinite(e))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=name, lw=2.2 if i == 0 else 1,
                    color="black" if i == 0 else f"C{(i - 1) % 10}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("rank r")
    ax.set_ylabel("share of ||dW||_F^2 kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _uri(fig)


def line_panels(panels: Sequence[Panel], ncols: int = 3) -> str:
    """A grid of line plots of time series, one :class:`Panel` each.

    Non-finite values (and non-positive ones on a log axis) break a line instead of being
    dropped, so a gap reads as a gap; a run listed in ``absent`` gets a legend entry saying it
    did not log the key, and no line.
    """
    import numpy as np

    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = _figure(4.2 * ncols, 2.9 * nrows)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for line in panel.lines:
            pts = sorted(line.points)
            y = np.array([np.nan if v is None else float(v) for _, v in pts], dtype=float)
            y[~np.isfinite(y)] = np.nan
            if panel.logy:
                y[y <= 0] = np.nan
            if pts and np.isfinite(y).any():
                ax.plot([x for x, _ in pts], y, _STYLES[line.style], marker=".", ms=3,
                        lw=1.3, label=line.label, color=f"C{line.color % 10}")
        for name in panel.absent:
            ax.plot([], [], " ", label=f"{name}: not logged")
        if panel.logy and ax.lines:
            ax.set_yscale("log")
        if panel.percent:
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel.lines) + len(panel.absent) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _uri(fig)


def attribution_bars(
    labels: Sequence[str],
    kl_without: Sequence[float | None],
    update_share: Sequence[float | None],
    kl_total: float | None = None,
) -> str:
    """Per group, side by side on one group axis: the KL lost without the group's update
    (dashed: the KL of the whole update; "not measured" where it is missing) and the group's
    share of the squared update."""
    fig = _figure(9, min(1.4 + 0.26 * len(labels), 22))
    left, right = fig.subplots(1, 2, sharey=True)
    rows = list(range(len(labels)))

    def values(xs: Sequence[float | None]) -> list[float]:
        return [x if x is not None and math.isfinite(x) else 0.0 for x in xs]

    left.barh(rows, values(kl_without), color="C0")
    for row, kl in zip(rows, kl_without, strict=True):
        if kl is None or not math.isfinite(kl):  # beyond attribution_max_groups
            left.text(0, row, " not measured", va="center", fontsize=7, color="0.45")
    if kl_total is not None and math.isfinite(kl_total):
        left.axvline(kl_total, color="0.3", ls="--", lw=1, label="whole update")
        left.legend(fontsize=7, loc="lower right")
    left.set_xlabel("KL(tuned || without the group), nats/token", fontsize=8)
    right.barh(rows, values(update_share), color="C1")
    right.set_xlim(0, 1)
    right.set_xlabel("share of ||dW||^2", fontsize=8)
    left.set_yticks(rows, labels=list(labels), fontsize=7)
    left.invert_yaxis()
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(labelsize=7)
def principal_energy(panels: Mapping[str, Sequence[tuple[float, float, float | None]]]) -> str:
    """Share of the update's energy in the top-k principal block against k (log-log), update
    (solid) vs an isotropic random update (dashed): one panel per ``name -> [(k, share,
    random), ...]``, the first (all matrices) drawn first."""
    ncols = min(4, max(1, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(3.3 * ncols, 2.7 * nrows)
    for i, (name, points) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = sorted((k, e, r) for k, e, r in points if e is not None and math.isfinite(e))
        update = [(k, e) for k, e, _ in pts if e > 0]
        rnd = [(k, r) for k, _, r in pts if r is not None and math.isfinite(r) and r > 0]
        if update:
            ax.plot(*zip(*update, strict=True), marker="o", ms=3, color="C0", label="update")
        if rnd:
            ax.plot(*zip(*rnd, strict=True), "--", marker=".", ms=3, color="0.45",
                    label="random update")
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9, fontweight="bold" if i == 0 else "normal")
        ax.set_xlabel("k", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        if i == 0:
            ax.set_ylabel("share of ||dW||_F^2 in top-k block", fontsize=8)
            if ax.lines:
                ax.legend(fontsize=7)
    return _uri(fig)
