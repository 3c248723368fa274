"""RESULTS.md from the JSON results: tables, figures and conclusions worded from the numbers.

Every number in the text is read from the results, and sentences whose direction could change
with the numbers (which mask is best, how close a rule is) are chosen from them, so a rerun never
leaves a stale claim behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from exp_checks import overlap_baselines
from exp_precision import mean
from exp_report_masks import masks_section, pct, table


def _avg(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _overlaps(rows: list[dict[str, float]]) -> list[float]:
    return [r["mask_overlap"] for r in rows if "mask_overlap" in r]


# --- experiment 1 ------------------------------------------------------------------------------
def _precision(res: dict[str, Any], fig: str, caveat: str) -> str:
    runs = res["runs"]
    s = res["settings"]
    rows = [
        [
            f"{r['lr']:.0e}",
            f"{mean(r['fp32'], 'exact_unchanged_ratio'):.4f}",
            f"{mean(r['bf16_view'], 'exact_unchanged_ratio'):.3f}",
            f"{_avg(r['interval_rule_unchanged']):.3f}",
            f"{mean(r['pure_bf16'], 'exact_unchanged_ratio'):.3f}",
            f"{_avg(r['step_rule_unchanged']):.3f}",
            f"{r['final_loss']['fp32']:.3f} / {r['final_loss']['pure_bf16']:.3f}",
        ]
        for r in runs
    ]
    fp32_max = max(x["exact_unchanged_ratio"] for r in runs for x in r["fp32"])
    view = [mean(r["bf16_view"], "exact_unchanged_ratio") for r in runs]
    pure = [mean(r["pure_bf16"], "exact_unchanged_ratio") for r in runs]
    view_gap = max(abs(v - _avg(r["interval_rule_unchanged"])) for v, r in zip(view, runs))
    pure_gap = max(abs(p - _avg(r["step_rule_unchanged"])) for p, r in zip(pure, runs))
    lo, hi = runs[0], runs[-1]
    header = ["lr", "fp32 unchanged", "bf16 view unchanged", "rounding rule",
              "pure bf16 unchanged", "per-step rule", "final loss fp32 / pure bf16"]
    return f"""## 1. Precision vs. sparsity

The same SFT fine-tune (same data order) at {len(runs)} constant learning rates from
{lo['lr']:.0e} to {hi['lr']:.0e}, measured over {s['intervals']} consecutive intervals of
{s['interval']} steps (after a first interval that only sets the snapshot), in three storage modes:
**fp32** (parameters and AdamW state in float32); **fp32 master, bf16 view** (the same fp32 run,
analysed through a bfloat16 copy whose weights are the fp32 weights rounded after every step:
what a bf16 checkpoint of a mixed-precision run stores); **pure bf16** (parameters and AdamW state
in bfloat16, every update rounded). Plotted: `param_change/exact_unchanged_ratio` of each mode
(mean over intervals) and `param_change/bf16_unchanged_ratio` of the fp32 run, with two
predictions computed from the fp32 run's own weights and deltas:

* **rounding rule** (bf16 view): an entry that moved by Δ in fp32 changes its bf16 value with
  probability min(1, |Δ| / ulp(w)), ulp(w) being the bf16 spacing at |w| (2^-8 to 2^-7 of |w|);
  the curve is 1 minus the mean of that over all entries;
* **per-step rule** (pure bf16): a stored bf16 value moves only if one step's update is at least
  half a spacing; an entry is predicted to change iff max over the interval's steps of
  |d_t| >= ulp(w)/2, with d_t the fp32 run's per-step updates.

![unchanged fraction against learning rate]({fig})

{table(header, rows)}

**Conclusions ({caveat}).**
* fp32 storage gives a dense update at every learning rate: at most a fraction
  {fp32_max:.1e} of the entries kept their exact value over any interval.
* The very same run looks sparse through bf16: {pct(view[0])} of the entries unchanged at
  lr {lo['lr']:.0e}, {pct(view[-1])} at {hi['lr']:.0e}. The rounding rule predicts the bf16 view
  to within {view_gap:.4f} (absolute) at every learning rate, from |Δ| and |w| alone. The
  library's `bf16_unchanged_ratio` of the fp32 run equals the view's `exact_unchanged_ratio`
  exactly, so an fp32 run reports its bf16 "sparsity" without a bf16 copy.
