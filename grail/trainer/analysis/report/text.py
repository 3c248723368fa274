"""The summary tables of the reports: each number with a sentence that says what it means.

Rows are ``(quantity, value, meaning)``. The reading of the unchanged fractions follows the
precision facts the metrics are built on: bf16 keeps 8 significant bits, so an update below about
2^-9 of a weight vanishes when the weight is stored in bf16. A high bf16-unchanged fraction next
to a low exact-unchanged fraction therefore means the apparent sparsity is rounding. In a diff a
mask's KL is read against the base's (keeping none of the update, :func:`base_reference`): it is
called close to the tuned model only if it recovers most of the base's KL.

Example:
    >>> unchanged_sentence(0.03, 0.92, "float32")[:70]
    '92% of entries are unchanged in bf16, but only 3.0% at float32 precisi'
    >>> pct(0.00012), number(1234567.0), number(3.2e-7)
    ('0.012%', '1,234,567', '3.2e-07')
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..keys import KeyParts, format_budget, metric_key, parse_key

__all__ = [
    "FAMILY_ORDER",
    "NOTHING_KEPT",
    "base_reference",
    "diff_summary",
    "family_reading",
    "family_title",
    "metric_rows",
    "nothing_moved",
    "number",
    "pct",
    "quality_sentence",
    "run_summary",
    "stored_dtype",
    "unchanged_sentence",
    "update_size_sentence",
]

Row = tuple[str, str, str]
Metrics = Mapping[str, float | None]


def number(v: float | None) -> str:
    """Compact human-readable number (``n/a`` for missing or non-finite)."""
    if v is None or v != v or v in (float("inf"), float("-inf")):
        return "n/a"
    if float(v).is_integer() and abs(v) >= 1000:
        return f"{v:,.0f}"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2g}"
    return f"{v:.4g}"


def pct(v: float | None) -> str:
    """A fraction as a percentage with sensible digits (``0.00012`` -> ``0.012%``)."""
    if v is None or v != v:
        return "n/a"
    if v == 0 or abs(v) >= 1e-3:
        return f"{v:.1%}" if abs(v) < 0.995 or v == 1 else f"{v:.2%}"
    return f"{v * 100:.2g}%"


def unchanged_sentence(exact: float, bf16: float, dtype: str | None) -> str:
    """What the exact- and bf16-unchanged fractions say together."""
    at = f"at {dtype} precision" if dtype else "at stored precision"
    if exact >= 1.0:
        return "No entry moved: the weights are identical in the analysed parameters (no update)."
    if dtype == "bfloat16":
        return (
            f"Weights are stored in bf16, where an update below about 2^-9 (0.2%) of a weight is "
            f"rounded away: part of these {pct(exact)} unchanged entries may be rounding rather "
            "than a sparse update."
        )
    if bf16 - exact >= 0.1:
        return (
            f"{bf16:.0%} of entries are unchanged in bf16, but only {pct(exact)} {at}: the "
            "sparsity is rounding, not a sparse update."
        )
    if exact >= 0.5:
        return f"{pct(exact)} of entries did not move at all {at}: the update itself is sparse."
    return f"Only {pct(exact)} of entries are exactly unchanged {at}: the update is dense."


def _label_text(parts: KeyParts, kept: float | None) -> str:
    if parts.label_kind == "keep":
        return f"Keep the largest {pct(parts.label_value)} of changes"
    return f"Keep changes with |dW| > {parts.label} ({pct(kept)} of entries)"


def _closeness(kl: float, base_kl: float | None, top1: float | None,
               base_top1: float | None) -> tuple[str, str]:
    """The lead of :func:`quality_sentence` and the KL it is read from (``KL x nats/token``)."""
    size = f"KL {number(kl)} nats/token"
    no_better_top1 = top1 is not None and base_top1 is not None and top1 <= base_top1
    if base_kl is None:  # no reference: absolute cut-offs, unless top-1 is no better than base
        if no_better_top1 and kl <= 1e-2:
            return "No closer to the tuned model than the base in top-1 agreement", size
        if kl <= 1e-3:
            return "Practically the tuned model", size
        if kl <= 1e-2:
            return "Close to the tuned model", size
        return "Noticeably different from the tuned model", size
    recovered = 1 - kl / base_kl if base_kl > 1e-12 else float("-inf")
    if recovered < 0:
        size += f", above the base's {number(base_kl)}"
    else:
        size += f", recovering {pct(recovered)} of the base's {number(base_kl)}"
    close = recovered >= 0.5 and not (no_better_top1 and top1 is not None and top1 < 1)
    if close and kl <= 1e-3 and recovered >= 0.9:
        return "Practically the tuned model", size
    if close and kl <= 1e-2:
        return "Close to the tuned model", size
    if kl > 1e-2:
        return "Noticeably different from the tuned model", size
    if recovered < -0.1:
        return "Further from the tuned model than the base", size
    if recovered < 0.1:
        return "About as far from the tuned model as the base", size
    return "Partway from the base to the tuned model", size


_SAME = 1.25  # KLs within this factor of each other read as "about as close"


def _times(ratio: float) -> str:
    """``1.25x``, ``1.7x``, ``5x``, ``12x``: two decimals below 2 (a ratio at the edge of
    :data:`_SAME` does not round into it), one below 10, none above."""
    if ratio >= 10:
        return f"{ratio:.0f}x"
    text = f"{ratio:.2f}" if ratio < 2 else f"{ratio:.1f}"
    return f"{text.rstrip('0').rstrip('.')}x"


def quality_sentence(kl: float | None, baseline: float | None, top1: float | None,
                     what: str, base_kl: float | None = None,
                     base_top1: float | None = None) -> str:
    """What a masked update's KL says next to a baseline's (``what``) at the same budget.

    ``base_kl`` and ``base_top1`` are what keeping none of the update scores (the base model:
    KL(P_tuned || P_base) and its top-1 agreement), when known. The KL cut-offs (1e-3 for
    "practically", 1e-2 for "close") then also need the mask to recover at least 90% / 50% of
    the base's KL, and a top-1 agreement below 100% no better than the base's rules out either.
    Without ``base_kl`` the cut-offs alone decide, unless top-1 is no better than the base's.
    """
    agree = ""
    if top1 is not None:
        theirs = f", the base's {pct(base_top1)}" if base_top1 is not None else ""
        agree = f" Top-1 agreement {pct(top1)}{theirs}."
    if kl is None or baseline is None or not math.isfinite(kl):
        return "Not available." + agree
    if kl <= 1e-12:
        return f"Same outputs as the tuned model on these prompts (KL {number(kl)}).{agree}"
    lead, size = _closeness(kl, base_kl, top1, base_top1)
    if not math.isfinite(baseline):
        return f"{lead} ({size}).{agree}"
    if baseline <= 1e-12:
        cmp = f"{what} reproduces the tuned outputs exactly"
    elif baseline >= _SAME * kl:
        cmp = f"{_times(baseline / kl)} closer than {what}"
    elif baseline * _SAME <= kl:
        cmp = f"{what} does {_times(kl / baseline)} better"
    else:
        cmp = f"about as close as {what}"
    return f"{lead} ({size}); {cmp}.{agree}"


def base_reference(m: Metrics) -> tuple[float | None, float | None]:
    """What keeping none of a diff's update scores: the base model's KL(P_tuned || P_base) and
    top-1 agreement (``drift/kl_now_base``, ``drift/top1_agree``); None where not logged.

    Only a diff's masks start from the base: in a run, ``sparse/*`` masks one interval's update
    while ``drift/*`` spans the whole run, so these are no reference there.
    """
    kl, top1 = (m.get(k) for k in ("drift/kl_now_base", "drift/top1_agree"))
    return (kl if kl is not None and math.isfinite(kl) else None,
            top1 if top1 is not None and math.isfinite(top1) else None)


NOTHING_KEPT = "Nothing to keep: no entry moved."  # a mask's reading when no entry moved


def nothing_moved(m: Metrics) -> bool:
    """True when no entry of the update moved (``param_change/exact_unchanged_ratio`` is 1)."""
    exact = m.get("param_change/exact_unchanged_ratio")
    return exact is not None and exact >= 1.0


def _parsed(m: Metrics) -> Iterable[tuple[KeyParts, float | None]]:
    for key, value in m.items():
        parts = parse_key(key)
        if parts is not None:
            yield parts, value


def _where(m: Metrics, scope: str) -> tuple[str, float, float] | None:
    vals = {p.group: v for p, v in _parsed(m)
            if p.family == "param_change" and p.scope == scope and p.name == "mean_abs_delta"
            and p.label is None and v is not None}
    if len(vals) < 2:
        return None
    top = max(vals, key=lambda g: vals[g])
    return str(top), vals[top], statistics.median(vals.values())


def _labelled(m: Metrics, family: str, name: str, kinds: tuple[str, ...]
              ) -> list[tuple[KeyParts, float | None]]:
    """Global ``{family}/{name}_at_{label}`` values (no variant) whose label is of ``kinds``,
    sorted by the label's number."""
    found = [(p, v) for p, v in _parsed(m)
             if p.family == family and p.scope == "global" and p.name == name
             and p.variant is None and p.label_kind in kinds]
    return sorted(found, key=lambda pv: pv[0].label_value or 0.0)


def update_size_sentence(m: Metrics, from_base: bool = False) -> str:
    """What ``param_change/relative_norm`` (logged) says with the norms beside it: relative to
    the weights at the start of the interval, or to the base's in a diff (``from_base``);
    values not logged are left out."""
    p = "param_change/"
    of = "the base weights' norm" if from_base else (
        "the norm of the weights at the start of the interval")
    norm_l2, norm_max = m.get(p + "norm_l2"), m.get(p + "norm_max")
    said = f"||dW||_2 = {number(norm_l2)} is" if norm_l2 is not None else "The update is"
    largest = f"; the largest single change is {number(norm_max)}" if norm_max is not None else ""
    return f"{said} {pct(m[p + 'relative_norm'])} of {of}{largest}."


def _largest(word: str, group: str, v: float, med: float) -> Row:
    """The "Largest layer/component" row; no ratio to a median that did not move."""
    if not (math.isfinite(v) and math.isfinite(med)):
        return (f"Largest {word}", group, f"Mean |dW| {number(v)} (median {number(med)}).")
    if v <= 0:
        return (f"Largest {word}", "none", f"No {word} moved (mean |dW| 0 in each).")
    if med <= 0:
        return (f"Largest {word}", group, f"Mean |dW| {number(v)}; the median {word} did not "
                "move.")
    return (f"Largest {word}", group, f"Mean |dW| {number(v)}, {v / med:.1f}x the median {word}.")


def metric_rows(m: Metrics, dtype: str | None, from_base: bool = False) -> list[Row]:
    """Rows for whatever metric families ``m`` holds (shared by both reports).

    ``from_base``: the masks are of the whole fine-tune (a diff), so :func:`base_reference` is
    what keeping none of it scores and the mask verdicts are read against it. With no entry
    moved (:func:`nothing_moved`) the mask and low-rank rows say so instead of a verdict.
    """
    rows: list[Row] = []
    base_kl, base_top1 = base_reference(m) if from_base else (None, None)
    still = nothing_moved(m)
    p = "param_change/"
    if m.get(p + "relative_norm") is not None:
        rows.append(("Update size", f"{pct(m[p + 'relative_norm'])} relative L2",
                     update_size_sentence(m, from_base)))
    exact, bf16 = m.get(p + "exact_unchanged_ratio"), m.get(p + "bf16_unchanged_ratio")
    if exact is not None and bf16 is not None:
        rows.append(("Unchanged entries", f"{pct(exact)} exact, {pct(bf16)} in bf16",
                     unchanged_sentence(exact, bf16, dtype)))
    changed = [(p.label, v) for p, v in _labelled(m, "param_change", "changed_ratio",
                                                   ("threshold",)) if v is not None]
    if changed:
        rows.append(("Changed by more than T", "; ".join(f"{t}: {pct(v)}" for t, v in changed),
                     "Share of entries whose |dW| exceeds each threshold T."))
    if m.get(p + "sign_flip_ratio") is not None:
        rows.append(("Sign flips", pct(m[p + "sign_flip_ratio"]),
                     "Entries whose sign changed: there the update was larger than the weight."))
    for scope, word in (("layer", "layer"), ("component", "component")):
        found = _where(m, scope)
        if found:
            rows.append(_largest(word, *found))
    kls = _labelled(m, "sparse", "kl", ("keep", "threshold"))
    if any(parts.label_kind == "keep" for parts, _ in kls):  # kept fractions read best
        kls = [(parts, v) for parts, v in kls if parts.label_kind == "keep"]
    kls.sort(key=lambda pv: m.get(pv[0].with_(name="kept_ratio").key) or 0.0)
    for parts, kl in kls:
        kept = m.get(parts.with_(name="kept_ratio").key)
        rnd = m.get(parts.with_(variant="random").key)
        rows.append((_label_text(parts, kept), f"KL {number(kl)} (random {number(rnd)})",
                     NOTHING_KEPT if still else
                     quality_sentence(kl, rnd, m.get(parts.with_(name="top1_agree").key),
                                      "a random mask of the same size", base_kl, base_top1)))
    energy = [(int(parts.label_value or 0), v)
              for parts, v in _labelled(m, "lowrank", "energy", ("rank",)) if v is not None]
    if energy:
        (r0, e0), (r1, e1) = energy[0], energy[-1]
        if e0 >= 0.9:
            reading = f"the update is nearly low-rank: rank {r0} already keeps {pct(e0)}."
        elif e1 < 0.5:
            reading = f"the update is far from low-rank: even rank {r1} keeps only {pct(e1)}."
        else:
            reading = f"rank {r0} keeps {pct(e0)}, rank {r1} keeps {pct(e1)}."
        rows.append(("Low-rank energy", "; ".join(f"r{r}: {pct(e)}" for r, e in energy),
                     "Nothing to decompose: no entry moved." if still else
                     f"Share of each matrix update's energy in its top-r singular values "
                     f"(stable rank {number(m.get('lowrank/stable_rank'))}): {reading}"))
    for parts, kl in _labelled(m, "lowrank", "kl", ("rank",)):
        r = int(parts.label_value or 0)
        sparse = m.get(metric_key("sparse", "kl", label=format_budget(r)))
        rows.append((f"LoRA rank {r}", f"KL {number(kl)} (sparse {number(sparse)})",
                     NOTHING_KEPT if still else
                     quality_sentence(kl, sparse, m.get(parts.with_(name="top1_agree").key),
                                      "a magnitude mask of the same parameter budget",
                                      base_kl, base_top1)))
    return rows + drift_rows(m)


def drift_rows(m: Metrics) -> list[Row]:
    """Rows for ``drift/*``: how far the weights and the outputs are from the base."""
    rows: list[Row] = []
    rel, kl, back = m.get("drift/relative_norm"), m.get("drift/kl_now_base"), m.get(
        "drift/kl_base_now")
    if rel is not None:
        rows.append(("Distance from the base", f"{pct(rel)} relative L2",
                     f"||W_now - W_base||_2 = {number(m.get('drift/norm_l2'))}; "
                     f"{pct(m.get('drift/exact_unchanged_ratio'))} of entries are still exactly "
                     "the base's."))
    if kl is not None and back is not None:
        rows.append(("KL to the base", f"{number(back)} (base || now), {number(kl)} (now || base)",
                     f"Output divergence of the whole fine-tune on the probe batch, nats/token; "
                     f"top-1 agreement with the base {pct(m.get('drift/top1_agree'))}. The KL "
                     "between the fine-tuned and the base model on the task's data predicts "
                     "forgetting better than weight norms do."))
    return rows


def stored_dtype(result: Mapping[str, Any]) -> str | None:
    """The one dtype both checkpoints of a diff are stored in; None when there are several."""
    dtypes = result.get("compared", {}).get("dtypes", {})
    only = next(iter(dtypes), "")
    return only if len(dtypes) == 1 and "->" not in only else None


def diff_summary(result: Mapping[str, Any]) -> list[Row]:
    """Summary rows of a checkpoint diff (``metrics.json``)."""
    m = result["metrics"]
    compared = result.get("compared", {})
    dtypes = compared.get("dtypes", {})
    dtype = stored_dtype(result)
    stored = ", ".join(f"{n} x {d}" for d, n in dtypes.items())
    skipped = len(compared.get("skipped", []))
    rows: list[Row] = [(
        "Compared", f"{compared.get('tensors', 0)} tensors, "
        f"{number(m.get('param_change/num_params'))} entries",
        f"Stored as {stored or 'unknown'}"
        + (" (different dtypes are compared in float32)" if dtype is None else "")
        + (f"; {skipped} non-floating tensors skipped" if skipped else "") + ".",
    )]
    rows += metric_rows(m, dtype, from_base=True)
    if result.get("prompts"):
        rows.append(("Prompts", f"{result['prompts']} prompts",
                     f"{number(m.get('sparse/tokens'))} token positions compared."))
    return rows


def run_summary(records: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Summary rows of a training log: the span, trends, and the last measurement read out."""
    if not records:
        return [("Measurements", "0", "The log holds no measurements.")]
    first, last = records[0], records[-1]
    rows: list[Row] = [("Measurements", str(len(records)),
                        f"From step {first['step']} to step {last['step']}.")]
    key = "param_change/relative_norm"
    finite = [r for r in records if _finite(r["metrics"].get(key))]
    if len(finite) > 1:
        (s0, a), (s1, b) = ((r["step"], r["metrics"][key]) for r in (finite[0], finite[-1]))
        trend = "shrinking" if b < a else "growing" if b > a else "unchanged"
        rows.append(("Update size trend", f"{pct(a)} -> {pct(b)}",
                     f"Relative update per interval at step {s0} and at step {s1} ({trend})."))
    a, b = first["metrics"].get("drift/kl_base_now"), last["metrics"].get("drift/kl_base_now")
    if a is not None and b is not None and len(records) > 1:
        rows.append(("KL to the base trend", f"{number(a)} -> {number(b)}",
                     "KL(P_base || P_now) at the first and the last measurement: growing while "
                     "the per-interval sparse/* KLs stay small means many small windows adding "
                     "up."))
    rows += [(f"{q} (last)", v, s) for q, v, s in metric_rows(last["metrics"], None)]
    return rows


#: Sections of the reports, in this order; other families follow alphabetically.
FAMILY_ORDER = ("param_change", "sparse", "drift", "lowrank", "gradient", "adam_sign", "attrib",
                "principal")
_FAMILIES = {
    "param_change": (
        "Parameter change",
        "Size and sparsity of the update W_new - W_old (each interval in a run, base to tuned in "
        "a diff): a changed ratio near 1 is a dense update, and exact vs bf16 unchanged "
        "fractions far apart mean the apparent sparsity is rounding."),
    "sparse": (
        "Sparse-update quality",
        "Outputs with only part of the update (its largest entries, or as many random ones) "
        "against the full update: lower KL is closer, and a wide gap to the random mask means "
        "the large entries carry the update."),
    "drift": (
        "Drift from the base model",
        "The whole fine-tune, base to now: KL to base growing while sparse/* stays small per "
        "interval means many small updates adding up."),
    "lowrank": (
        "Low-rank feasibility",
        "Share of each weight-matrix update's energy in its top-r singular values, and outputs "
        "with a rank-r truncation: near 1 at small r means LoRA would reproduce the update."),
    "gradient": (
        "Gradients",
        "The gradient the optimizer used at each measurement step (after clipping): norms and "
        "the share of entries that are (near) zero or missing."),
    "adam_sign": (
        "Adam's update",
        "Adam's normalised step u: a large share with |u| near 1 is sign descent; a large share "
        "below 0.1 is noise-dominated."),
    "attrib": (
        "Where the output change comes from",
        "Output KL of the update restricted to one layer or component, or without it: the "
        "largest shares name the parts that matter for the outputs."),
    "principal": (
        "Principal directions",
        "How much of the update lies in the base weights' top singular directions, against a "
        "random subspace of the same size (dashed)."),
}


def family_title(family: str) -> str:
    """Heading of a family's section: ``Parameter change (param_change/*)``."""
    title = _FAMILIES.get(family, (family.replace("_", " ").capitalize(), ""))[0]
    return f"{title} ({family}/*)" if family != "other" else "Other metrics"


def family_reading(family: str) -> str:
    """The one-line "how to read this" caption of a family's section."""
    if family in _FAMILIES:
        return _FAMILIES[family][1]
    if family == "other":
        return "Keys outside the family/name grammar, as logged."
    return f"Metrics of the {family} computer, as logged."


def _finite(value: Any) -> bool:
    """A logged number that is not NaN or infinite (``null`` in a run log reads as NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)
