"""The summary tables of the reports: each number with a sentence that says what it means.

Rows are ``(quantity, value, meaning)``. The reading of the unchanged fractions follows the
precision facts the metrics are built on: bf16 keeps 8 significant bits, so an update below about
2^-9 of a weight vanishes when the weight is stored in bf16. A high bf16-unchanged fraction next
to a low exact-unchanged fraction therefore means the apparent sparsity is rounding.

Example:
    >>> unchanged_sentence(0.03, 0.92, "float32")[:70]
    '92% of entries are unchanged in bf16, but only 3.0% at float32 precisi'
    >>> pct(0.00012), number(1234567.0), number(3.2e-7)
    ('0.012%', '1,234,567', '3.2e-07')
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["diff_summary", "number", "pct", "run_summary", "unchanged_sentence"]

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


def _label_text(label: str, kept: float | None) -> str:
    if label.startswith("keep_"):
        return f"Keep the largest {pct(float(label[5:]))} of changes"
    return f"Keep changes with |dW| > {label} ({pct(kept)} of entries)"


def _quality_sentence(kl: float | None, baseline: float | None, top1: float | None,
                      what: str) -> str:
    agree = f" Top-1 agreement {pct(top1)}." if top1 is not None else ""
    if kl is None or baseline is None:
        return "Not available." + agree
    if kl <= 1e-12:
        return f"Same outputs as the tuned model on these prompts (KL {number(kl)}).{agree}"
    if kl <= 1e-3:
        lead = "Practically the tuned model"
    elif kl <= 1e-2:
        lead = "Close to the tuned model"
    else:
        lead = "Noticeably different from the tuned model"
    if baseline <= 1e-12:
        cmp = f"{what} reproduces the tuned outputs exactly"
    elif baseline > 3 * kl:
        cmp = f"{baseline / kl:.0f}x closer than {what}"
    elif baseline < kl / 3:
        cmp = f"{what} does {kl / baseline:.0f}x better"
    else:
        cmp = f"about as close as {what}"
    return f"{lead} (KL {number(kl)} nats/token); {cmp}.{agree}"


def _where(m: Metrics, kind: str) -> tuple[str, float, float] | None:
    pat = re.compile(rf"^param_change/{kind}(?P<g>[^/]+)/mean_abs_delta$")
    vals = {hit["g"]: v for k, v in m.items() if (hit := pat.match(k)) and v is not None}
    if len(vals) < 2:
        return None
    top = max(vals, key=lambda g: vals[g])
    return top, vals[top], statistics.median(vals.values())


def metric_rows(m: Metrics, dtype: str | None) -> list[Row]:
    """Rows for whatever metric families ``m`` holds (shared by both reports)."""
    rows: list[Row] = []
    p = "param_change/"
    if m.get(p + "relative_norm") is not None:
        rows.append(("Update size", f"{pct(m[p + 'relative_norm'])} relative L2",
                     f"||dW||_2 = {number(m.get(p + 'norm_l2'))} is {pct(m[p + 'relative_norm'])} "
                     f"of the base weights' norm; the largest single change is "
                     f"{number(m.get(p + 'norm_max'))}."))
    exact, bf16 = m.get(p + "exact_unchanged_ratio"), m.get(p + "bf16_unchanged_ratio")
    if exact is not None and bf16 is not None:
        rows.append(("Unchanged entries", f"{pct(exact)} exact, {pct(bf16)} in bf16",
                     unchanged_sentence(exact, bf16, dtype)))
    changed = sorted(((k.rsplit("_at_", 1)[1], v) for k, v in m.items()
                      if k.startswith(p + "changed_ratio_at_") and v is not None),
                     key=lambda tv: float(tv[0]))
    if changed:
        rows.append(("Changed by more than T", "; ".join(f"{t}: {pct(v)}" for t, v in changed),
                     "Share of entries whose |dW| exceeds each threshold T."))
    if m.get(p + "sign_flip_ratio") is not None:
        rows.append(("Sign flips", pct(m[p + "sign_flip_ratio"]),
                     "Entries whose sign changed: there the update was larger than the weight."))
    for kind, word in (("", "layer"), ("component/", "component")):
        found = _where(m, kind)
        if found:
            g, v, med = found
            rows.append((f"Largest {word}", g, f"Mean |dW| {number(v)}, "
                         f"{v / med if med else float('inf'):.1f}x the median {word}."))
    kls = [(k[len("sparse/kl_at_"):], v) for k, v in m.items()
           if k.startswith("sparse/kl_at_") and not k.endswith(("_random", "_dare"))
           and "budget_" not in k]
    if any(label.startswith("keep_") for label, _ in kls):  # kept fractions read best
        kls = [(label, v) for label, v in kls if label.startswith("keep_")]
    kls.sort(key=lambda lv: m.get(f"sparse/kept_ratio_at_{lv[0]}") or 0.0)
    for label, kl in kls:
        kept = m.get(f"sparse/kept_ratio_at_{label}")
        rnd = m.get(f"sparse/kl_at_{label}_random")
        rows.append((_label_text(label, kept), f"KL {number(kl)} (random {number(rnd)})",
                     _quality_sentence(kl, rnd, m.get(f"sparse/top1_agree_at_{label}"),
                                       "a random mask of the same size")))
    energy = sorted((int(k.rsplit("_r", 1)[1]), v) for k, v in m.items()
                    if re.match(r"^lowrank/energy_at_r\d+$", k) and v is not None)
    if energy:
        (r0, e0), (r1, e1) = energy[0], energy[-1]
        if e0 >= 0.9:
            reading = f"the update is nearly low-rank: rank {r0} already keeps {pct(e0)}."
        elif e1 < 0.5:
            reading = f"the update is far from low-rank: even rank {r1} keeps only {pct(e1)}."
        else:
            reading = f"rank {r0} keeps {pct(e0)}, rank {r1} keeps {pct(e1)}."
        rows.append(("Low-rank energy", "; ".join(f"r{r}: {pct(e)}" for r, e in energy),
                     f"Share of each matrix update's energy in its top-r singular values "
                     f"(stable rank {number(m.get('lowrank/stable_rank'))}): {reading}"))
    lora = sorted((int(hit[1]), kl) for k, kl in m.items()
                  if (hit := re.match(r"^lowrank/kl_at_r(\d+)$", k)))
    for r, kl in lora:
        sparse = m.get(f"sparse/kl_at_budget_r{r}")
        rows.append((f"LoRA rank {r}", f"KL {number(kl)} (sparse {number(sparse)})",
                     _quality_sentence(kl, sparse, m.get(f"lowrank/top1_agree_at_r{r}"),
                                       "a magnitude mask of the same parameter budget")))
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


def diff_summary(result: Mapping[str, Any]) -> list[Row]:
    """Summary rows of a checkpoint diff (``metrics.json``)."""
    m = result["metrics"]
    compared = result.get("compared", {})
    dtypes = compared.get("dtypes", {})
    dtype = next(iter(dtypes)) if len(dtypes) == 1 and "->" not in next(iter(dtypes)) else None
    stored = ", ".join(f"{n} x {d}" for d, n in dtypes.items())
    skipped = len(compared.get("skipped", []))
    rows: list[Row] = [(
        "Compared", f"{compared.get('tensors', 0)} tensors, "
        f"{number(m.get('param_change/num_params'))} entries",
        f"Stored as {stored or 'unknown'}"
        + (" (different dtypes are compared in float32)" if dtype is None else "")
        + (f"; {skipped} non-floating tensors skipped" if skipped else "") + ".",
    )]
    rows += metric_rows(m, dtype)
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
    a, b = first["metrics"].get(key), last["metrics"].get(key)
    if a is not None and b is not None and len(records) > 1:
        rows.append(("Update size trend", f"{pct(a)} -> {pct(b)}",
                     f"Relative update per interval at step {first['step']} and at step "
                     f"{last['step']} ({'shrinking' if b < a else 'growing'})."))
    a, b = first["metrics"].get("drift/kl_base_now"), last["metrics"].get("drift/kl_base_now")
    if a is not None and b is not None and len(records) > 1:
        rows.append(("KL to the base trend", f"{number(a)} -> {number(b)}",
                     "KL(P_base || P_now) at the first and the last measurement: growing while "
                     "the per-interval sparse/* KLs stay small means many small windows adding "
                     "up."))
    rows += [(f"{q} (last)", v, s) for q, v, s in metric_rows(last["metrics"], None)]
    return rows
