"""HTML building blocks shared by the reports: the page, tables, figures, cards, sections.

Every text is escaped here; callers pass plain strings (``meta`` lines and section bodies are
HTML already built from these blocks). No external resource: CSS is inline, figures are data URIs,
and the one ``<script>`` element, :func:`data_block`, holds JSON that the browser never executes.

Example:
    >>> "<td class='v'>1 &lt; 2</td>" in table(["a", "b"], [["x", "1 < 2"]])
    True
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .headline import Card

__all__ = ["cards", "data_block", "details", "e", "figure", "page", "section", "table"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.9em}
td,th{border-bottom:1px solid #eee;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6} td.v{font-variant-numeric:tabular-nums;min-width:9em}
td:first-child{width:16%} details{margin-top:1em}
figure{margin:1.2em 0} figure img{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555} code{font-size:.9em} .meta{color:#666;font-size:.85em}
p.how{color:#444;font-size:.9em;margin:.3em 0 .8em} p.how b{font-weight:600}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:.8em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.7em .9em;background:#fafafa}
.card .t{font-size:.8em;color:#555;text-transform:uppercase;letter-spacing:.03em}
.card .n{font-size:1.15em;font-weight:600;margin:.25em 0;font-variant-numeric:tabular-nums}
.card .r{font-size:.82em;color:#444}
"""


def e(text: Any) -> str:
    """``text`` escaped for HTML."""
    return html.escape(str(text))


def page(title: str, meta: Sequence[str], sections: Sequence[str]) -> str:
    """A whole document; ``meta`` lines and ``sections`` are HTML."""
    lines = "".join(f"<div>{m}</div>" for m in meta)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1><div class='meta'>{lines}</div>{''.join(sections)}</body></html>\n"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[str]], value_col: int = 1) -> str:
    """A table of plain strings; column ``value_col`` is set in tabular figures."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f"<td class='v'>{e(c)}</td>" if i == value_col else f"<td>{e(c)}</td>"
            for i, c in enumerate(r)
        ) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(uri: str, alt: str, caption: str, keys: Sequence[str] = ()) -> str:
    """An image with its caption; ``keys`` (the metric keys drawn) go in ``data-keys``."""
    data = f" data-keys='{e(json.dumps(list(keys)))}'" if keys else ""
    return (f"<figure{data}><img src='{uri}' alt='{e(alt)}'>"
            f"<figcaption>{e(caption)}</figcaption></figure>")


def details(summary: str, body: str, open_: bool = False) -> str:
    """A collapsible block; ``body`` is HTML."""
    return f"<details{' open' if open_ else ''}><summary>{e(summary)}</summary>{body}</details>"


def cards(items: Sequence[Card]) -> str:
    """A row of headline cards."""
    inner = "".join(
        "<div class='card'>"
        f"<div class='t'>{e(c.title)}</div>"
        + "".join(f"<div class='n'>{e(v)}</div>" for v in c.values)
        + f"<div class='r'>{e(c.reading)}</div></div>"
        for c in items
    )
    return f"<div class='cards'>{inner}</div>"


def section(ident: str, title: str, how: str, body: Sequence[str]) -> str:
    """A titled section; ``how`` is its one-line "how to read this" caption (may be empty)."""
    caption = f"<p class='how'><b>How to read this:</b> {e(how)}</p>" if how else ""
    return (f"<section id='{e(ident)}'><h2>{e(title)}</h2>{caption}{''.join(body)}</section>")


def data_block(ident: str, data: Mapping[str, Any]) -> str:
    """``data`` as inert JSON in the page (``type="application/json"`` is never executed).

    Non-finite numbers become ``null``; ``<``, ``>`` and ``&`` are written as JSON escapes, so
    no key can close the element.
    """
    text = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{e(ident)}">{text}</script>'


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