* Pure bf16 training looks sparser still ({pct(pure[0])} unchanged at {lo['lr']:.0e},
  {pct(pure[-1])} at {hi['lr']:.0e}) because updates below half a spacing are lost at every
  step instead of accumulating in fp32 master weights; the per-step rule predicts it to within
  {pure_gap:.3f}. Here the "sparsity" is a real loss of updates (compare the final losses), but it
  is decided by update size against weight magnitude, not by a choice of subnetwork.
"""


# --- experiment 3 ------------------------------------------------------------------------------
def _overlap(res: dict[str, Any], fig: str, caveat: str) -> str:
    runs = res["runs"]
    rows = [
        [
            f"{r['lr']:.0e}",
            f"{mean(r['fp32'], 'mask_overlap'):.4f}",
            f"{mean(r['bf16_view'], 'mask_overlap'):.3f}",
            f"{_avg(overlap_baselines(r['bf16_view'])):.3f}",
            f"{_avg(r['interval_rule_overlap']):.3f}",
            f"{_avg(r['independent_rule_overlap']):.3f}",
            f"{mean(r['pure_bf16'], 'mask_overlap'):.3f}",
            f"{_avg(overlap_baselines(r['pure_bf16'])):.3f}",
            f"{_avg(r['step_rule_overlap']):.3f}",
        ]
        for r in runs
    ]
    view_gap = max(
        abs(m - p)
        for r in runs
        for m, p in zip(_overlaps(r["bf16_view"]), r["interval_rule_overlap"], strict=True)
    )
    pure_gap = max(
        abs(mean(r["pure_bf16"], "mask_overlap") - _avg(r["step_rule_overlap"])) for r in runs
    )
    pure_worst = max(
        abs(m - p)
        for r in runs
        for m, p in zip(_overlaps(r["pure_bf16"]), r["step_rule_overlap"], strict=True)
    )
    lo = runs[0]
    header = ["lr", "fp32", "bf16 view", "independent sets", "drift rule", "independent entries",
              "pure bf16", "independent sets", "per-step rule"]
    return f"""## 3. Does the changed set stay the same?

`param_change/mask_overlap` (enabled with `param_change_track_mask_overlap=True`) is the Jaccard
overlap of the sets of entries whose stored value changed in consecutive intervals, from the
runs of experiment 1. Three references: independent random sets of the same densities a, b
(expected Jaccard ab/(a+b-ab)); for the bf16 view the **drift rule** (each weight drifts by the
fp32 run's Δ/ulp through its rounding cell from a uniformly random offset, so it changes its bf16
value in both intervals only if the two moves carry it across two cell boundaries); for pure bf16
the Jaccard of the sets the per-step rule predicts. The column "independent entries" is what the
rounding probabilities min(1, |Δ|/ulp) would give if each interval's rounding were an independent
draw.

![Jaccard of consecutive changed sets]({fig})

{table(header, rows)}

**Conclusions ({caveat}).**
* fp32: every entry changes in every interval, so the overlap is trivially about 1.
* bf16 view: the changed sets overlap more than independent random sets of the same sizes
  ({mean(lo['bf16_view'], 'mask_overlap'):.2f} against
  {_avg(overlap_baselines(lo['bf16_view'])):.2f} at lr {lo['lr']:.0e}), which could be read as a
  persistent subnetwork; the drift rule, which knows only |Δ|/ulp per entry, reproduces the
  overlap to within {view_gap:.3f} in every interval. The entries that keep changing are those
  whose update is large against the bf16 spacing at their magnitude, and consecutive changes of
  one entry are rarer than independent draws would make them (compare "independent entries").
