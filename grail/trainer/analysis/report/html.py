"""Self-contained HTML reports: a checkpoint diff (``metrics.json``) or a JSONL training log.

One file, no external resource: CSS inline, figures as base64 PNG (:mod:`.plots`, which
needs the ``plot`` extra). Each report opens with a table that says in words what the numbers mean
(:mod:`.text`), then the figures with a caption each, the notes, and every metric.

Diff report figures: changed ratio vs threshold; per-layer x component heatmaps of mean |dW| and of
the changed ratio (with ``--per-layer``); output KL vs kept fraction for the magnitude and random
masks and, with the low-rank metrics, LoRA truncation vs a magnitude mask of equal parameter budget
(with ``--prompts``); the share of update energy kept by rank r (with the low-rank metrics); the
share of update energy inside the base's top-k principal block against k, update vs random, per
component (with the principal metrics).

Run report figures: one grid of time series per metric family (keys that differ only by a
threshold or kept-fraction label share a panel; random/DARE baselines are dashed) and, when the
log has per-layer keys, a layer x step heatmap of mean |dW|.

Example:
    >>> records = [{"step": s, "time": 0.0, "metrics": {"param_change/norm_l2": 1.0 / s}}
    ...            for s in (10, 20)]
    >>> html = render_run_report(records, "run.jsonl")
    >>> html.startswith("<!DOCTYPE html>"), html.count("<img"), "From step 10 to step 20" in html
    (True, 1, True)
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import plots
from .text import diff_summary, number, run_summary

__all__ = ["render_diff_report", "render_run_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.9em}
td,th{border-bottom:1px solid #eee;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6} td.v{font-variant-numeric:tabular-nums;min-width:9em}
td:first-child{width:16%} details{margin-top:1em}
figure{margin:1.2em 0} figure img{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555} code{font-size:.9em} .meta{color:#666;font-size:.85em}
"""

_LABEL = re.compile(r"^(?P<base>.+?)_at_(?P<label>.+?)(?P<variant>_random|_dare)?$")


def _e(text: Any) -> str:
    return html.escape(str(text))


