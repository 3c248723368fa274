"""The self-contained HTML report of ``grail-analysis overlap`` (its ``metrics.json``).

In order: one headline card per pair of runs (lift under the criterion, under the contrasting
view, of the largest updates), the summary in words (:func:`pair_sentences`), the pairwise matrix
of ``jaccard_lift``, one layer x component heatmap of the lift per pair (with per-layer
results), a table of every global metric per pair, the runs, and the notes.

Reading the lift: 1 means the two changed sets share as many entries as independent random sets
of the same densities would; above 1, more. Densities near 1 make every lift near 1, so the
sentences say so instead of reading a subnetwork into it; and because a set defined by bf16
rounding is decided by update size against weight magnitude, the contrast between the exact and
the bf16 view says whether the sharing survives rounding or is made by it.

Example:
    >>> g = {"density_a": 0.1, "density_b": 0.1, "jaccard": 0.1, "jaccard_random": 0.0526,
    ...      "jaccard_lift": 1.9, "sign_agreement": 0.9, "cosine": 0.4}
    >>> c = {"criterion": {"kind": "bf16_view", "text": "bf16-rounded value differs"},
    ...      "density_a": 0.1, "density_b": 0.1, "jaccard_lift": 1.02}
    >>> pair = {"a": "A", "b": "B", "global": g, "contrast": c}
    >>> print(pair_sentences(pair, {"kind": "exact"}, [])[0])  # doctest: +NORMALIZE_WHITESPACE
    A and B share 1.9× more changed weights than random sets of their densities would
    (10.0% and 10.0% changed; Jaccard 0.1 against 0.0526).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..keys import format_keep_ratio
from . import plots
from .headline import Card
from .page import cards, details, e, figure, page, section, table
from .text import number, pct

__all__ = ["lift_sentence", "pair_sentences", "render_overlap_report"]

DENSE = 0.99  # both sets above this density: any two sets overlap about as random ones
SAME = 0.1  # lifts within 10% read as "about the same"

Doc = Mapping[str, Any]


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _times(v: float | None) -> str:
    return f"{v:.2f}×" if _ok(v) else "n/a"


def lift_sentence(a: str, b: str, m: Mapping[str, Any]) -> str:
    """``"A and B share 2.1× more changed weights than random sets ... would (...)."``"""
    lift, da, db = m.get("jaccard_lift"), m.get("density_a"), m.get("density_b")
    if not _ok(lift):
        return f"{a} and {b}: no entry changed in either run, so there is no overlap to compare."
    detail = (f"{pct(da)} and {pct(db)} changed; Jaccard {number(m.get('jaccard'))} against "
              f"{number(m.get('jaccard_random'))}")
    if abs(lift - 1.0) < 0.05:
        how = "about as many changed weights as random sets of their densities would"
    elif lift > 1:
        how = f"{lift:.1f}× more changed weights than random sets of their densities would"
    else:
        how = f"{1 / lift:.1f}× fewer changed weights than random sets of their densities would"
    return f"{a} and {b} share {how} ({detail})."


def _dense(m: Mapping[str, Any]) -> bool:
    return min(m.get("density_a") or 0.0, m.get("density_b") or 0.0) > DENSE


def _contrast_reading(main: Mapping[str, Any], con: Mapping[str, Any], criterion: str) -> str:
    """How the lift under the contrasting view compares with the criterion's."""
    lift, clift = main.get("jaccard_lift"), con.get("jaccard_lift")
    kind = con.get("criterion", {}).get("kind")
    view = "the bf16 view" if kind == "bf16_view" else "exact changes"
    if not _ok(clift):
        return f"In {view} no entry changed."
    head = (f"In {view} ({pct(con.get('density_a'))} and {pct(con.get('density_b'))} changed) the "
            f"lift is {clift:.1f}×")
    same_sets = (con.get("density_a") == main.get("density_a")
                 and con.get("density_b") == main.get("density_b") and clift == lift)
    if same_sets:
        return head + ": the same sets (the checkpoints hold bf16 values)."
    bf16, exact = (con, main) if kind == "bf16_view" else (main, con)
    bf16_lift = bf16.get("jaccard_lift")
    if _dense(exact) and _ok(bf16_lift) and bf16_lift > 1 + SAME:
        return (head + ". The shared set exists only in the bf16 view: an entry changes there when "
                "its update is large against its bf16 spacing (small weights, large updates), so "
                "sets read in bf16 share weights through magnitude and update direction even "
                "though every weight moved.")
    if _ok(lift) and abs(clift - lift) <= SAME * max(lift, 1.0):
        if abs(lift - 1.0) < SAME and abs(clift - 1.0) < SAME:
            return head + " too: no more sharing than chance in either view."
        return head + ": about the same, so the sharing does not depend on the precision."
    if kind == "bf16_view" and _ok(lift) and clift < lift and clift < 1 + SAME:
        return (head + ": the sharing is among updates too small to survive bf16 rounding; what "
                "rounding lets through is shared no more than random sets would be.")
    if kind == "bf16_view" and clift > (lift or 0.0):
        return (head + ": rounding keeps the updates that are large against the weights' bf16 "
                "spacing, and those coincide more between the runs.")
    return head + f" (against {lift:.1f}× for {criterion})." if _ok(lift) else head + "."


