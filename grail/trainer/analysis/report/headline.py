"""The headline panel that opens the run report and the diff report: four numbers, first.

1. **Update size**: ``param_change/relative_norm``.
2. **Unchanged entries**, in stored precision vs in a bf16 view:
   ``param_change/exact_unchanged_ratio`` and ``param_change/bf16_unchanged_ratio``.
3. **KL of the top-k mask vs random at the same k**: ``sparse/kl_at_{L}`` and
   ``sparse/kl_at_{L}_random``.
4. **KL to base**, when a drift family logged it: ``drift/kl_base_now`` (and
   ``drift/kl_now_base``).

An entry is shown when any run (or the diff) holds one of its keys. The run report draws the
entries as curves under a row of cards holding the last values; the diff report shows the cards.

Decisions where the design is silent:

* Entry 3 shows one label ``L``: of the kept fractions (``keep_r``) logged by the most runs, the
  one closest to 10% on a log scale (the smaller on a tie); without kept fractions, the smallest
  threshold above 0 (a threshold of 0 keeps the whole update). Every label is in the ``sparse``
  section.
* With one run (or the diff) a card says what its numbers mean in a sentence of
  :mod:`.text`; with several runs it gives the general reading, and one value line per run.
* The diff's mask card is read against the base (:func:`.text.base_reference`): it calls the
  mask close to the tuned model only if it recovers most of the base's KL. A run's masks are of
  one interval, which ``drift/*`` does not measure, so the run cards use the KL cut-offs alone.

Example:
    >>> keys = {"param_change/relative_norm", "sparse/kl_at_keep_0.01", "sparse/kl_at_keep_0.1",
    ...         "sparse/kl_at_keep_0.1_random"}
    >>> [e.title for e in entries([keys])]
    ['Update size', 'KL: largest 10% vs random 10%']
    >>> cards(entries([keys]), [("run", {"param_change/relative_norm": 0.0021})])[0].values
    ['0.2% relative L2']
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ..keys import KeyParts, metric_key, parse_key
from .plots import Line, Panel
from .series import Run
from .text import (
    NOTHING_KEPT,
    base_reference,
    nothing_moved,
    number,
    pct,
    quality_sentence,
    unchanged_sentence,
    update_size_sentence,
)

__all__ = ["Card", "Entry", "cards", "entries", "headline_label", "panels"]

_P = "param_change/"


@dataclass(frozen=True)
class Entry:
    """One headline quantity: its keys with a role and a line style each, and how to read it."""

    kind: str  # size, unchanged, mask, base
    title: str
    lines: tuple[tuple[str, str, str], ...]  # (key, role, style)
    reading: str
    percent: bool = False  # fractions, shown as percentages
    logy: bool = False


@dataclass(frozen=True)
class Card:
    """What a card shows: a title, one value line per run, a sentence."""

    title: str
    values: list[str]
    reading: str


def headline_label(key_sets: Sequence[Collection[str]]) -> str | None:
    """The label of the headline KL entry (see module docstring), None without one."""
    runs_with: dict[str, int] = {}
    found: dict[str, KeyParts] = {}
    for keys in key_sets:
        labels = set()
        for key in keys:
            parts = parse_key(key)
            if (parts and parts.family == "sparse" and parts.scope == "global"
                    and parts.name == "kl" and parts.variant is None
                    and parts.label_kind in ("keep", "threshold") and parts.label):
                labels.add(parts.label)
                found[parts.label] = parts
        for label in labels:
            runs_with[label] = runs_with.get(label, 0) + 1

    def rank(label: str) -> tuple[int, int, float, float]:
        parts = found[label]
        value = parts.label_value or 0.0
        if parts.label_kind == "keep":
            return (-runs_with[label], 0, abs(math.log(value / 0.1)), value)
        return (-runs_with[label], 1 if value > 0 else 2, value, value)

    return min(runs_with, key=rank) if runs_with else None


def entries(key_sets: Sequence[Collection[str]]) -> list[Entry]:
    """The headline entries whose keys appear in any of ``key_sets`` (one set per run)."""
    found = set().union(*key_sets) if key_sets else set()
    out = [
        Entry("size", "Update size", ((_P + "relative_norm", "relative L2", "solid"),),
              "||dW|| / ||W||: how far the weights moved in the interval, relative to their size.",
              percent=True, logy=True),
        Entry("unchanged", "Unchanged entries",
              ((_P + "exact_unchanged_ratio", "stored", "solid"),
               (_P + "bf16_unchanged_ratio", "bf16 view", "dotted")),
              "Entries whose value did not move, in their stored precision and after rounding to "
              "bf16; far apart means the apparent sparsity is rounding.", percent=True),
    ]
    label = headline_label(key_sets)
    if label is not None:
        parts = parse_key(metric_key("sparse", "kl", label=label))
        assert parts is not None and parts.label_value is not None
        if parts.label_kind == "keep":
            share = f"{100 * parts.label_value:g}%"
            title, role = f"KL: largest {share} vs random {share}", f"largest {share}"
        else:
            title, role = f"KL: |dW| > {label} vs random", f"|dW| > {label}"
        out.append(Entry("mask", title,
                         ((parts.key, role, "solid"),
                          (parts.with_(variant="random").key, "random", "dashed")),
                         "KL(full || masked update) per token: the largest entries far below a "
                         "random mask of the same size means they carry the update.", logy=True))
    out.append(Entry("base", "KL to base",
                     (("drift/kl_base_now", "KL(base || now)", "solid"),
                      ("drift/kl_now_base", "KL(now || base)", "dotted")),
                     "How far the outputs have moved from the base model over the whole run "
                     "(nats per token).", logy=True))
    return [e for e in out if any(key in found for key, _, _ in e.lines)]


def panels(chosen: Sequence[Entry], runs: Sequence[Run]) -> list[Panel]:
    """The headline curves: one colour per line with one run, one colour per run with more."""
    many = len(runs) > 1
    out = []
    for entry in chosen:
        lines, absent = [], []
        for r, run in enumerate(runs):
            have = [(k, role, style) for k, role, style in entry.lines if k in run.series]
            if not have:
                absent.append(run.label)
            for i, (key, role, style) in enumerate(entry.lines):
                if key in run.series:
                    lines.append(Line(f"{run.label} {role}" if many else role, run.series[key],
                                      r if many else i, style))
        values = [y for line in lines for _, y in line.points if math.isfinite(y)]
        logy = entry.logy and bool(values) and all(y > 0 for y in values)
        out.append(Panel(entry.title, lines, logy, absent if many else (), entry.percent))
    return out


def _value(entry: Entry, v: float | None) -> str:
    return pct(v) if entry.percent else number(v)


def _reading(entry: Entry, m: Mapping[str, float | None], dtype: str | None,
             from_base: bool) -> str:
    """The sentence of one run's (or the diff's) numbers; the general reading as a fallback."""
    first, *rest = (m.get(k) for k, _, _ in entry.lines)
    if entry.kind == "unchanged" and first is not None and rest[0] is not None:
        return unchanged_sentence(first, rest[0], dtype)
    if entry.kind == "mask":
        if nothing_moved(m):
            return NOTHING_KEPT
        parts = parse_key(entry.lines[0][0])
        assert parts is not None
        top1 = m.get(parts.with_(name="top1_agree").key)
        base_kl, base_top1 = base_reference(m) if from_base else (None, None)
        return quality_sentence(first, rest[0], top1, "a random mask of the same size", base_kl,
                                base_top1)
    if entry.kind == "size" and first is not None:
        return update_size_sentence(m, from_base)
    return entry.reading


def cards(
    chosen: Sequence[Entry],
    values: Sequence[tuple[str, Mapping[str, float | None]]],
    dtype: str | None = None,
    from_base: bool = False,
) -> list[Card]:
    """One card per entry from ``(run label, last values)`` pairs (one pair for the diff).

    ``from_base``: the values are a diff's, whose masks start from the base (see module
    docstring).
    """
    out = []
    for entry in chosen:
        lines = []
        for label, m in values:
            shown = [f"{_value(entry, m[k])} {role}" for k, role, _ in entry.lines if k in m]
            text = ", ".join(shown) if shown else "not logged"
            lines.append(f"{label}: {text}" if len(values) > 1 else text)
        reading = (_reading(entry, values[0][1], dtype, from_base) if len(values) == 1
                   else entry.reading)
        out.append(Card(entry.title, lines, reading))
    return out
