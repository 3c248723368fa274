"""The RESULTS.md section of experiment 2 (which mask reproduces the update), from masks.json."""

from __future__ import annotations

from typing import Any

NAMES = {"magnitude": "magnitude", "random": "random", "dare": "DARE", "low_rank": "low rank"}


def pct(x: float) -> str:
    """``0.123 -> "12.3%"``."""
    return f"{100 * x:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --- section ------------------------------------------------------------------------------
def _ranking(c: dict[str, list[list[float]]], i: int) -> str:
    kl = {name: c[name][i][1] for name in ("magnitude", "random", "dare")}
    return " < ".join(f"{NAMES[n]} {v:.3g}" for n, v in sorted(kl.items(), key=lambda t: t[1]))


def _regime_table(res: dict[str, Any], regime: str, title: str) -> str:
    s = res["settings"]
    r = res[regime]
    c = r["curves"]
    low = {p[2]: p for p in c["low_rank"]}
    budget = {p[2]: p for p in c["magnitude_at_rank_budget"]}
    rows = []
    for i, f in enumerate(s["keep"]):
        rank = r["matched_ranks"][f"{f:g}"]
        rows.append([
            f"{f:g}",
            f"{c['magnitude'][i][1]:.3g}",
            f"{c['random'][i][1]:.3g}",
            f"{c['dare'][i][1]:.3g}",
            f"r={rank} ({low[rank][0]:.3f}): {low[rank][1]:.3g}",
            f"{budget[rank][1]:.3g}",
        ])
    if regime == "sft":
        a, b = r["loss_first_last_10"]
        progress = f"training loss {a:.2f} -> {b:.2f}"
    else:
        a, b = r["reward_first_last_10"]
        progress = f"mean reward {a:.2f} -> {b:.2f}"
    header = ["kept fraction", "magnitude", "random", "DARE", "low rank: rank (param ratio): KL",
              "magnitude at the rank's budget"]
    order = "; ".join(f"{f:g}: {_ranking(c, i)}" for i, f in enumerate(s["keep"]))
    return (
        f"**{title}** ({s[regime + '_steps']} steps at lr {s[regime + '_lr']:g}, {progress} over "
        f"the first/last 10 steps; KL(tuned || base) = {r['kl_base']:.3g} nats/token)\n\n"
        f"{table(header, rows)}\n\nOrder at each kept fraction: {order}.\n"
    )


def _mask_conclusions(res: dict[str, Any], caveat: str) -> str:
    keep = res["settings"]["keep"]
    lines = [f"**Conclusions ({caveat}, one random mask per point).**"]
    for regime, title in (("sft", "SFT"), ("rl", "RL")):
        r = res[regime]
        c = r["curves"]
        mag, rnd, dare = ([p[1] for p in c[k]] for k in ("magnitude", "random", "dare"))
        dare_wins = [f"{f:g}" for i, f in enumerate(keep) if dare[i] < mag[i]]
        dare_text = (
            "DARE's 1/keep rescaling has a lower KL than the magnitude mask at kept fractions "
            + ", ".join(dare_wins) if dare_wins
            else "DARE's 1/keep rescaling does not beat the magnitude mask at any kept fraction"
        )
        worse = [i for i in range(len(keep)) if dare[i] > r["kl_base"]]
        if worse:
            dare_text += (
                f", but at {', '.join(f'{keep[i]:g}' for i in worse)} it is worse than no update "
                f"at all (the rescaled entries overshoot: KL "
                f"{', '.join(f'{dare[i]:.3g}' for i in worse)} against {r['kl_base']:.3g} for the "
                "base model)"
            )
        near_base = (
            f" (at {keep[0]:g} both are close to the base model's {r['kl_base']:.3g})"
            if min(mag[0], rnd[0]) > 0.8 * r["kl_base"] else ""
        )
        low = {p[2]: p[1] for p in c["low_rank"]}
        matched = [low[r["matched_ranks"][f"{f:g}"]] < mag[i] for i, f in enumerate(keep)]
        same = [p[1] < q[1] for p, q in zip(c["low_rank"], c["magnitude_at_rank_budget"])]
        lines.append(
            f"* {title}: the magnitude mask's KL is "
            f"{', '.join(f'{m / q:.2f}' for m, q in zip(mag, rnd))} times the random mask's at "
            f"kept fractions {', '.join(f'{f:g}' for f in keep)}{near_base}; {dare_text}. "
            f"Low rank at the matched rank has a lower KL than the magnitude mask at "
            f"{sum(matched)} of {len(keep)} kept fractions, and at exactly equal budgets over "
            f"the same matrices (dotted line) at {sum(same)} of {len(same)} ranks."
        )
    even = ", ".join(f"{t} {res[k]['evenness']:.2f}" for k, t in (("sft", "SFT"), ("rl", "RL")))
    lines.append(
        "* A plausible reading, not tested further here: the update is not concentrated in a few "
        f"large entries ((Σ|Δ|)² / (N ΣΔ²) = {even}; 1 when all entries are equal, 2/π ≈ 0.64 "
        "for Gaussian entries, near 0 for an update carried by a few entries), so keeping only "
        "the largest entries discards much of its combined effect, while an unbiased rescaled "
        "random subset (DARE) or a low-rank truncation keeps more of it. Whether this order "
        "carries over to large models is not shown by these runs."
    )
    return "\n".join(lines)


def masks_section(res: dict[str, Any], fig: str, caveat: str) -> str:
    s = res["settings"]
    tables = "\n".join(
        _regime_table(res, regime, title)
        for regime, title in (("sft", "SFT"), ("rl", "RL (REINFORCE)"))
    )
    ratio1 = res["sft"]["curves"]["low_rank"][0][0]
    return f"""## 2. Which mask reproduces the update?

The whole update of a fine-tune (base -> tuned) is measured once: the manager's `interval` is
the fine-tune's length and the base model is registered as the snapshot before the first step
(`on_optimizer_step(model, step=interval)`). On a fixed probe batch (SFT:
{s['probe_tokens']['sft']} tokens of the shifted chain; RL: {s['probe_tokens']['rl']} tokens,
prompts with continuations sampled from the tuned policy) the manager reports KL(tuned ||
masked) in nats per token for `sparse_quality_keep_ratios` {", ".join(f"{f:g}" for f in s["keep"])}:
the largest |Δ| kept (`sparse/kl_at_keep_f`), a random subset of the same size (`..._random`) and
that random subset rescaled by 1/f (`..._dare`, DARE), over all parameters. The low-rank computer
(ranks {", ".join(map(str, s["ranks"]))}, embeddings and output head included) reports
`lowrank/kl_at_r{{r}}`: every matrix replaced by base + the rank-r truncation of its update (1-D
parameters, {pct(s['non_matrix_fraction'])} of the model, keep their full update), and
`lowrank/param_ratio_at_r{{r}}`, LoRA's parameter count r(m+n) over the matrices' entries.
**Matching:** for each kept fraction, the rank whose parameter ratio is nearest on a log scale.
The smallest possible ratio (rank 1) is {ratio1:.3f}, so the {s['keep'][0]:g} point is matched by
rank 1 at {ratio1 / s['keep'][0]:.1f} times its budget. The figure places low-rank points at their
own ratio; the dotted line is `sparse/kl_at_budget_r{{r}}`, the magnitude mask over the same
matrices with exactly the rank's budget.

![KL against kept fraction]({fig})

{tables}
{_mask_conclusions(res, caveat)}
"""