def pair_sentences(pair: Doc, criterion: Mapping[str, Any], keeps: Sequence[float]) -> list[str]:
    """The summary of one pair in words: lift, contrast, signs, largest updates."""
    a, b, g = pair["a"], pair["b"], pair["global"]
    out = [lift_sentence(a, b, g)]
    if _dense(g):
        out.append("Nearly every weight changed in both runs, so the changed sets cannot single "
                   "out a subnetwork.")
    con = pair.get("contrast")
    if con:
        out.append(_contrast_reading(g, con, criterion.get("text", "the criterion")))
    sa, cos = g.get("sign_agreement"), g.get("cosine")
    if _ok(sa):
        out.append(f"Where both changed, the updates agree in sign on {pct(sa)} of the entries "
                   f"(50% for unrelated signs; {pct(1 - sa)} would conflict in a TIES merge); the "
                   f"cosine of the two updates is {number(cos)}.")
    for k in keeps:
        label = format_keep_ratio(k)
        j, jr = g.get(f"topk_jaccard_at_{label}"), g.get(f"topk_jaccard_at_{label}_random")
        if _ok(j) and _ok(jr) and jr:
            out.append(f"Their largest {pct(k)} of updates overlap {j / jr:.1f}× as much as random "
                       f"sets of that size would (Jaccard {number(j)}).")
            break
    return out


def _card(pair: Doc, keeps: Sequence[float], sentences: list[str]) -> Card:
    g, con = pair["global"], pair.get("contrast") or {}
    values = [f"lift {_times(g.get('jaccard_lift'))} (Jaccard {number(g.get('jaccard'))})"]
    if con:
        view = "bf16 view" if con.get("criterion", {}).get("kind") == "bf16_view" else "exact"
        values.append(f"{view}: lift {_times(con.get('jaccard_lift'))}")
    if keeps:
        label = format_keep_ratio(keeps[0])
        j, jr = g.get(f"topk_jaccard_at_{label}"), g.get(f"topk_jaccard_at_{label}_random")
        if _ok(j) and _ok(jr) and jr:
            values.append(f"top {pct(keeps[0])}: lift {_times(j / jr)}")
    return Card(f"{pair['a']} vs {pair['b']}", values, sentences[0])


def _matrix(doc: Doc) -> list[list[float | None]]:
    labels = list(doc["runs"])
    index = {lab: i for i, lab in enumerate(labels)}
    m: list[list[float | None]] = [[None] * len(labels) for _ in labels]
    for p in doc["pairs"]:
        i, j = index[p["a"]], index[p["b"]]
        m[i][j] = m[j][i] = p["global"].get("jaccard_lift")
    return m


