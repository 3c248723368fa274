"""The three figures, drawn from the JSON results with matplotlib's Agg canvas (no pyplot)."""

from __future__ import annotations

import math
from typing import Any

from exp_checks import overlap_baselines
from exp_precision import mean

from grail.trainer.analysis.report.plots import require_matplotlib

MODE_STYLE = {
    "fp32": ("fp32 (exact_unchanged_ratio)", "C0", "o"),
    "bf16_view": ("fp32 master, bf16 view (exact_unchanged_ratio)", "C1", "s"),
    "pure_bf16": ("pure bf16 (exact_unchanged_ratio)", "C3", "^"),
}
CURVES = {
    "magnitude": ("magnitude mask", "C0", "o", "-"),
    "random": ("random mask", "C7", "s", "-"),
    "dare": ("random mask, DARE 1/keep rescaled", "C2", "D", "-"),
    "low_rank": ("low rank (x = LoRA parameter ratio)", "C3", "^", "-"),
    "magnitude_at_rank_budget": ("magnitude, same matrices and budget as low rank", "C0", ".",
                                 ":"),
}


def _figure(width: float, height: float) -> Any:
    return require_matplotlib()(figsize=(width, height), layout="constrained")


def _avg(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def precision_figure(res: dict[str, Any], path: str) -> None:
    """Unchanged fraction against learning rate, three modes and two rule predictions."""
    runs = res["runs"]
    lrs = [r["lr"] for r in runs]
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    for mode, (label, color, marker) in MODE_STYLE.items():
        ax.plot(lrs, [mean(r[mode], "exact_unchanged_ratio") for r in runs], marker=marker,
                color=color, label=label, ms=6, lw=1.5)
    ax.plot(lrs, [mean(r["fp32"], "bf16_unchanged_ratio") for r in runs], "x", color="k",
            ms=7, label="fp32 run, bf16_unchanged_ratio")
    ax.plot(lrs, [_avg(r["interval_rule_unchanged"]) for r in runs], "--", color="k", lw=1,
            label="rule: 1 - mean min(1, |Δ|/ulp(w))")
    ax.plot(lrs, [_avg(r["step_rule_unchanged"]) for r in runs], ":", color="k", lw=1.3,
            label="per-step rule: max_t |d_t| < ulp(w)/2")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("learning rate (AdamW, constant)")
    ax.set_ylabel(f"fraction of entries unchanged\nover {res['settings']['interval']} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper right")
    fig.savefig(path, dpi=90)


def masks_figure(res: dict[str, Any], path: str) -> None:
    """KL against kept fraction, one panel per regime."""
    fig = _figure(11, 4.3)
    titles = {"sft": "SFT (shifted Markov chain)", "rl": "RL (REINFORCE, scalar reward)"}
    for k, regime in enumerate(("sft", "rl")):
        ax = fig.add_subplot(1, 2, k + 1)
        curves = res[regime]["curves"]
        for name, (label, color, marker, style) in CURVES.items():
            pts = [(p[0], p[1]) for p in curves[name] if p[1] > 0 and math.isfinite(p[1])]
            ax.plot(*zip(*pts, strict=True), style, marker=marker, color=color, label=label,
                    ms=5, lw=1.5 if style == "-" else 1)
            if name == "low_rank":
                for p in curves[name]:
                    if p[1] > 0:
                        ax.annotate(f"r={p[2]}", (p[0], p[1]), fontsize=6.5, color=color,
                                    xytext=(3, -9), textcoords="offset points")
        base = res[regime]["kl_base"]
        ax.axhline(base, color="k", lw=0.8, ls="--", label="base model (nothing kept)")
        for f in res["settings"]["keep"]:
            ax.axvline(f, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(titles[regime], fontsize=10)
        ax.set_xlabel("kept fraction of the update")
        ax.set_ylabel("KL(tuned || masked), nats/token")
        ax.grid(alpha=0.3, which="both")
        if k == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=90)


def overlap_figure(res: dict[str, Any], path: str) -> None:
    """Jaccard of consecutive changed sets: against lr, and per interval at one lr."""
    runs = res["runs"]
    lrs = [r["lr"] for r in runs]
    fig = _figure(11, 5.0)
    ax = fig.add_subplot(1, 2, 1)
    rules = {"bf16_view": "interval_rule_overlap", "pure_bf16": "step_rule_overlap"}
    rule_names = {"bf16_view": "drift rule", "pure_bf16": "per-step rule"}
    for mode, (label, color, marker) in MODE_STYLE.items():
        label = label.split(" (")[0]
        ax.plot(lrs, [mean(r[mode], "mask_overlap") for r in runs], marker=marker, color=color,
                label=label, ms=6)
        if mode in rules:
            ax.plot(lrs, [_avg(overlap_baselines(r[mode])) for r in runs], "--", color=color,
                    lw=1, label=f"{label}: independent sets ab/(a+b-ab)")
            ax.plot(lrs, [_avg(r[rules[mode]]) for r in runs], ":", color=color, lw=1.5,
                    label=f"{label}: {rule_names[mode]}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("Jaccard of consecutive changed sets\n(mean over intervals)")
    ax.grid(alpha=0.3, which="both")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7.5)

    target = res["settings"]["overlap_lr"]
    run = min(runs, key=lambda r: abs(math.log(r["lr"] / target)))
    ax = fig.add_subplot(1, 2, 2)
    for mode, (_, color, marker) in MODE_STYLE.items():
        values = [r["mask_overlap"] for r in run[mode] if "mask_overlap" in r]
        xs = list(range(2, len(values) + 2))
        ax.plot(xs, values, marker=marker, color=color, ms=6)
        if mode in rules:
            ax.plot(xs, overlap_baselines(run[mode]), "--", color=color, lw=1)
            ax.plot(xs, run[rules[mode]], ":", color=color, lw=1.5)
    ax.set_xticks(xs)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("interval k (Jaccard of changed sets k-1 and k)")
    ax.set_ylabel("Jaccard")
    ax.set_title(f"lr {run['lr']:.0e}; dashed: independent sets, dotted: rounding rule",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
