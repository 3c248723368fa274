"""The attribution section of the diff report: which group's update the outputs depend on.

Reads the ``"attribution"`` table of ``metrics.json`` (written by ``grail-analysis diff
--prompts``; see :mod:`~grail.trainer.analysis.metrics.attribution` for the definitions) and
returns one self-contained HTML fragment: a short reading guide, a bar chart of ``kl_without``
and ``update_share`` per group side by side, and the table. A document without the table gives
``""``. Groups whose KLs were not measured (beyond ``attribution_max_groups``) read ``n/a``.

Example:
    >>> doc = {"attribution": {"kl_total": 0.2, "tokens": 40.0, "groups": [
    ...     {"group": "o_proj", "kind": "component", "kl_only": 0.01, "kl_without": 0.15,
    ...      "update_share": 0.1, "param_share": 0.05}]}}
    >>> html = attribution_section(doc)
    >>> html.count("<img"), "o_proj" in html, attribution_section({})
    (1, True, '')
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from . import plots
from .text import number, pct

__all__ = ["attribution_section"]

_COLUMNS = ("group", "kind", "update share", "entries share", "KL only", "KL without",
            "KL without / total")


def _e(text: Any) -> str:
    return html.escape(str(text))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rows(groups: Sequence[Mapping[str, Any]], total: float | None) -> list[list[str]]:
    return [
        [str(g["group"]), str(g["kind"]), pct(g.get("update_share")), pct(g.get("param_share")),
         number(g.get("kl_only")), number(g.get("kl_without")),
         number(_ratio(g.get("kl_without"), total))]
        for g in groups
    ]


def attribution_section(result: Mapping[str, Any]) -> str:
    """The section's HTML, or ``""`` when ``result`` holds no attribution table."""
    table = result.get("attribution") or {}
    groups = table.get("groups") or []
    if not groups:
        return ""
    total = table.get("kl_total")
    labels = [g["group"] if g["kind"] == "component" else f"{g['group']} (block)" for g in groups]
    uri = plots.attribution_bars(
        labels, [g.get("kl_without") for g in groups], [g.get("update_share") for g in groups],
        total,
    )
    head = "".join(f"<th>{_e(c)}</th>" for c in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td class='v'>{_e(c)}</td>" if i >= 2 else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in _rows(groups, total)
    )
    guide = (
        f"Output KL of the tuned model against the base plus one group's update (KL only) and "
        f"against the tuned model with that group's update dropped (KL without), mean over "
        f"{number(table.get('tokens'))} prompt tokens; the whole update gives "
        f"{number(total)} nats/token. KL only near 0 means the group carries the change by "
        "itself; KL without near 0 means its update does not matter to the outputs, however "
        "large its share of the update. Groups need not add up: the model is not linear in "
        "its weights."
    )
    return (
        "<h2>Output attribution</h2>"
        f"<p>{_e(guide)}</p>"
        f"<figure><img src='{uri}' alt='attribution per group'><figcaption>Left: KL lost "
        "without each group's update (dashed: the whole update). Right: the group's share of "
        "the squared update. Blocks are transformer layers.</figcaption></figure>"
        f"<table><tr>{head}</tr>{body}</table>"
    )