* pure bf16: the overlap is far above independent sets
  ({mean(lo['pure_bf16'], 'mask_overlap'):.2f} against
  {_avg(overlap_baselines(lo['pure_bf16'])):.3f} at lr {lo['lr']:.0e}): the same few entries move
  in every interval. The per-step rule, computed from the fp32 run, comes within {pure_gap:.3f}
  of the measured overlap averaged over intervals at every learning rate (within {pure_worst:.3f}
  in single intervals: at mid learning rates the fp32 trajectory drifts away from the pure-bf16
  one). So this "subnetwork" is, to that
  accuracy, the set of weights small enough for one step's update to reach half a bf16 spacing.
"""


def _checks(claims: dict[str, Any]) -> str:
    rows = [
        ["PASS" if c.passed else "**FAIL**", c.text, c.detail]
        for group in claims.values()
        for c in group
    ]
    return "## Checked claims\n\n`run_all.py` exits non-zero when one fails.\n\n" + table(
        ["", "claim", "measured"], rows
    )


def write(
    path: str,
    out: str,
    run: dict[str, Any],
    precision: dict[str, Any],
    masks: dict[str, Any],
    claims: dict[str, Any],
    extras: Sequence[tuple[Any, dict[str, Any]]] = (),
) -> None:
    """Write the report to ``path``; figures and JSON files are linked relative to it.

    ``extras`` are ``(module, results)`` of the experiments that write their own section
    (``module.section(results, figure link, caveat)``), placed before the checked claims.
    """
    rel = os.path.relpath(out, os.path.dirname(os.path.abspath(path)))

    def link(name: str) -> str:
        return name if rel == "." else f"{rel}/{name}"

    m = run["model"]
    caveat = f"one {m['parameters'] / 1e6:.1f}M-parameter model, one seed"
    p = run["pretrain"]
    sec = run["seconds"]
    names = ["precision.json", "masks.json", *(f"{mod.NAME}.json" for mod, _ in extras),
             "checks.json", "run.json"]
    files = ", ".join(f"[{n}]({link(n)})" for n in names)
    sections = "\n".join(mod.section(res, link(f"{mod.NAME}.png"), caveat) for mod, res in extras)
    text = f"""# Update sparsity, precision and masks on a tiny model

Five experiments that put effects reported for large-model fine-tuning to the test on a model
small enough to train on a CPU in minutes: apparent update sparsity that is bf16 rounding, the
output quality of sparse and low-rank versions of an update, whether the set of changed weights
stays the same, whether the update follows the weights' principal singular directions, and
whether two runs change the same weights. Everything is measured with the library's public API
(`ModelAnalysisManager`, `AnalysisConfig`, `ParameterSnapshot`, `grail-analysis overlap`).
**These are tiny models (one architecture,
{m['parameters']:,} parameters, one seed): the numbers show mechanisms, not their size at
scale.**

**Setting.** A random-init Qwen2 causal LM ({m['layers']} layers, hidden {m['hidden']}, MLP
{m['intermediate']}, {m['heads']} heads / {m['kv_heads']} KV heads, vocabulary {m['vocab']},
untied head) pre-trained for {p['steps']} steps on sequences of a random Markov chain (each token
has 3 successors; training loss {p['loss_first']:.2f} -> {p['loss_last']:.3f}, chain entropy
{p['chain_entropy']:.3f} nats). Fine-tunes start from it: **SFT** on the chain with the successor
distributions of half the tokens redrawn; **RL**: REINFORCE with a batch-mean baseline on 8
sampled tokens after 8-token chain prompts, reward = fraction of generated tokens in the lower
half of the vocabulary. AdamW without weight decay, constant learning rate, batch 32.

Regenerate with `python research/experiments/run_all.py` ({sec['total']:.0f} s for this
{run['mode']} run, torch on one CPU thread); `--quick` is the CI smoke test with the same checks.
Numbers: {files}.

{_precision(precision, link("precision.png"), caveat)}
{masks_section(masks, link("masks.png"), caveat)}
{_overlap(precision, link("overlap.png"), caveat)}
{sections}
{_checks(claims)}

Versions: Python {run['versions']['python']}, torch {run['versions']['torch']}, transformers
{run['versions']['transformers']}; seed {run['seed']}.
"""
    with open(path, "w") as f:
        f.write(text)
