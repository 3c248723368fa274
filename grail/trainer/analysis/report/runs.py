"""The report of one training run, or of several overlaid on shared axes (``grail-analysis plot``).

Order of the page:

1. **Headline** (:mod:`.headline`): cards with the last values, then the headline curves.
2. **In words**: the summary table of each run (:func:`.text.run_summary`).
3. **One section per metric family** (:data:`.text.FAMILY_ORDER` first, then alphabetical),
   each with its "how to read this" caption, a grid of the series that vary
   (:mod:`.series`), the layer x step heatmap of ``mean_abs_delta`` when the family has one
   (one per run), and a table of the constant series, one row each.
4. **Last measurement**: every key's last value (one column per run).
5. The data behind the curves as JSON (``<script type="application/json" id="grail-runs">``):
   ``{"runs": [{"label", "source", "series": {key: [[step, value], ...]}}]}`` for every key drawn
   as a line, headline included; a key a run did not log is missing from its ``series``; a NaN
   value is ``null``.

Several runs: one colour per run, random/DARE baselines dashed/dash-dotted, step ranges as each
run logged them, and a run without a key named in the legend ("b: not logged") rather than drawn.

Example:
    >>> records = [{"step": s, "time": 0.0, "metrics": {"param_change/relative_norm": 1.0 / s,
    ...             "param_change/nonfinite_count": 0.0}} for s in (10, 20)]
    >>> html = render_run_report(records, "run.jsonl")
    >>> html.index("id='headline'") < html.index("id='family-param_change'")
    True
    >>> "0 at every step (2 measurements)" in html
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import headline, plots
from .page import cards, data_block, details, e, figure, page, section, table
from .series import Run, drawn_as_line, fold_text, is_constant, layer_grid, line_panels, root_family
from .text import FAMILY_ORDER, family_reading, family_title, number, run_summary

__all__ = ["render_run_report", "render_runs_report"]


def render_run_report(records: Sequence[Mapping[str, Any]], source: str) -> str:
    """The HTML report of one training run logged as JSON lines (see module docstring)."""
    return render_runs_report([Run(Path(source).stem or source, source, records)])


def render_runs_report(runs: Sequence[Run]) -> str:
    """The HTML report of one or more runs (labels must be distinct; see module docstring)."""
    if not runs:
        raise ValueError("render_runs_report needs at least one run")
    if len({r.label for r in runs}) != len(runs):
        raise ValueError(f"run labels must be distinct: {[r.label for r in runs]}")
    many = len(runs) > 1
    keys = list(dict.fromkeys(k for r in runs for k in r.series))
    sections = [_headline(runs), _summary(runs)]
    families: dict[str, list[str]] = {}
    for key in keys:
        families.setdefault(root_family(key), []).append(key)
    order = [f for f in FAMILY_ORDER if f in families]
    order += sorted(f for f in families if f not in FAMILY_ORDER)
    sections += [_family(name, families[name], runs) for name in order]
    sections.append(_last(runs, keys))
    sections.append(data_block("grail-runs", {"runs": [
        {"label": r.label, "source": r.source,
         "series": {k: [list(p) for p in pts] for k, pts in r.series.items()
                    if drawn_as_line(k)}}
        for r in runs
    ]}))
    meta = [f"{'Runs' if many else 'Source'}: "
            + "; ".join(f"<code>{e(r.source)}</code> ({e(r.label) + ', ' if many else ''}"
                        f"{len(r.records)} measurements)" for r in runs)]
    title = ("Training runs compared: " + ", ".join(r.label for r in runs) if many
             else "Training run analysis")
    return page(title, meta, sections)


def _headline(runs: Sequence[Run]) -> str:
    chosen = headline.entries([set(r.series) for r in runs])
    if not chosen:
        return section("headline", "Headline", "", [
            "<p>None of the headline metrics (update size, unchanged entries, sparse KL, KL to "
            "base) is in the log.</p>"])
    body = [cards(headline.cards(chosen, [(r.label, r.last()) for r in runs]))]
    body.append(figure(
        plots.line_panels(headline.panels(chosen, runs), ncols=len(chosen)), "headline curves",
        "The headline quantities at each measurement step"
        + (" (one colour per run)." if len(runs) > 1 else "."),
        [k for entry in chosen for k, _, _ in entry.lines if any(k in r.series for r in runs)],
    ))
    return section("headline", "Headline", "the four numbers that answer whether this update "
                   "is small, sparse, and reproducible by a sparse mask; the last values first.",
                   body)


def _summary(runs: Sequence[Run]) -> str:
    if len(runs) == 1:
        body = [table(["quantity", "value", "what it means"], run_summary(runs[0].records))]
    else:
        body = [details(r.label, table(["quantity", "value", "what it means"],
                                       run_summary(r.records)), open_=True) for r in runs]
    return section("summary", "In words", "", body)


def _family(name: str, keys: Sequence[str], runs: Sequence[Run]) -> str:
    lines = [k for k in keys if drawn_as_line(k)]
    folded = [k for k in lines if all(is_constant(r.series[k]) for r in runs if k in r.series)]
    varying = [k for k in lines if k not in folded]
    body = []
    if varying:
        panels = plots.line_panels(line_panels(runs, varying))
        body.append(figure(panels, f"{name} over training",
                           f"{name}/* series that change over the run"
                           + (", one colour per run" if len(runs) > 1 else "")
                           + " (dashed: random baselines; dash-dotted: DARE).", sorted(varying)))
    for run in runs:
        grid = layer_grid(run, name)
        if grid is not None:
            layers, steps, values = grid
            body.append(figure(
                plots.heatmap(layers, [f"{s:g}" for s in steps], values, "mean |dW|", log=True),
                f"{name} mean |dW| per layer",
                f"{run.label + ': ' if len(runs) > 1 else ''}mean absolute update of each layer "
                f"(rows) at each measurement step (columns), {name}/layer_*/mean_abs_delta."))
    if folded:
        rows = [(k, _fold(k, runs)) for k in folded]
        body.append("<p class='how'>Constant over the run, so not plotted:</p>"
                    + table(["key", "value"], rows))
    hidden = len(keys) - len(lines)
    if hidden:
        body.append(f"<p class='how'>{hidden} per-layer and per-component series are listed "
                    "under Last measurement.</p>")
    return section(f"family-{name}", family_title(name), family_reading(name), body)


def _fold(key: str, runs: Sequence[Run]) -> str:
    if len(runs) == 1:
        return fold_text(runs[0].series[key])
    firsts = {number(r.series[key][0][1]) if key in r.series else None for r in runs}
    if len(firsts) == 1 and None not in firsts:
        return f"{firsts.pop()} at every step of every run"
    return "; ".join(f"{r.label}: " + (fold_text(r.series[key]) if key in r.series
                                       else "not logged") for r in runs)


def _last(runs: Sequence[Run], keys: Sequence[str]) -> str:
    lasts = [r.last() for r in runs]
    rows = [[k, *(number(m[k]) if k in m else "not logged" for m in lasts)] for k in sorted(keys)]
    header = ["key", *(r.label for r in runs)] if len(runs) > 1 else ["key", "value"]
    return section("last", "Last measurement", "", [
        details(f"All {len(keys)} metrics, last value of each", table(header, rows))])
