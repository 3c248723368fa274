"""Self-contained HTML reports: a checkpoint diff (``metrics.json``) and training runs.

One file, no external resource: CSS inline, figures as base64 PNG (:mod:`.plots`, which needs
the ``plot`` extra). The run report (one run or several overlaid) is :mod:`.runs`; this module
holds the diff report and re-exports both entry points.

Diff report, in order: the headline cards (:mod:`.headline`: update size, unchanged entries in
stored precision and in bf16, KL of the largest-k mask vs random at the same k, KL to base when
present), the summary in words (:mod:`.text`), then one section per metric family with its "how
to read this" caption, its figures and a collapsed table of its metrics, and the notes.
Figures: changed ratio vs threshold and per-layer x component heatmaps of mean |dW| and of the
changed ratio (``--per-layer``) under ``param_change``; output KL vs kept fraction for the
magnitude and random masks and, with the low-rank metrics, LoRA truncation vs a magnitude mask of
equal parameter budget under ``sparse`` (with ``--prompts``); the share of update energy kept by
rank r under ``lowrank``.; the share of
update energy inside the base's top-k principal block against k, update vs random, per component
under ``principal``. With ``--prompts`` an output-attribution section follows
(:mod:`.attribution`).

Example:
    >>> records = [{"step": s, "time": 0.0, "metrics": {"param_change/norm_l2": 1.0 / s}}
    ...            for s in (10, 20)]
    >>> html = render_run_report(records, "run.jsonl")
    >>> html.startswith("<!DOCTYPE html>"), html.count("<img"), "From step 10 to step 20" in html
    (True, 1, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..keys import format_budget, parse_key
from . import headline, plots
from .attribution import attribution_section
from .page import cards, details, e, figure, page, section, table
from .runs import render_run_report, render_runs_report
from .series import root_family
from .text import FAMILY_ORDER, diff_summary, family_reading, family_title, number, stored_dtype

__all__ = ["render_diff_report", "render_run_report", "render_runs_report"]


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"


def _sparse_panels(m: Mapping[str, float | None]) -> list[tuple[str, str, Any]]:
    mag, rnd = [], []
    for key, kl in m.items():
        parts = parse_key(key)
        if (parts is None or parts.family != "sparse" or parts.scope != "global"
                or parts.name != "kl" or parts.variant is not None
                or parts.label_kind not in ("threshold", "keep")):
            continue
        kept = m.get(parts.with_(name="kept_ratio").key)
        if kept is not None and kl is not None:
            mag.append((kept, kl))
            rnd.append((kept, m.get(parts.with_(variant="random").key)))
    panels = []
    if mag:
        rnd = [p for p in rnd if p[1] is not None]
        panels.append(("All parameters", "fraction of entries kept",
                       {"magnitude mask": mag, "random mask": rnd}))
    lora, equal = [], []
    for key, kl in m.items():
        parts = parse_key(key)
        if (parts is None or parts.family != "lowrank" or parts.scope != "global"
                or parts.name != "kl" or parts.label_kind != "rank" or parts.variant):
            continue
        ratio = m.get(parts.with_(name="param_ratio").key)
        if kl is not None and ratio is not None:
            budget = parts.with_(family="sparse", label=format_budget(int(parts.label_value or 0)))
            lora.append((min(ratio, 1.0), kl))
            equal.append((min(ratio, 1.0), m.get(budget.key)))
    if lora:
        panels.append(("Weight matrices, equal parameter budget",
                       "budget / entries of the matrices",
                       {"low-rank truncation": lora,
                        "magnitude mask": [p for p in equal if p[1] is not None]}))
    return panels


def _energy(m: Mapping[str, float | None]) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for key, v in m.items():
        parts = parse_key(key)
        if (parts is None or parts.family != "lowrank" or parts.name != "energy"
                or parts.label_kind != "rank" or parts.variant or v is None
                or parts.scope not in ("global", "component")):
            continue
        group = parts.group if parts.scope == "component" else "all matrices"
        curves.setdefault(str(group), []).append((parts.label_value or 0.0, v))
    ordered = {"all matrices": curves.pop("all matrices", [])} if "all matrices" in curves else {}
    ordered.update(sorted(curves.items()))
    return ordered


def _principal(m: Mapping[str, float | None]) -> dict[str, list[tuple[int, Any, Any]]]:
    """``group -> [(k, energy_in_top{k}, its random value)]`` from the ``principal/*`` keys."""
    panels: dict[str, list[tuple[int, Any, Any]]] = {}
    for key, v in m.items():
        parts = parse_key(key)
        if (parts is None or parts.family != "principal" or parts.name != "energy_in"
                or parts.label_kind != "top" or parts.variant or v is None
                or parts.scope not in ("global", "component")):
            continue
        group = str(parts.group) if parts.scope == "component" else "all matrices"
        random = m.get(parts.with_(variant="random").key)
        panels.setdefault(group, []).append((int(parts.label_value or 0), v, random))
    ordered = {"all matrices": panels.pop("all matrices")} if "all matrices" in panels else {}
    ordered.update(sorted(panels.items()))
    return ordered


def _param_change_figures(result: Mapping[str, Any], m: Mapping[str, float | None]) -> list[str]:
    figures = []
    curve = result.get("threshold_curve")
    if curve:
        bf16 = m.get("param_change/bf16_unchanged_ratio")
        figures.append(figure(
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
        figures.append(figure(
            plots.heatmap(grid["layers"], grid["components"], grid["mean_abs_delta"],
                          "mean |dW|", log=True),
            "mean |dW| per layer and component",
            "Mean absolute update per layer (rows) and component (columns), log colour scale. "
            "'other' collects parameters outside the repeated blocks (embeddings, final norm, "
            "output head).",
        ))
        figures.append(figure(
            plots.heatmap(grid["layers"], grid["components"], grid["changed_ratio"],
                          "fraction of entries changed", limits=(0.0, 1.0)),
            "changed ratio per layer and component",
            "Fraction of entries whose stored value changed, per layer and component.",
        ))
    return figures


def _figures(result: Mapping[str, Any], m: Mapping[str, float | None]) -> dict[str, list[str]]:
    """The figures of each family section."""
    out = {"param_change": _param_change_figures(result, m)}
    panels = _sparse_panels(m)
    if panels:
        out["sparse"] = [figure(
            plots.kl_vs_kept(panels), "KL vs kept fraction",
            "Output divergence of the tuned model from the base plus a partial update, on the "
            "prompts. Left: keep the largest entries (magnitude) or the same number at random. "
            "Right: a rank-r truncation of every weight-matrix update (LoRA) against keeping the "
            "same number of largest entries in those matrices. Lower is closer to the tuned model.",
        )]
    energy = _energy(m)
    if energy:
        out["lowrank"] = [figure(
            plots.energy_curves(energy), "singular-value energy",
            "Share of the update's squared Frobenius norm kept by the top-r singular values of "
            "each weight-matrix update (weighted over matrices), overall and per component. A "
            "curve that reaches 1 at small r means a low-rank update would reproduce it.",
        )]
    principal = _principal(m)
    if principal:
        out["principal"] = [figure(
            plots.principal_energy(principal), "update energy in the principal block",
            "Share of the update's squared Frobenius norm inside the top-k singular block "
            "U_k^T dW V_k of each BASE weight matrix (weighted over matrices), against k, overall "
            "and per component; dashed: the share an isotropic random update of the same size "
            "would have, k^2/(mn). Above the dashed line the update concentrates on the "
            "principal directions of the weights; at or below it, it avoids them.",
        )]
    return out


def _meta(result: Mapping[str, Any]) -> list[str]:
    inputs = result.get("inputs", {})
    meta = []
    for side in ("base", "tuned"):
        info = inputs.get(side, {})
        files = info.get("files", [])
        digest = ", ".join(f"{f['file']} sha256 {f['sha256'][:12]}" for f in files if "sha256" in f)
        if len(files) > 2:
            digest = f"{len(files)} files (SHA-256 in metrics.json)"
        meta.append(f"{side.upper()}: <code>{e(info.get('path', '?'))}</code> "
                    f"({e(info.get('format', '?'))}) {e(digest)}")
    v = result.get("versions", {})
    meta.append(e(", ".join(f"{k} {val}" for k, val in v.items() if val)))
    return meta


def render_diff_report(result: Mapping[str, Any]) -> str:
    """The HTML report of a ``metrics.json`` document (see module docstring)."""
    m: dict[str, float | None] = dict(result["metrics"])
    chosen = headline.entries([set(m)])
    sections = [section("headline", "Headline", "the numbers that answer whether this update is "
                        "small, sparse, and reproducible by a sparse mask.",
                        [cards(headline.cards(chosen, [("diff", m)], stored_dtype(result),
                                              from_base=True))])]
    sections.append(section("summary", "In words", "", [
        table(["quantity", "value", "what it means"], diff_summary(result))]))
    families: dict[str, list[str]] = {}
    for key in sorted(m):
        families.setdefault(root_family(key), []).append(key)
    figures = _figures(result, m)
    order = [f for f in FAMILY_ORDER if f in families or figures.get(f)]
    order += sorted(f for f in families if f not in FAMILY_ORDER)
    for name in order:
        keys = families.get(name, [])
        body = list(figures.get(name, []))
        if keys:
            rows = [(k, number(m[k])) for k in keys]
            body.append(details(f"{len(keys)} {name} metrics", table(["key", "value"], rows)))
        sections.append(section(f"family-{name}", family_title(name), family_reading(name), body))
    sections.append(attribution_section(result))
    sections.append(_notes(list(result.get("notes", []))))
    return page("Checkpoint diff", _meta(result), sections)