def _figures(doc: Doc) -> list[str]:
    labels = list(doc["runs"])
    out = [figure(
        plots.heatmap(labels, labels, _matrix(doc), "Jaccard lift (1 = random)", log=True),
        "pairwise Jaccard lift",
        "Jaccard of the changed sets of each pair of runs divided by that of independent random "
        "sets of the same densities (log colour scale). 1 is what chance gives.",
    )]
    for p in doc["pairs"]:
        cells = p.get("cells")
        if not cells or not cells.get("layers"):
            continue
        out.append(figure(
            plots.heatmap(cells["layers"], cells["components"], cells["jaccard_lift"],
                          "Jaccard lift", log=True),
            f"Jaccard lift per layer and component, {p['a']} vs {p['b']}",
            f"{p['a']} vs {p['b']}: the lift of the changed sets in each layer (rows) and "
            "component (columns); 'other' collects parameters outside the repeated blocks. Blank: "
            "no entry changed in either run.",
        ))
    return out


def _metric_rows(pair: Doc) -> list[list[str]]:
    g = pair["global"]
    return [[k, number(v) if isinstance(v, (int, float)) or v is None else str(v)]
            for k, v in g.items()]


def _meta(doc: Doc) -> list[str]:
    inputs = doc.get("inputs", {})
    sides = [("BASE", inputs.get("base", {})), *inputs.get("runs", {}).items()]
    lines = []
    for name, info in sides:
        files = info.get("files", [])
        digest = ", ".join(f"sha256 {f['sha256'][:12]}" for f in files[:1] if "sha256" in f)
        if len(files) > 1:
            digest = f"{len(files)} files (SHA-256 in metrics.json)"
        lines.append(f"{e(name)}: <code>{e(info.get('path', '?'))}</code> "
                     f"({e(info.get('format', '?'))}) {e(digest)}")
    crit = doc.get("criterion", {})
    lines.append(f"Changed set: {e(crit.get('text', '?'))}; "
                 f"{doc.get('compared', {}).get('num_params', 0):,} entries compared.")
    v = doc.get("versions", {})
    lines.append(e(", ".join(f"{k} {val}" for k, val in v.items() if val)))
    return lines


def render_overlap_report(doc: Doc) -> str:
    """The HTML report of an overlap ``metrics.json`` document (see module docstring)."""
    keeps = list(doc.get("keep_ratios", []))
    crit = doc.get("criterion", {})
    said = [(p, pair_sentences(p, crit, keeps)) for p in doc["pairs"]]
    sections = [section(
        "headline", "Headline", "lift = Jaccard of the two changed sets / Jaccard of random sets "
        "of the same densities; 1 is chance.",
        [cards([_card(p, keeps, s) for p, s in said])],
    )]
    words = "".join(f"<p><b>{e(p['a'])} vs {e(p['b'])}.</b> {e(' '.join(s))}</p>"
                    for p, s in said)
    sections.append(section("summary", "In words", "", [words]))
    sections.append(section(
        "figures", "Where the changed sets overlap", "the lift per pair of runs, then per layer "
        "and component: where the runs changed the same weights more often than chance.",
        _figures(doc),
    ))
    tables = [details(f"{p['a']} vs {p['b']}: {len(p['global'])} metrics",
                      table(["metric", "value"], _metric_rows(p))) for p in doc["pairs"]]
    runs = [[lab, pct(r.get("density")), number(r.get("changed")), number(r.get("num_params")),
             r.get("path", "")] for lab, r in doc["runs"].items()]
    tables.append(table(["run", "density", "changed", "entries", "path"], runs))
    sections.append(section("metrics", "Metrics", "global numbers of every pair; per-layer and "
                            "per-component ones are in metrics.json.", tables))
    notes = list(doc.get("notes", []))
    if notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes)
                        + "</ul>")
    return page("Changed-set overlap across runs", _meta(doc), sections)