def _page(title: str, meta: list[str], sections: list[str]) -> str:
    lines = "".join(f"<div>{m}</div>" for m in meta)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><div class='meta'>{lines}</div>{''.join(sections)}</body></html>\n"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], value_col: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f"<td class='v'>{_e(c)}</td>" if i == value_col else f"<td>{_e(c)}</td>"
            for i, c in enumerate(r)
        ) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(uri: str, alt: str, caption: str) -> str:
    return (f"<figure><img src='{uri}' alt='{_e(alt)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _all_metrics(metrics: Mapping[str, float | None]) -> str:
    rows = [(k, number(v)) for k, v in sorted(metrics.items())]
    return (f"<details><summary>All {len(rows)} metrics</summary>"
            f"{_table(['key', 'value'], rows)}</details>")


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


# --- diff -----------------------------------------------------------------------------------
def _sparse_panels(m: Mapping[str, float | None]) -> list[tuple[str, str, Any]]:
    mag, rnd = [], []
    for key, kl in m.items():
        match = _LABEL.match(key)
        if not key.startswith("sparse/kl_at_") or not match or match["variant"]:
            continue
        if match["label"].startswith("budget_"):
            continue
        kept = m.get(f"sparse/kept_ratio_at_{match['label']}")
        if kept is not None and kl is not None:
            mag.append((kept, kl))
            rnd.append((kept, m.get(f"{key}_random")))
    panels = []
    if mag:
        rnd = [p for p in rnd if p[1] is not None]
        panels.append(("All parameters", "fraction of entries kept",
                       {"magnitude mask": mag, "random mask": rnd}))
    lora, equal = [], []
    for key, kl in m.items():
        hit = re.match(r"^lowrank/kl_at_r(\d+)$", key)
        ratio = m.get(f"lowrank/param_ratio_at_r{hit[1]}") if hit else None
        if hit and kl is not None and ratio is not None:
            lora.append((min(ratio, 1.0), kl))
            equal.append((min(ratio, 1.0), m.get(f"sparse/kl_at_budget_r{hit[1]}")))
    if lora:
        panels.append(("Weight matrices, equal parameter budget",
                       "budget / entries of the matrices",
                       {"low-rank truncation": lora,
                        "magnitude mask": [p for p in equal if p[1] is not None]}))
    return panels


def _energy(m: Mapping[str, float | None]) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for key, v in m.items():
        hit = re.match(r"^lowrank/(?:component/(?P<c>.+)/)?energy_at_r(?P<r>\d+)$", key)
        if hit and v is not None:
            curves.setdefault(hit["c"] or "all matrices", []).append((int(hit["r"]), v))
    ordered = {"all matrices": curves.pop("all matrices", [])} if "all matrices" in curves else {}
    ordered.update(sorted(curves.items()))
    return ordered


def _principal(m: Mapping[str, float | None]) -> dict[str, list[tuple[int, Any, Any]]]:
    """``group -> [(k, energy_in_top{k}, its random value)]`` from the ``principal/*`` keys."""
    panels: dict[str, list[tuple[int, Any, Any]]] = {}
    for key, v in m.items():
        hit = re.match(r"^principal/(?:component/(?P<c>.+)/)?energy_in_top(?P<r>\d+)$", key)
        if hit and v is not None:
            panels.setdefault(hit["c"] or "all matrices", []).append(
                (int(hit["r"]), v, m.get(f"{key}_random")))
    ordered = {"all matrices": panels.pop("all matrices")} if "all matrices" in panels else {}
    ordered.update(sorted(panels.items()))
    return ordered


def render_diff_report(result: Mapping[str, Any]) -> str:
    """The HTML report of a ``metrics.json`` document (see module docstring)."""
    m: dict[str, float | None] = dict(result["metrics"])
    figures = []
    curve = result.get("threshold_curve")
    if curve:
        bf16 = m.get("param_change/bf16_unchanged_ratio")
        figures.append(_figure(
            plots.threshold_curve(curve["thresholds"], curve["changed_ratio"],
                                  None if bf16 is None else 1.0 - bf16,
                                  result.get("config", {}).get("param_change_thresholds", [])),
            "changed ratio vs threshold",
            "Fraction of entries whose update |dW| exceeds a threshold T. Dashed: entries whose "
            "stored value differs at all; dotted: entries that still differ after rounding both "
            "checkpoints to bf16. Vertical lines: the thresholds of the metrics.",
        ))
    grid = result.get("layer_component") or {}
    if result.get("arguments", {}).get("per_layer", True) and grid.get("layers"):
        figures.append(_figure(
            plots.heatmap(grid["layers"], grid["components"], grid["mean_abs_delta"],
                          "mean |dW|", log=True),
            "mean |dW| per layer and component",
            "Mean absolute update per layer (rows) and component (columns), log colour scale. "
            "'other' collects parameters outside the repeated blocks (embeddings, final norm, "
            "output head).",
        ))
        figures.append(_figure(
            plots.heatmap(grid["layers"], grid["components"], grid["changed_ratio"],
                          "fraction of entries changed", limits=(0.0, 1.0)),
            "changed ratio per layer and component",
            "Fraction of entries whose stored value changed, per layer and component.",
        ))
    panels = _sparse_panels(m)
    if panels:
        figures.append(_figure(
            plots.kl_vs_kept(panels), "KL vs kept fraction",
            "Output divergence of the tuned model from the base plus a partial update, on the "
            "prompts. Left: keep the largest entries (magnitude) or the same number at random. "
            "Right: a rank-r truncation of every weight-matrix update (LoRA) against keeping the "
            "same number of largest entries in those matrices. Lower is closer to the tuned model.",
        ))
    energy = _energy(m)
    if energy:
        figures.append(_figure(
            plots.energy_curves(energy), "singular-value energy",
            "Share of the update's squared Frobenius norm kept by the top-r singular values of "
            "each weight-matrix update (weighted over matrices), overall and per component. A "
            "curve that reaches 1 at small r means a low-rank update would reproduce it.",
        ))
    principal = _principal(m)
    if principal:
        figures.append(_figure(
            plots.principal_energy(principal), "update energy in the principal block",
            "Share of the update's squared Frobenius norm inside the top-k singular block "
            "U_k^T dW V_k of each BASE weight matrix (weighted over matrices), against k, overall "
            "and per component; dashed: the share an isotropic random update of the same size "
            "would have, k^2/(mn). Above the dashed line the update concentrates on the "
            "principal directions of the weights; at or below it, it avoids them.",
        ))
    inputs = result.get("inputs", {})
    meta = []
    for side in ("base", "tuned"):
        info = inputs.get(side, {})
        files = info.get("files", [])
        digest = ", ".join(f"{f['file']} sha256 {f['sha256'][:12]}" for f in files if "sha256" in f)
        if len(files) > 2:
            digest = f"{len(files)} files (SHA-256 in metrics.json)"
        meta.append(f"{side.upper()}: <code>{_e(info.get('path', '?'))}</code> "
                    f"({_e(info.get('format', '?'))}) {_e(digest)}")
    v = result.get("versions", {})
    meta.append(_e(", ".join(f"{k} {val}" for k, val in v.items() if val)))
    summary = _table(["quantity", "value", "what it means"], diff_summary(result))
    sections = [f"<h2>Summary</h2>{summary}", "<h2>Figures</h2>", *figures,
                _notes(result.get("notes", [])), f"<h2>Metrics</h2>{_all_metrics(m)}"]
    return _page("Checkpoint diff", meta, sections)


# --- training run ---------------------------------------------------------------------------
def _series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        for key, value in rec.get("metrics", {}).items():
            if isinstance(value, (int, float)) and value is not None:
                out.setdefault(key, []).append((float(rec["step"]), float(value)))
    return out


def _panels(
    series: Mapping[str, list[tuple[float, float]]], family: str
) -> list[tuple[str, Any, bool]]:
    grouped: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, points in sorted(series.items()):
        name = key.split("/", 1)[1]
        hit = _LABEL.match(name)
        if hit:
            grouped.setdefault(hit["base"], {})[hit["label"] + (hit["variant"] or "")] = points
        else:
            grouped.setdefault(name, {})[name] = points
    panels = []
    for title, lines in grouped.items():
        positive = all(y > 0 for pts in lines.values() for _, y in pts if math.isfinite(y))
        logy = positive and any(title.startswith(p) for p in ("kl", "mse", "norm", "relative"))
        panels.append((f"{family}/{title}", lines, logy))
    return panels


def render_run_report(records: Sequence[Mapping[str, Any]], source: str) -> str:
    """The HTML report of a training run logged as JSON lines (see module docstring)."""
    series = _series(records)
    top = {k: v for k, v in series.items() if k.count("/") == 1}
    families: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, points in top.items():
        families.setdefault(key.split("/", 1)[0], {})[key] = points
    figures = []
    for family, keys in families.items():
        figures.append(_figure(
            plots.small_multiples(_panels(keys, family)), f"{family} over training",
            f"{family}/* at each measurement step (dashed: random or DARE baselines).",
        ))
    layers: dict[str, dict[float, float]] = {}
    for key, points in series.items():
        hit = re.match(r"^param_change/(layer_\d+|.+\.layer_\d+)/mean_abs_delta$", key)
        if hit:
            layers[hit[1]] = dict(points)
    if layers:
        steps = sorted({s for pts in layers.values() for s in pts})[-60:]
        names = sorted(layers, key=lambda n: [int(p) if p.isdigit() else p
                                              for p in re.split(r"(\d+)", n)])
        figures.append(_figure(
            plots.heatmap(names, [f"{s:g}" for s in steps],
                          [[layers[n].get(s) for s in steps] for n in names], "mean |dW|",
                          log=True),
            "mean |dW| per layer over training",
            "Mean absolute update of each layer (rows) per measurement interval (columns: step).",
        ))
    last = records[-1]["metrics"] if records else {}
    meta = [f"Source: <code>{_e(source)}</code>, {len(records)} measurements"]
    summary = _table(["quantity", "value", "what it means"], run_summary(records))
    sections = [f"<h2>Summary</h2>{summary}", "<h2>Figures</h2>", *figures,
                f"<h2>Last measurement</h2>{_all_metrics(last)}"]
    return _page("Training run analysis", meta, sections)
